//! Warning Events on the PodInjections whose entries made the webhook deny a pod.
//!
//! The client that created the pod sees the denial in its error; the owner of a PodInjection
//! sees it here (`kubectl describe podinjection`), which matters when the pod came from a
//! controller whose errors nobody reads. The request path only hands a denial to a bounded
//! channel (dropping it when full, never waiting); [`publish`] sends the Events in the
//! background, and the Event recorder folds repeats into one series.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::debug;

/// The name the webhook reports its Events under (`reportingController`), under the project's
/// domain like the operator's controllers.
pub const REPORTING_CONTROLLER: &str = "appset.dev/webhook";

/// One denial to report: the PodInjection and the message given to the client.
#[derive(Debug, Clone)]
pub struct Denial {
    /// The PodInjection the Event is about.
    pub injection: ObjectReference,
    /// The denial message.
    pub message: String,
}

/// The request path's end of the channel.
#[derive(Debug, Clone)]
pub struct Denials(mpsc::Sender<Denial>);

impl Denials {
    /// Queues a denial; drops it when the queue is full.
    pub fn report(&self, denial: Denial) {
        let _ = self.0.try_send(denial);
    }
}

/// A channel of denials holding at most `capacity`.
pub fn channel(capacity: usize) -> (Denials, mpsc::Receiver<Denial>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (Denials(tx), rx)
}

/// Publishes queued denials as Warning Events until the channel closes.
pub async fn publish(client: Client, mut rx: mpsc::Receiver<Denial>) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    while let Some(d) = rx.recv().await {
        let mut note = d.message;
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push('…');
        }
        let ev = Event {
            type_: EventType::Warning,
            reason: "PodDenied".into(),
            note: Some(note),
            action: "Inject".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &d.injection).await {
            debug!(error = %e, "cannot publish a denial Event");
        }
    }
}
