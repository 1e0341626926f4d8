//! AdmissionReview in, AdmissionReview out: the pure core of the request path.
//!
//! [`parse`] reads a request body. Anything that is not an `AdmissionReview` with a
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
//! pods annotated `appset.dev/inject: disabled` are allowed unchanged.
//!
//! The `/pin-config` route has its own decision, [`PinDecision`] from [`decide_pin`] (or
//! [`respond_pin`] in one step), over the same parsing and wire format: it never injects, it only
//! answers with the `replace` patch of [`crate::pin`], and a malformed
//! `appset.dev/config-snapshots` annotation is denied with `status.code` 400. A dry run gets the
//! same answer as a real request (the route has no side effects at all).

use appset_crds::PodInjection;
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

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
    pub object: Option<Value>,
    /// A dry run (`kubectl apply --dry-run=server`): nothing may happen but the answer.
    pub dry_run: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    kind: Option<Gvk>,
    sub_resource: Option<String>,
    operation: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    object: Option<Value>,
    dry_run: Option<bool>,
}

#[derive(Deserialize)]
struct Gvk {
    group: Option<String>,
    version: Option<String>,
    kind: Option<String>,
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<Request, BadRequest> {
    let review: ReviewIn = serde_json::from_slice(body)
        .map_err(|e| BadRequest(format!("not JSON of the expected shape: {e}")))?;
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
        object: req.object,
        dry_run: req.dry_run.unwrap_or(false),
    })
}

/// Why a pod was allowed unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a Pod CREATE.
    NotPodCreate,
    /// The pod carries `appset.dev/inject: disabled`.
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
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(matching::pod_opted_out)
    {
        return allow(Skip::OptedOut);
    }
    let namespace = namespace_of(req, &pod);
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let matched = matching::matching(&namespace, &labels, injections);
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
fn read_pod(req: &Request) -> Result<Pod, String> {
    let object = req
        .object
        .as_ref()
        .ok_or_else(|| "the request has no object".to_string())?;
    Pod::deserialize(object).map_err(|e| format!("the object is not a readable Pod: {e}"))
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

/// An allowed response carrying `ops` as a base64-encoded JSON Patch.
fn patched<T: serde::Serialize>(uid: &str, ops: &[T]) -> Value {
    let patch = serde_json::to_vec(ops).unwrap_or_default();
    json!({
        "uid": uid,
        "allowed": true,
        "patchType": "JSONPatch",
        "patch": base64::engine::general_purpose::STANDARD.encode(patch),
    })
}

/// A refusal with `status.code`, `status.reason` and the message for the client.
fn refused(uid: &str, code: u16, reason: &str, message: &str) -> Value {
    json!({
        "uid": uid,
        "allowed": false,
        "status": { "code": code, "reason": reason, "message": message },
    })
}

/// The AdmissionReview envelope around a response.
fn envelope(api_version: &str, response: Value) -> Value {
    json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response })
}

impl Decision {
    /// The AdmissionReview response body for this decision.
    pub fn response(&self, api_version: &str) -> Value {
        let response = match self {
            Decision::Allow { uid, .. } => json!({ "uid": uid, "allowed": true }),
            Decision::Inject {
                uid,
                ops,
                applied,
                warnings,
            } => {
                let mut r = patched(uid, ops);
                r["auditAnnotations"] = json!({ "injected": plan::format_injected(applied) });
                if !warnings.is_empty() {
                    r["warnings"] = json!(warnings);
                }
                r
            }
            Decision::Deny { uid, message, .. } => refused(uid, 403, "Forbidden", message),
            Decision::Invalid { uid, message } => refused(uid, 400, "BadRequest", message),
        };
        envelope(api_version, response)
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
    let bytes = serde_json::to_vec(&decision.response(&req.api_version))
        .map_err(|e| BadRequest(format!("cannot encode the response: {e}")))?;
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
    /// The AdmissionReview response body for this decision.
    pub fn response(&self, api_version: &str) -> Value {
        let response = match self {
            PinDecision::Allow { uid, .. } => json!({ "uid": uid, "allowed": true }),
            PinDecision::Pin { uid, ops } => patched(uid, ops),
            PinDecision::Deny { uid, message, .. } => refused(uid, 400, "BadRequest", message),
            PinDecision::Invalid { uid, message } => refused(uid, 400, "BadRequest", message),
        };
        envelope(api_version, response)
    }
}

/// Parses, decides and encodes a `/pin-config` request in one step.
pub fn respond_pin(body: &[u8]) -> Result<(PinDecision, Vec<u8>), BadRequest> {
    let req = parse(body)?;
    let decision = decide_pin(&req);
    let bytes = serde_json::to_vec(&decision.response(&req.api_version))
        .map_err(|e| BadRequest(format!("cannot encode the response: {e}")))?;
    Ok((decision, bytes))
}

#[cfg(test)]
mod tests;
