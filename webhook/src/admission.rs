//! AdmissionReview in, AdmissionReview out: the pure core of the request path.
//!
//! [`parse`] reads a request body (the envelope and the pod in one pass, straight into typed
//! structs; see its doc). Anything that is not an `AdmissionReview` with a
//! `request.uid` is a [`BadRequest`] (the server answers 400). [`decide`] turns a parsed request,
//! the PodInjections of its namespace and what the namespace label cache knows into a
//! [`Decision`], and [`Decision::response`] encodes the `admission.k8s.io/v1` response.
//!
//! The wire format is written here rather than borrowed, because its details are what the API
//! server checks: `patch` is the JSON Patch **base64-encoded** as a JSON string (Go's encoding of
//! `[]byte`), `patchType` is `JSONPatch` and is present only with a patch, and `uid` is echoed.
//! Denials carry `status.code` 403 and a message that names both sides of every conflict.
//!
//! Requests that are not a Pod CREATE, pods in a namespace the cache knows is not opted in, and
//! pods labelled or annotated `appset.dev/inject: disabled` are allowed unchanged.
//!
//! The `/pin-config` route has its own decision, [`PinDecision`] from [`decide_pin`] (or
//! [`respond_pin`] in one step), over the same parsing and wire format: it never injects, it only
//! answers with the `replace` patch of [`crate::pin`], and a malformed
//! `appset.dev/config-snapshots` annotation is denied with `status.code` 400. A dry run gets the
//! same answer as a real request (the route has no side effects at all).

use std::borrow::Cow;

use appset_crds::PodInjection;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::matching;
use crate::patch::{AddOp, ReplaceOp};
use crate::pin::{self, Pin};
use crate::plan::{self, Candidate, Plan};

/// The API version of the reviews the webhook answers.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A body that is not an AdmissionReview request: answered with HTTP 400 and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad AdmissionReview: {0}")]
pub struct BadRequest(pub String);

/// The parts of an admission request the webhook reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed in the response.
    pub uid: String,
    /// The API version the review came in (echoed; `admission.k8s.io/v1` when absent).
    pub api_version: String,
    /// Whether this is a CREATE of a core/v1 Pod (and not of a subresource).
    pub is_pod_create: bool,
    /// The namespace of the object.
    pub namespace: String,
    /// The object's name, or its `generateName` prefix, for messages.
    pub name: String,
    /// The object, when present.
    pub object: Option<Object>,
    /// A dry run (`kubectl apply --dry-run=server`): nothing may happen but the answer.
    pub dry_run: bool,
}

/// The object of a request, as [`parse`] read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// Read as a Pod in the same pass as the rest of the body (every pod the API server sends).
    Pod(Box<Pod>),
    /// Not readable as a Pod in that pass (another kind, or a malformed pod): kept as JSON, read
    /// again as a Pod only when the request is a Pod CREATE, for the message of a
    /// [`Decision::Invalid`].
    Json(Value),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn<O> {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<RequestIn<O>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn<O> {
    uid: String,
    kind: Option<Gvk>,
    sub_resource: Option<String>,
    operation: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    object: Option<O>,
    dry_run: Option<bool>,
}

#[derive(Deserialize)]
struct Gvk {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
}

/// Parses a request body.
///
/// One pass reads the envelope and the object straight into a [`Pod`], with no intermediate
/// JSON tree. A body that pass refuses (not an AdmissionReview, an object that is not a
/// readable Pod, a duplicated field) is read again the general way, through a
/// [`serde_json::Value`] for the object, so that every body gets the answer it always got: a
/// [`BadRequest`], or a request whose unreadable object becomes a [`Decision::Invalid`].
pub fn parse(body: &[u8]) -> Result<Request, BadRequest> {
    // UTF-8 is checked once for the whole body, not string by string.
    let fast = std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<ReviewIn<Box<Pod>>>(text).ok());
    match fast {
        Some(review) => check(review, Object::Pod),
        None => {
            let review: ReviewIn<Value> = serde_json::from_slice(body)
                .map_err(|e| BadRequest(format!("not JSON of the expected shape: {e}")))?;
            check(review, Object::Json)
        }
    }
}

/// The checks of [`parse`] on a review read either way.
fn check<O>(review: ReviewIn<O>, object: impl FnOnce(O) -> Object) -> Result<Request, BadRequest> {
    if let Some(kind) = &review.kind
        && kind != "AdmissionReview"
    {
        return Err(BadRequest(format!("kind is {kind:?}, not AdmissionReview")));
    }
    let req = review
        .request
        .ok_or_else(|| BadRequest("no request in the AdmissionReview".into()))?;
    if req.uid.is_empty() {
        return Err(BadRequest("request.uid is empty".into()));
    }
    let is_pod = req.kind.as_ref().is_some_and(|k| {
        k.group.as_deref().unwrap_or_default().is_empty()
            && k.version.as_deref() == Some("v1")
            && k.kind.as_deref() == Some("Pod")
    });
    let is_pod_create = is_pod
        && req.sub_resource.as_deref().unwrap_or_default().is_empty()
        && req.operation.as_deref() == Some("CREATE");
    Ok(Request {
        uid: req.uid,
        api_version: review
            .api_version
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| API_VERSION.to_string()),
        is_pod_create,
        namespace: req.namespace.unwrap_or_default(),
        name: req.name.unwrap_or_default(),
        object: req.object.map(object),
        dry_run: req.dry_run.unwrap_or(false),
    })
}

/// Why a pod was allowed unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a Pod CREATE.
    NotPodCreate,
    /// The pod carries `appset.dev/inject: disabled` (label or annotation).
    OptedOut,
    /// No PodInjection matched, or all that match are already applied.
    NothingToDo,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed unchanged.
    Allow {
        /// Echoed uid.
        uid: String,
        /// Why nothing was injected.
        skip: Skip,
    },
    /// Allowed with a patch.
    Inject {
        /// Echoed uid.
        uid: String,
        /// The JSON Patch.
        ops: Vec<AddOp>,
        /// The PodInjections applied, `(name, generation)`.
        applied: Vec<(String, i64)>,
        /// Warnings for the client.
        warnings: Vec<String>,
    },
    /// Denied because of a conflict.
    Deny {
        /// Echoed uid.
        uid: String,
        /// The message for the client.
        message: String,
        /// The pod's namespace.
        namespace: String,
        /// The PodInjections involved in the conflict, by name.
        injections: Vec<String>,
        /// The request was a dry run: the denial is answered, not reported as an Event.
        dry_run: bool,
    },
    /// Denied because the object is not a readable Pod.
    Invalid {
        /// Echoed uid.
        uid: String,
        /// What could not be read.
        message: String,
    },
}

/// Decides a parsed request. `injections` are the PodInjections held in memory (any namespace:
/// they are filtered here). The namespace is not checked again: the API server sent the request
/// because the namespace matched the configuration's `namespaceSelector`, and a cache of
/// namespace labels that lags behind must never make a pod skip its injection.
pub fn decide<'a, I>(req: &Request, injections: I) -> Decision
where
    I: IntoIterator<Item = &'a PodInjection>,
{
    let uid = req.uid.clone();
    let allow = |skip| Decision::Allow {
        uid: uid.clone(),
        skip,
    };
    if !req.is_pod_create {
        return allow(Skip::NotPodCreate);
    }
    let pod = match read_pod(req) {
        Ok(p) => p,
        Err(message) => return Decision::Invalid { uid, message },
    };
    if matching::pod_opted_out(
        pod.metadata.labels.as_ref(),
        pod.metadata.annotations.as_ref(),
    ) {
        return allow(Skip::OptedOut);
    }
    let namespace = namespace_of(req, &pod);
    let no_labels = std::collections::BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
    let matched = matching::matching(&namespace, labels, injections);
    let candidates: Vec<Candidate<'_>> = matched.into_iter().map(Candidate::of).collect();
    match plan::plan(&pod, &candidates) {
        Plan::Unchanged => allow(Skip::NothingToDo),
        Plan::Patch {
            ops,
            applied,
            warnings,
        } => Decision::Inject {
            uid,
            ops,
            applied,
            warnings,
        },
        Plan::Deny {
            message,
            injections,
        } => Decision::Deny {
            uid,
            message: format!("pod {namespace}/{}: {message}", who(req, &pod)),
            namespace,
            injections,
            dry_run: req.dry_run,
        },
    }
}

/// The request's object as a Pod, or the message of an [`Decision::Invalid`].
fn read_pod(req: &Request) -> Result<Cow<'_, Pod>, String> {
    match req.object.as_ref() {
        None => Err("the request has no object".to_string()),
        Some(Object::Pod(pod)) => Ok(Cow::Borrowed(&**pod)),
        Some(Object::Json(object)) => Pod::deserialize(object)
            .map(Cow::Owned)
            .map_err(|e| format!("the object is not a readable Pod: {e}")),
    }
}

/// The pod's name for messages: the request's name, else the object's, else its
/// `generateName` prefix and `*`, else `pod`.
fn who(req: &Request, pod: &Pod) -> String {
    if !req.name.is_empty() {
        return req.name.clone();
    }
    if let Some(name) = pod.metadata.name.as_ref().filter(|n| !n.is_empty()) {
        return name.clone();
    }
    pod.metadata
        .generate_name
        .clone()
        .map(|g| format!("{g}*"))
        .unwrap_or_else(|| "pod".into())
}

/// The namespace of the request, or of the pod when the request names none.
fn namespace_of(req: &Request, pod: &Pod) -> String {
    if req.namespace.is_empty() {
        pod.metadata.namespace.clone().unwrap_or_default()
    } else {
        req.namespace.clone()
    }
}

/// The AdmissionReview envelope written back, borrowing from the decision.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: ResponseOut<'a>,
}

/// `response` of an AdmissionReview: fields absent when empty, as the API server expects
/// (`patchType` only with a patch).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut<'a> {
    uid: &'a str,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_annotations: Option<Audit>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusOut<'a>>,
}

#[derive(Serialize)]
struct Audit {
    injected: String,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    code: u16,
    reason: &'static str,
    message: &'a str,
}

impl<'a> ResponseOut<'a> {
    fn allowed(uid: &'a str) -> Self {
        Self {
            uid,
            allowed: true,
            patch_type: None,
            patch: None,
            audit_annotations: None,
            warnings: &[],
            status: None,
        }
    }

    /// Allowed, carrying `ops` as a base64-encoded JSON Patch.
    fn patched<T: Serialize>(uid: &'a str, ops: &[T]) -> Self {
        let mut patch = Vec::with_capacity(1024);
        if serde_json::to_writer(&mut patch, ops).is_err() {
            patch.clear();
        }
        Self {
            patch_type: Some("JSONPatch"),
            patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
            ..Self::allowed(uid)
        }
    }

    /// A refusal with `status.code`, `status.reason` and the message for the client.
    fn refused(uid: &'a str, code: u16, reason: &'static str, message: &'a str) -> Self {
        Self {
            allowed: false,
            status: Some(StatusOut {
                code,
                reason,
                message,
            }),
            ..Self::allowed(uid)
        }
    }

    /// The AdmissionReview around this response.
    fn envelope(self, api_version: &'a str) -> ReviewOut<'a> {
        ReviewOut {
            api_version,
            kind: "AdmissionReview",
            response: self,
        }
    }
}

/// The bytes of a response (writing borrowed strings and a few numbers cannot fail).
fn encode(review: &ReviewOut<'_>) -> Result<Vec<u8>, BadRequest> {
    let r = &review.response;
    let len = r.patch.as_ref().map_or(0, String::len)
        + r.status.as_ref().map_or(0, |s| s.message.len())
        + r.warnings.iter().map(String::len).sum::<usize>()
        + 512;
    let mut out = Vec::with_capacity(len);
    serde_json::to_writer(&mut out, review)
        .map_err(|e| BadRequest(format!("cannot encode the response: {e}")))?;
    Ok(out)
}

impl Decision {
    fn wire<'a>(&'a self, api_version: &'a str) -> ReviewOut<'a> {
        let response = match self {
            Decision::Allow { uid, .. } => ResponseOut::allowed(uid),
            Decision::Inject {
                uid,
                ops,
                applied,
                warnings,
            } => ResponseOut {
                audit_annotations: Some(Audit {
                    injected: plan::format_injected(applied),
                }),
                warnings,
                ..ResponseOut::patched(uid, ops)
            },
            Decision::Deny { uid, message, .. } => {
                ResponseOut::refused(uid, 403, "Forbidden", message)
            }
            Decision::Invalid { uid, message } => {
                ResponseOut::refused(uid, 400, "BadRequest", message)
            }
        };
        response.envelope(api_version)
    }

    /// The AdmissionReview response body for this decision.
    pub fn response(&self, api_version: &str) -> Value {
        serde_json::to_value(self.wire(api_version)).unwrap_or(Value::Null)
    }

    /// [`Self::response`] as the bytes sent.
    pub fn encode(&self, api_version: &str) -> Result<Vec<u8>, BadRequest> {
        encode(&self.wire(api_version))
    }
}

/// Parses, decides and encodes in one step; `lookup` gives the PodInjections of a namespace.
/// Returns the response body or a [`BadRequest`].
pub fn respond<F>(body: &[u8], lookup: F) -> Result<(Decision, Vec<u8>), BadRequest>
where
    F: FnOnce(&str) -> Vec<std::sync::Arc<PodInjection>>,
{
    let req = parse(body)?;
    let injections = if req.is_pod_create {
        lookup(&req.namespace)
    } else {
        Vec::new()
    };
    let decision = decide(&req, injections.iter().map(|p| &**p));
    let bytes = decision.encode(&req.api_version)?;
    Ok((decision, bytes))
}

/// Why `/pin-config` allowed a pod unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSkip {
    /// Not a Pod CREATE.
    NotPodCreate,
    /// The pod has no `appset.dev/config-snapshots` annotation.
    NoAnnotation,
    /// No reference names a source of the annotation (already pinned, or none read).
    NothingToDo,
}

/// The answer of `/pin-config` to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum PinDecision {
    /// Allowed unchanged.
    Allow {
        /// Echoed uid.
        uid: String,
        /// Why nothing was rewritten.
        skip: PinSkip,
    },
    /// Allowed with the references pointed at the snapshots.
    Pin {
        /// Echoed uid.
        uid: String,
        /// The JSON Patch (`replace` operations only).
        ops: Vec<ReplaceOp>,
    },
    /// Denied: the annotation is malformed (`status.code` 400).
    Deny {
        /// Echoed uid.
        uid: String,
        /// The message for the client: the pod, the annotation and what is wrong with it.
        message: String,
        /// The request was a dry run (answered the same: the route has no side effects).
        dry_run: bool,
    },
    /// Denied because the object is not a readable Pod.
    Invalid {
        /// Echoed uid.
        uid: String,
        /// What could not be read.
        message: String,
    },
}

/// Decides a parsed request for `/pin-config`: see [`crate::pin`].
pub fn decide_pin(req: &Request) -> PinDecision {
    let uid = req.uid.clone();
    if !req.is_pod_create {
        return PinDecision::Allow {
            uid,
            skip: PinSkip::NotPodCreate,
        };
    }
    let pod = match read_pod(req) {
        Ok(p) => p,
        Err(message) => return PinDecision::Invalid { uid, message },
    };
    let skip = match pin::pin(&pod) {
        Pin::Patch(ops) => return PinDecision::Pin { uid, ops },
        Pin::Malformed(e) => {
            return PinDecision::Deny {
                uid,
                message: format!("pod {}/{}: {e}", namespace_of(req, &pod), who(req, &pod)),
                dry_run: req.dry_run,
            };
        }
        Pin::NoAnnotation => PinSkip::NoAnnotation,
        Pin::Unchanged => PinSkip::NothingToDo,
    };
    PinDecision::Allow { uid, skip }
}

impl PinDecision {
    fn wire<'a>(&'a self, api_version: &'a str) -> ReviewOut<'a> {
        let response = match self {
            PinDecision::Allow { uid, .. } => ResponseOut::allowed(uid),
            PinDecision::Pin { uid, ops } => ResponseOut::patched(uid, ops),
            PinDecision::Deny { uid, message, .. } | PinDecision::Invalid { uid, message } => {
                ResponseOut::refused(uid, 400, "BadRequest", message)
            }
        };
        response.envelope(api_version)
    }

    /// The AdmissionReview response body for this decision.
    pub fn response(&self, api_version: &str) -> Value {
        serde_json::to_value(self.wire(api_version)).unwrap_or(Value::Null)
    }

    /// [`Self::response`] as the bytes sent.
    pub fn encode(&self, api_version: &str) -> Result<Vec<u8>, BadRequest> {
        encode(&self.wire(api_version))
    }
}

/// Parses, decides and encodes a `/pin-config` request in one step.
pub fn respond_pin(body: &[u8]) -> Result<(PinDecision, Vec<u8>), BadRequest> {
    let req = parse(body)?;
    let decision = decide_pin(&req);
    let bytes = decision.encode(&req.api_version)?;
    Ok((decision, bytes))
}

#[cfg(test)]
mod tests;
