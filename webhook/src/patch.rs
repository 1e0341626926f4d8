//! JSON Patch (RFC 6902) operations, with RFC 6901 pointer escaping.
//!
//! Two kinds of operation, each with its own type so that a route cannot emit the other's:
//!
//! * [`AddOp`], the only kind `/mutate-pods` emits: a list is either created whole when the pod
//!   has none, or grown by `add` at an index (`/spec/initContainers/0`, which inserts and shifts)
//!   or at the end (`/-`); the injection never replaces or removes.
//! * [`ReplaceOp`], the only kind `/pin-config` emits ([`crate::pin`]): a string that exists
//!   (a ConfigMap or Secret name) is replaced in place; no list changes length, so the pointers
//!   of one patch never shift under each other.
//!
//! Map keys such as annotation names are escaped (`~` → `~0`, `/` → `~1`), so
//! `appset.dev/injected` becomes `appset.dev~1injected`.

use serde::Serialize;
use serde_json::Value;

/// One `add` operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AddOp {
    /// Always `"add"`.
    pub op: &'static str,
    /// The JSON Pointer the value is added at.
    pub path: String,
    /// The value added.
    pub value: Value,
}

impl AddOp {
    /// An `add` of `value` at the pointer made of `tokens` (each escaped here).
    pub fn new<S: AsRef<str>>(tokens: &[S], value: Value) -> Self {
        Self {
            op: "add",
            path: pointer(tokens),
            value,
        }
    }
}

/// One `replace` operation: the value at `path` must exist, and is replaced by `value`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplaceOp {
    /// Always `"replace"`.
    pub op: &'static str,
    /// The JSON Pointer of the value replaced.
    pub path: String,
    /// The new value.
    pub value: Value,
}

impl ReplaceOp {
    /// A `replace` of the value at the pointer made of `tokens` (each escaped here) by `value`.
    pub fn new<S: AsRef<str>>(tokens: &[S], value: Value) -> Self {
        Self {
            op: "replace",
            path: pointer(tokens),
            value,
        }
    }
}

/// Escapes one reference token per RFC 6901: `~` becomes `~0`, then `/` becomes `~1`.
pub fn escape_token(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    push_escaped(&mut out, token);
    out
}

/// Appends `token` escaped per RFC 6901 (most tokens need no escape and are copied whole).
fn push_escaped(out: &mut String, token: &str) {
    if !token.contains(['~', '/']) {
        out.push_str(token);
        return;
    }
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

/// Builds a JSON Pointer from unescaped tokens.
pub fn pointer<S: AsRef<str>>(tokens: &[S]) -> String {
    let len = tokens.iter().map(|t| t.as_ref().len() + 1).sum::<usize>();
    let mut out = String::with_capacity(len + 4);
    for t in tokens {
        out.push('/');
        push_escaped(&mut out, t.as_ref());
    }
    out
}

/// Applies `ops` to `doc` (RFC 6902 `add` semantics: an array index inserts, `-` appends, an
/// object member is set). Used by tests and the benchmark to check what the API server will
/// see; returns an error naming the pointer that does not resolve.
pub fn apply(doc: &mut Value, ops: &[AddOp]) -> Result<(), String> {
    for op in ops {
        let tokens = unescape(&op.path);
        let Some((last, parents)) = tokens.split_last() else {
            *doc = op.value.clone();
            continue;
        };
        let mut target = &mut *doc;
        for t in parents {
            target = match target {
                Value::Object(m) => m.get_mut(t),
                Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("{}: no such parent", op.path))?;
        }
        match target {
            Value::Object(m) => {
                m.insert(last.clone(), op.value.clone());
            }
            Value::Array(a) if last == "-" => a.push(op.value.clone()),
            Value::Array(a) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| format!("{}: bad array index", op.path))?;
                a.insert(i, op.value.clone());
            }
            _ => return Err(format!("{}: parent is not a container", op.path)),
        }
    }
    Ok(())
}

/// Applies `ops` to `doc` with RFC 6902 `replace` semantics: the target (an object member or
/// an array element) must exist. Used by tests to check what the API server will see; returns
/// an error naming the pointer that does not resolve.
pub fn apply_replace(doc: &mut Value, ops: &[ReplaceOp]) -> Result<(), String> {
    for op in ops {
        let mut target = &mut *doc;
        for t in unescape(&op.path) {
            target = match target {
                Value::Object(m) => m.get_mut(&t),
                Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("{}: no such value", op.path))?;
        }
        *target = op.value.clone();
    }
    Ok(())
}

/// The unescaped reference tokens of a pointer.
fn unescape(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_tilde_before_slash() {
        assert_eq!(escape_token("appset.dev/injected"), "appset.dev~1injected");
        assert_eq!(escape_token("a~b"), "a~0b");
        assert_eq!(escape_token("~1/"), "~01~1");
        assert_eq!(
            pointer(&["metadata", "annotations", "x/y~z"]),
            "/metadata/annotations/x~1y~0z"
        );
    }

    #[test]
    fn serializes_as_rfc6902() {
        let op = AddOp::new(&["spec", "volumes", "-"], json!({"name": "v"}));
        assert_eq!(
            serde_json::to_value(&op).ok(),
            Some(json!({"op": "add", "path": "/spec/volumes/-", "value": {"name": "v"}}))
        );
    }

    #[test]
    fn apply_inserts_appends_and_sets() {
        let mut doc = json!({"a": [1, 3], "m": {}});
        let ops = vec![
            AddOp::new(&["a", "1"], json!(2)),
            AddOp::new(&["a", "-"], json!(4)),
            AddOp::new(&["m", "k/~"], json!("v")),
        ];
        assert_eq!(apply(&mut doc, &ops), Ok(()));
        assert_eq!(doc, json!({"a": [1, 2, 3, 4], "m": {"k/~": "v"}}));
        assert!(apply(&mut doc, &[AddOp::new(&["nope", "-"], json!(1))]).is_err());
    }

    #[test]
    fn replace_serializes_and_needs_an_existing_target() {
        let op = ReplaceOp::new(&["spec", "volumes", "0", "configMap", "name"], json!("b"));
        assert_eq!(
            serde_json::to_value(&op).ok(),
            Some(json!({"op": "replace", "path": "/spec/volumes/0/configMap/name", "value": "b"}))
        );
        let mut doc = json!({"spec": {"volumes": [{"configMap": {"name": "a"}}]}, "m": {"k/~": 1}});
        assert_eq!(
            apply_replace(&mut doc, &[op, ReplaceOp::new(&["m", "k/~"], json!(2))]),
            Ok(())
        );
        assert_eq!(
            doc,
            json!({"spec": {"volumes": [{"configMap": {"name": "b"}}]}, "m": {"k/~": 2}})
        );
        let before = doc.clone();
        assert!(
            apply_replace(
                &mut doc,
                &[ReplaceOp::new(&["spec", "volumes", "1"], json!(1))]
            )
            .is_err()
        );
        assert!(apply_replace(&mut doc, &[ReplaceOp::new(&["m", "absent"], json!(1))]).is_err());
        assert_eq!(doc, before);
    }
}
