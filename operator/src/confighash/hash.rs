//! The config hash: a canonical encoding of a workload's sources and a keyed digest over it.
//!
//! Data flow: the controller (or the AppSet controller) fetches each referenced ConfigMap and
//! Secret, turns it into a [`Source`] restricted to the keys the pod template uses
//! ([`Source::from_config_map`], [`Source::from_secret`], [`Source::absent`] for a missing
//! optional source), and calls [`digest`] with the installation's [`HashKey`]. The bodies are
//! dropped right after; only the digest is kept.
//!
//! # Canonical encoding
//!
//! [`encode`] writes, in this order:
//! 1. the magic `appset.dev/config-hash/v1\n` (a version, so a future format never collides);
//! 2. the number of sources (u64, big endian);
//! 3. for each source, sorted by kind, namespace and name: a kind tag byte (`1` ConfigMap,
//!    `2` Secret), the namespace and the name (each length-prefixed), then a presence byte: `0`
//!    for an absent source, or `1` followed by two sections, `data` (tag `D`) then `binaryData`
//!    (tag `B`), each being an entry count and the entries in key order, every key and value
//!    length-prefixed (u64 big endian).
//!
//! Every variable-length field carries its length and every list its count, so the encoding is
//! prefix-free and no two different inputs give the same bytes: an absent source differs from an
//! empty one, a key in `data` differs from the same key in `binaryData`, and no choice of names
//! or values can shift bytes from one field into the next.
//!
//! # Combined digest
//!
//! The config rollout controller records [`combine`]: an HMAC over each source's own
//! [`digest`] (with its kind, namespace and name) rather than over all the data at once, so a
//! source's digest can be cached while its `resourceVersion` stays the same and shared by every
//! workload that uses it. The AppSet controller still records [`digest`] over all its sources.
//!
//! # Keyed digest
//!
//! The digest is HMAC-SHA256 over the encoding, keyed with a per-installation secret key
//! (see [`crate::confighash::keyring`]), written as 64 lowercase hex digits. Anyone who can read a
//! Deployment sees the digest, but without the key they cannot test guesses of a Secret's value
//! against it, as they could with a plain SHA-256.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use sha2::{Digest as _, Sha256};

use super::discovery::{KeySet, SourceKind, SourceName};

/// The first bytes of every encoding.
pub const MAGIC: &[u8] = b"appset.dev/config-hash/v1\n";

/// A secret key for the digest, with a short public id derived from it.
#[derive(Clone, PartialEq, Eq)]
pub struct HashKey {
    id: String,
    bytes: Vec<u8>,
}

impl HashKey {
    /// A key from its bytes. The id is the first 16 hex digits of SHA-256 over a fixed label
    /// and the key: it names the key (to detect rotation) without revealing it.
    pub fn new(bytes: Vec<u8>) -> Self {
        let mut h = Sha256::new();
        h.update(b"appset.dev/config-hash-key-id\0");
        h.update(&bytes);
        let id = hex(&h.finalize()[..8]);
        Self { id, bytes }
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key material (to store it in its Secret).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashKey")
            .field("id", &self.id)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

/// The hashed content of a source that exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Content {
    /// `data` (a ConfigMap's strings, as UTF-8, or a Secret's bytes).
    pub data: BTreeMap<String, Vec<u8>>,
    /// A ConfigMap's `binaryData`.
    pub binary_data: BTreeMap<String, Vec<u8>>,
}

/// One source as it enters the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its data restricted to the keys used, or `None` when it does not exist.
    pub content: Option<Content>,
    /// A Secret's `type` (not hashed: it is kept only so that a snapshot copies it).
    pub secret_type: Option<String>,
}

fn restrict<V>(
    map: Option<BTreeMap<String, V>>,
    keys: &KeySet,
    f: impl Fn(V) -> Vec<u8>,
) -> BTreeMap<String, Vec<u8>> {
    map.into_iter()
        .flatten()
        .filter(|(k, _)| keys.contains(k))
        .map(|(k, v)| (k, f(v)))
        .collect()
}

impl Source {
    /// A ConfigMap's `data` and `binaryData`, restricted to `keys`. Labels, annotations and
    /// every other field are ignored, so changing them never changes the digest.
    pub fn from_config_map(cm: ConfigMap, keys: &KeySet) -> Self {
        Self {
            kind: SourceKind::ConfigMap,
            namespace: cm.metadata.namespace.unwrap_or_default(),
            name: cm.metadata.name.unwrap_or_default(),
            content: Some(Content {
                data: restrict(cm.data, keys, String::into_bytes),
                binary_data: restrict(cm.binary_data, keys, |b| b.0),
            }),
            secret_type: None,
        }
    }

    /// A Secret's `data`, restricted to `keys` (`stringData` is write-only and never read back).
    pub fn from_secret(secret: Secret, keys: &KeySet) -> Self {
        Self {
            kind: SourceKind::Secret,
            namespace: secret.metadata.namespace.unwrap_or_default(),
            name: secret.metadata.name.unwrap_or_default(),
            content: Some(Content {
                data: restrict(secret.data, keys, |b| b.0),
                binary_data: BTreeMap::new(),
            }),
            secret_type: secret.type_,
        }
    }

    /// A source that does not exist (an optional reference).
    pub fn absent(name: &SourceName, namespace: &str) -> Self {
        Self {
            kind: name.kind,
            namespace: namespace.to_string(),
            name: name.name.clone(),
            content: None,
            secret_type: None,
        }
    }

    /// Its kind and name.
    pub fn source_name(&self) -> SourceName {
        SourceName {
            kind: self.kind,
            name: self.name.clone(),
        }
    }
}

fn put_len(out: &mut impl FnMut(&[u8]), n: usize) {
    out(&(n as u64).to_be_bytes());
}

fn put_bytes(out: &mut impl FnMut(&[u8]), bytes: &[u8]) {
    put_len(out, bytes.len());
    out(bytes);
}

fn put_section(out: &mut impl FnMut(&[u8]), tag: u8, map: &BTreeMap<String, Vec<u8>>) {
    out(&[tag]);
    put_len(out, map.len());
    for (k, v) in map {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v);
    }
}

fn sorted(sources: &[Source]) -> Vec<&Source> {
    let mut sorted: Vec<&Source> = sources.iter().collect();
    sorted.sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));
    sorted
}

/// Streams the canonical encoding of `sources` (in sorted order, whatever the input order)
/// into `out`.
pub fn encode_into(sources: &[Source], mut out: impl FnMut(&[u8])) {
    out(MAGIC);
    put_len(&mut out, sources.len());
    for source in sorted(sources) {
        out(&[match source.kind {
            SourceKind::ConfigMap => 1,
            SourceKind::Secret => 2,
        }]);
        put_bytes(&mut out, source.namespace.as_bytes());
        put_bytes(&mut out, source.name.as_bytes());
        match &source.content {
            None => out(&[0]),
            Some(content) => {
                out(&[1]);
                put_section(&mut out, b'D', &content.data);
                put_section(&mut out, b'B', &content.binary_data);
            }
        }
    }
}

/// The canonical encoding of `sources` as one buffer.
pub fn encode(sources: &[Source]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(sources, |b| buf.extend_from_slice(b));
    buf
}

/// HMAC-SHA256 of the canonical encoding of `sources` under `key`, as 64 hex digits.
pub fn digest(key: &HashKey, sources: &[Source]) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&key.bytes) else {
        // HMAC takes keys of any length, so this branch is never taken.
        return String::new();
    };
    encode_into(sources, |b| mac.update(b));
    hex(&mac.finalize().into_bytes())
}

/// The digest of one source on its own under each of `keys`, as `(key id, digest)` in the
/// order of `keys`: what the source digest cache keeps.
pub fn digests_under(keys: &[&HashKey], source: &Source) -> Vec<(String, String)> {
    keys.iter()
        .map(|k| (k.id().to_string(), digest(k, std::slice::from_ref(source))))
        .collect()
}

/// The digest of each source on its own, by name: kept in memory so that the Event on a rolled
/// workload can say which source changed.
pub fn per_source(key: &HashKey, sources: &[Source]) -> BTreeMap<SourceName, String> {
    sources
        .iter()
        .map(|s| (s.source_name(), digest(key, std::slice::from_ref(s))))
        .collect()
}

/// The first bytes of the combined encoding ([`combine`]).
pub const MAGIC_COMBINED: &[u8] = b"appset.dev/config-hash/v2-combined\n";

/// One source's part of a combined digest: its kind, namespace and name and its own digest
/// ([`digest`] of that source alone, which covers its name and presence as well as its data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its own digest under the same key.
    pub digest: &'a str,
}

/// The workload digest the config rollout controller records: HMAC-SHA256 under `key` over the
/// magic [`MAGIC_COMBINED`], the number of parts, then each part sorted by kind, namespace and
/// name (a kind tag byte, then the namespace, name and digest, each length-prefixed).
///
/// Unlike [`digest`] it needs no source data, only each source's own digest, so a digest of
/// one source (kept in a cache while the source's `resourceVersion` stays the same) serves
/// every workload that uses it. Two different sets of sources still give different digests:
/// each part's own digest already covers its name and content, and the encoding is prefix-free.
pub fn combine(key: &HashKey, parts: &[Part<'_>]) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&key.bytes) else {
        return String::new();
    };
    let mut sorted: Vec<&Part<'_>> = parts.iter().collect();
    sorted.sort_by(|a, b| (a.kind, a.namespace, a.name).cmp(&(b.kind, b.namespace, b.name)));
    let mut out = |b: &[u8]| mac.update(b);
    out(MAGIC_COMBINED);
    put_len(&mut out, sorted.len());
    for part in sorted {
        out(&[match part.kind {
            SourceKind::ConfigMap => 1,
            SourceKind::Secret => 2,
        }]);
        put_bytes(&mut out, part.namespace.as_bytes());
        put_bytes(&mut out, part.name.as_bytes());
        put_bytes(&mut out, part.digest.as_bytes());
    }
    hex(&mac.finalize().into_bytes())
}

/// [`combine`] of `sources`, each hashed on its own first.
pub fn combined(key: &HashKey, sources: &[Source]) -> String {
    let own: Vec<String> = sources
        .iter()
        .map(|s| digest(key, std::slice::from_ref(s)))
        .collect();
    let parts: Vec<Part<'_>> = sources
        .iter()
        .zip(&own)
        .map(|(s, d)| Part {
            kind: s.kind,
            namespace: &s.namespace,
            name: &s.name,
            digest: d,
        })
        .collect();
    combine(key, &parts)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use std::collections::BTreeSet;

    fn key() -> HashKey {
        HashKey::new(vec![7; 32])
    }

    fn cm(name: &str, data: &[(&str, &str)], binary: &[(&str, &[u8])]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: (!data.is_empty()).then(|| {
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            binary_data: (!binary.is_empty()).then(|| {
                binary
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect()
            }),
            ..Default::default()
        }
    }

    fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn all(c: ConfigMap) -> Source {
        Source::from_config_map(c, &KeySet::All)
    }

    #[test]
    fn the_combined_digest_depends_on_every_source_and_not_on_their_order() {
        let a = all(cm("a", &[("k", "1")], &[]));
        let b = Source::from_secret(secret("b", &[("p", b"x")]), &KeySet::All);
        let both = combined(&key(), &[a.clone(), b.clone()]);
        assert_eq!(both, combined(&key(), &[b.clone(), a.clone()]));
        assert_ne!(both, combined(&key(), std::slice::from_ref(&a)));
        let a2 = all(cm("a", &[("k", "2")], &[]));
        assert_ne!(both, combined(&key(), &[a2, b.clone()]));
        let gone = Source::absent(&a.source_name(), "ns");
        assert_ne!(both, combined(&key(), &[gone, b.clone()]));
        assert_ne!(both, combined(&HashKey::new(vec![8; 32]), &[a, b]));
        assert_eq!(both.len(), 64);
    }

    #[test]
    fn digest_is_64_hex_digits_and_deterministic() {
        let s = [all(cm("a", &[("k", "v")], &[]))];
        let d = digest(&key(), &s);
        assert_eq!(d.len(), 64);
        assert!(d.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(d, digest(&key(), &s));
    }

    #[test]
    fn source_order_does_not_matter() {
        let a = all(cm("a", &[("k", "1")], &[]));
        let b = Source::from_secret(secret("a", &[("k", b"1")]), &KeySet::All);
        let c = all(cm("b", &[("k", "1")], &[]));
        let one = [a.clone(), b.clone(), c.clone()];
        let other = [c, a, b];
        assert_eq!(encode(&one), encode(&other));
        assert_eq!(digest(&key(), &one), digest(&key(), &other));
    }

    #[test]
    fn every_field_matters() {
        let base = encode(&[all(cm("a", &[("k", "v")], &[]))]);
        let variants = [
            encode(&[all(cm("a", &[("k", "w")], &[]))]),
            encode(&[all(cm("a", &[("K", "v")], &[]))]),
            encode(&[all(cm("b", &[("k", "v")], &[]))]),
            encode(&[Source::from_secret(
                secret("a", &[("k", b"v")]),
                &KeySet::All,
            )]),
            encode(&[Source {
                namespace: "other".into(),
                ..all(cm("a", &[("k", "v")], &[]))
            }]),
            encode(&[all(cm("a", &[], &[("k", b"v")]))]),
        ];
        for v in &variants {
            assert_ne!(&base, v);
        }
        let distinct: BTreeSet<&Vec<u8>> = variants.iter().collect();
        assert_eq!(distinct.len(), variants.len());
    }

    #[test]
    fn data_and_binary_data_are_distinguished() {
        let text = all(cm("a", &[("k", "v")], &[]));
        let binary = all(cm("a", &[], &[("k", b"v")]));
        assert_ne!(digest(&key(), &[text]), digest(&key(), &[binary]));
    }

    #[test]
    fn missing_empty_and_empty_value_are_distinguished() {
        let name = SourceName::config_map("a");
        let missing = Source::absent(&name, "ns");
        let empty = all(cm("a", &[], &[]));
        let empty_value = all(cm("a", &[("k", "")], &[]));
        let no_sources: [Source; 0] = [];
        let digests: BTreeSet<String> = [
            digest(&key(), &[missing]),
            digest(&key(), &[empty]),
            digest(&key(), &[empty_value]),
            digest(&key(), &no_sources),
        ]
        .into_iter()
        .collect();
        assert_eq!(digests.len(), 4);
    }

    #[test]
    fn boundaries_cannot_shift_between_fields() {
        // "ab"+"c" vs "a"+"bc" in key/value, and in name/namespace.
        let one = all(cm("a", &[("ab", "c")], &[]));
        let two = all(cm("a", &[("a", "bc")], &[]));
        assert_ne!(encode(&[one]), encode(&[two]));
        let s1 = Source {
            namespace: "n".into(),
            name: "sx".into(),
            kind: SourceKind::ConfigMap,
            content: None,
            secret_type: None,
        };
        let s2 = Source {
            namespace: "ns".into(),
            name: "x".into(),
            kind: SourceKind::ConfigMap,
            content: None,
            secret_type: None,
        };
        assert_ne!(encode(&[s1]), encode(&[s2]));
        // Two entries vs one entry whose value embeds the second.
        let two_entries = all(cm("a", &[("a", "1"), ("b", "2")], &[]));
        let one_entry = all(cm(
            "a",
            &[("a", "1\0\0\0\0\0\0\0\x01b\0\0\0\0\0\0\0\x012")],
            &[],
        ));
        assert_ne!(encode(&[two_entries]), encode(&[one_entry]));
    }

    #[test]
    fn the_encoding_is_exactly_as_documented() {
        let s = all(cm("n", &[("k", "v")], &[]));
        let mut expected = MAGIC.to_vec();
        expected.extend(1u64.to_be_bytes());
        expected.push(1);
        expected.extend(2u64.to_be_bytes());
        expected.extend(b"ns");
        expected.extend(1u64.to_be_bytes());
        expected.extend(b"n");
        expected.push(1);
        expected.push(b'D');
        expected.extend(1u64.to_be_bytes());
        expected.extend(1u64.to_be_bytes());
        expected.extend(b"k");
        expected.extend(1u64.to_be_bytes());
        expected.extend(b"v");
        expected.push(b'B');
        expected.extend(0u64.to_be_bytes());
        assert_eq!(encode(&[s]), expected);
    }

    #[test]
    fn only_used_keys_count() {
        let used = KeySet::Only(BTreeSet::from(["used".to_string()]));
        let before = Source::from_config_map(cm("a", &[("used", "1"), ("other", "1")], &[]), &used);
        let other_changed =
            Source::from_config_map(cm("a", &[("used", "1"), ("other", "2")], &[]), &used);
        let used_changed =
            Source::from_config_map(cm("a", &[("used", "2"), ("other", "1")], &[]), &used);
        assert_eq!(
            digest(&key(), std::slice::from_ref(&before)),
            digest(&key(), &[other_changed])
        );
        assert_ne!(digest(&key(), &[before]), digest(&key(), &[used_changed]));
    }

    #[test]
    fn metadata_does_not_count() {
        let mut labelled = cm("a", &[("k", "v")], &[]);
        labelled.metadata.labels = Some(BTreeMap::from([("x".into(), "y".into())]));
        labelled.metadata.resource_version = Some("42".into());
        assert_eq!(
            digest(&key(), &[all(labelled)]),
            digest(&key(), &[all(cm("a", &[("k", "v")], &[]))])
        );
    }

    #[test]
    fn the_digest_depends_on_the_key_and_is_not_a_plain_hash() {
        let s = [Source::from_secret(
            secret("s", &[("password", b"hunter2")]),
            &KeySet::All,
        )];
        let other = HashKey::new(vec![8; 32]);
        assert_ne!(digest(&key(), &s), digest(&other, &s));
        let plain = hex(&Sha256::digest(encode(&s)));
        assert_ne!(digest(&key(), &s), plain);
        assert_ne!(key().id(), other.id());
        assert_eq!(key().id().len(), 16);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = HashKey::new(b"super-secret-key-material".to_vec());
        let shown = format!("{k:?}");
        assert!(!shown.contains("super-secret"));
        assert!(shown.contains(k.id()));
    }

    #[test]
    fn per_source_digests_name_each_source() {
        let a = all(cm("a", &[("k", "1")], &[]));
        let b = Source::from_secret(secret("b", &[("k", b"1")]), &KeySet::All);
        let map = per_source(&key(), &[a.clone(), b]);
        assert_eq!(map.len(), 2);
        assert_eq!(map[&SourceName::config_map("a")], digest(&key(), &[a]));
    }
}
