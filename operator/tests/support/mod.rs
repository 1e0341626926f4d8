//! A fake API server for contract tests: a [`kube::Client`] whose transport is a
//! `tower_test` mock, answered by a small in-memory object store.
//!
//! Every request is recorded ([`Request`]: method, path with query, JSON body) in the order the
//! client sent it, so that a test can assert the exact sequence of calls a reconcile makes and
//! the preconditions each carries. The store answers like the API server would for the calls
//! the controllers make: lists and gets of what it holds, creates (with a fresh `uid` and
//! `resourceVersion`), JSON merge and apply patches (merged into the stored object), and
//! deletes. A test can put objects in before it starts and override any answer (a 404 or a
//! 409) with [`Fake::fail`]. Every watch is answered with `410 Expired`, so a client's
//! watches relist again and again: each relist sees the store as it is then.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request as HttpRequest, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, `PATCH`, `PUT` or `DELETE`.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string (empty when none).
    pub query: String,
    /// The `Content-Type` header (patch type).
    pub content_type: String,
    /// The `Accept` header.
    pub accept: String,
    /// The JSON body, `Null` when none.
    pub body: Value,
}

impl Request {
    /// `"METHOD path"`, the form sequences are asserted in.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

type Override = Box<dyn FnMut(&Request) -> Option<(u16, Value)> + Send>;

#[derive(Default)]
struct State {
    /// Objects by collection path (`/api/v1/namespaces/ns/pods`), then by name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    log: Vec<Request>,
    overrides: Vec<Override>,
    next: u64,
}

/// The fake API server.
#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

/// The client and the task answering it.
pub struct Running {
    /// A client whose every request goes to the fake.
    pub client: Client,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Merges `patch` into `base` as a JSON merge patch (RFC 7386).
pub fn merge_json(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge_json(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

impl Fake {
    /// An empty fake.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Stores `obj` in the collection at `collection`.
    pub fn put(&self, collection: &str, obj: Value) {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut st = lock(&self.state);
        st.objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, obj);
    }

    /// Removes `name` from `collection` without telling any watch (as if it was deleted while
    /// the client's watch was down).
    pub fn remove(&self, collection: &str, name: &str) {
        if let Some(c) = lock(&self.state).objects.get_mut(collection) {
            c.remove(name);
        }
    }

    /// The stored object `name` of `collection`.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        lock(&self.state)
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    /// The names stored in `collection`.
    pub fn names(&self, collection: &str) -> Vec<String> {
        lock(&self.state)
            .objects
            .get(collection)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Answers the requests `matches` accepts with `status` and a `Status` body, once per
    /// matching request, before the store sees them.
    pub fn fail(&self, status: u16, mut matches: impl FnMut(&Request) -> bool + Send + 'static) {
        let reason = match status {
            404 => "NotFound",
            409 => "Conflict",
            422 => "Invalid",
            _ => "InternalError",
        };
        lock(&self.state).overrides.push(Box::new(move |r| {
            matches(r).then(|| {
                (
                    status,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": format!("{reason} (fake)"), "reason": reason, "code": status}),
                )
            })
        }));
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state).log.clone()
    }

    /// Every request so far as `"METHOD path"`, leaving out Event writes (published on the
    /// side, asserted separately with [`Fake::events`]).
    pub fn lines(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| !r.path.contains("/events"))
            .map(Request::line)
            .collect()
    }

    /// The reasons of the Events written so far.
    pub fn events(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.path.contains("/events") && r.method == "POST")
            .map(|r| r.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        lock(&self.state).log.clear();
    }

    /// Starts answering; the returned client talks to this fake.
    pub fn start(&self) -> Running {
        let (service, mut handle) = tower_test::mock::pair::<HttpRequest<Body>, Response<Body>>();
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let request = Request {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: header("content-type"),
                    accept: header("accept"),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (status, answer) = answer(&state, request);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap_or_default()))
                    .unwrap_or_else(|_| Response::new(Body::empty()));
                send.send_response(response);
            }
        });
        Running {
            client: Client::new(service, "default"),
            task,
        }
    }
}

/// Splits `/…/<collection>/<name>[/<subresource>]` into (collection, name, subresource),
/// knowing that a namespaced collection path ends in `namespaces/<ns>/<plural>`.
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    // Base: /api/v1 (3 parts incl. the empty first) or /apis/<group>/<version> (4 parts).
    let base = if parts.get(1) == Some(&"api") { 3 } else { 4 };
    let mut rest = parts[base.min(parts.len())..].to_vec();
    let mut prefix = parts[..base.min(parts.len())].join("/");
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        prefix = format!("{prefix}/namespaces/{}", rest[1]);
        rest = rest[2..].to_vec();
    }
    let collection = format!("{prefix}/{}", rest.first().copied().unwrap_or_default());
    (
        collection,
        rest.get(1).map(|s| s.to_string()),
        rest.get(2).map(|s| s.to_string()),
    )
}

fn not_found(name: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": format!("{name} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// The `key=value` terms of the query's `labelSelector` (the only form the controllers send).
fn label_selector(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "labelSelector")
        .flat_map(|(_, sel)| {
            sel.split(',')
                .filter_map(|term| {
                    term.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether `wanted` is a resourceVersion precondition that `obj` no longer meets.
fn stale(obj: &Value, wanted: &Value) -> bool {
    wanted.is_string() && *wanted != obj["metadata"]["resourceVersion"]
}

fn conflict(name: &str) -> (u16, Value) {
    (
        409,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": format!("the object {name} has been modified (fake)"), "reason": "Conflict", "code": 409}),
    )
}

fn answer(state: &Mutex<State>, request: Request) -> (u16, Value) {
    let mut st = lock(state);
    st.log.push(request.clone());
    for o in st.overrides.iter_mut() {
        if let Some(a) = o(&request) {
            return a;
        }
    }
    st.next += 1;
    let rv = (st.next + 100).to_string();
    let (collection, name, _sub) = split(&request.path);
    let objects = st.objects.entry(collection).or_default();
    match (request.method.as_str(), name) {
        // Every watch ends at once with 410 Expired: the client relists, each time.
        ("GET", None) if request.query.split('&').any(|p| p == "watch=true") => (
            200,
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                   "status": "Failure", "reason": "Expired", "code": 410,
                   "message": "too old resource version"}}),
        ),
        ("GET", None) => {
            let selector = label_selector(&request.query);
            let items: Vec<Value> = objects
                .values()
                .filter(|o| {
                    selector
                        .iter()
                        .all(|(k, v)| o["metadata"]["labels"][k.as_str()] == v.as_str())
                })
                .cloned()
                .collect();
            (
                200,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv},
                       "items": items}),
            )
        }
        ("GET", Some(name)) => match objects.get(&name) {
            Some(o) => (200, o.clone()),
            None => not_found(&name),
        },
        ("POST", _) => {
            let mut obj = request.body.clone();
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if objects.contains_key(&name) {
                return (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": format!("{name} already exists"), "reason": "AlreadyExists", "code": 409}),
                );
            }
            obj["metadata"]["uid"] = json!(format!("uid-{name}"));
            obj["metadata"]["resourceVersion"] = json!(rv);
            objects.insert(name, obj.clone());
            (201, obj)
        }
        ("PATCH", Some(name)) => {
            let apply = request.content_type.contains("apply-patch");
            match objects.get_mut(&name) {
                Some(o) if stale(o, &request.body["metadata"]["resourceVersion"]) => {
                    conflict(&name)
                }
                Some(o) => {
                    merge_json(o, &request.body);
                    o["metadata"]["resourceVersion"] = json!(rv);
                    (200, o.clone())
                }
                None if apply => {
                    let mut obj = request.body.clone();
                    obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                    obj["metadata"]["resourceVersion"] = json!(rv);
                    objects.insert(name, obj.clone());
                    (201, obj)
                }
                None => not_found(&name),
            }
        }
        ("PUT", Some(name)) => match objects.get_mut(&name) {
            Some(o) if stale(o, &request.body["metadata"]["resourceVersion"]) => conflict(&name),
            Some(o) => {
                let uid = o["metadata"]["uid"].clone();
                *o = request.body.clone();
                o["metadata"]["uid"] = uid;
                o["metadata"]["resourceVersion"] = json!(rv);
                (200, o.clone())
            }
            None => not_found(&name),
        },
        ("DELETE", Some(name)) => {
            let pre = &request.body["preconditions"];
            match objects.get(&name) {
                None => not_found(&name),
                Some(o)
                    if pre["uid"].is_string() && pre["uid"] != o["metadata"]["uid"]
                        || stale(o, &pre["resourceVersion"]) =>
                {
                    conflict(&name)
                }
                Some(_) => (200, objects.remove(&name).unwrap_or_default()),
            }
        }
        _ => (
            405,
            json!({"kind": "Status", "status": "Failure", "code": 405}),
        ),
    }
}

#[test]
fn label_selectors_are_decoded() {
    assert_eq!(
        label_selector("&labelSelector=appset.dev%2Fappset%3Dweb"),
        vec![("appset.dev/appset".to_string(), "web".to_string())]
    );
    assert!(label_selector("&fieldManager=x").is_empty());
}

#[test]
fn paths_split_into_collection_name_and_subresource() {
    assert_eq!(
        split("/api/v1/namespaces/ns/pods/web-0"),
        (
            "/api/v1/namespaces/ns/pods".into(),
            Some("web-0".into()),
            None
        )
    );
    assert_eq!(
        split("/apis/appset.dev/v1alpha1/namespaces/ns/appsets/web/status"),
        (
            "/apis/appset.dev/v1alpha1/namespaces/ns/appsets".into(),
            Some("web".into()),
            Some("status".into())
        )
    );
    assert_eq!(
        split("/apis/storage.k8s.io/v1/storageclasses/fast"),
        (
            "/apis/storage.k8s.io/v1/storageclasses".into(),
            Some("fast".into()),
            None
        )
    );
}
