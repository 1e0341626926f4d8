//! JSON Patch (RFC 6902) operations that only ever add, with RFC 6901 pointer escaping.
//!
//! The webhook never emits `replace` or `remove`: a list is either created whole when the pod
//! has none, or grown by `add` at an index (`/spec/initContainers/0`, which inserts and shifts)
//! or at the end (`/-`). Map keys such as annotation names are escaped (`~` → `~0`, `/` → `~1`),
//! so `appset.dev/injected` becomes `appset.dev~1injected`.

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

/// Escapes one reference token per RFC 6901: `~` becomes `~0`, then `/` becomes `~1`.
pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Builds a JSON Pointer from unescaped tokens.
pub fn pointer<S: AsRef<str>>(tokens: &[S]) -> String {
    let mut out = String::new();
    for t in tokens {
        out.push('/');
        out.push_str(&escape_token(t.as_ref()));
    }
    out
}

/// Applies `ops` to `doc` (RFC 6902 `add` semantics: an array index inserts, `-` appends, an
/// object member is set). Used by tests and the benchmark to check what the API server will
/// see; returns an error naming the pointer that does not resolve.
pub fn apply(doc: &mut Value, ops: &[AddOp]) -> Result<(), String> {
    for op in ops {
        let tokens: Vec<String> = op
            .path
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
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
}
