//! Reading the verified JWT payload out of Envoy's dynamic metadata.
//!
//! Envoy's `jwt_authn` filter (before keymeter in the chain) verifies the token and, with
//! `payload_in_metadata`, stores its payload as a `google.protobuf.Struct` under
//! `filter_metadata[<namespace>][<payload_key>]`. Clients cannot write dynamic metadata,
//! so this is the one place claims may be trusted from (never a request header).
//!
//! What the proxy-wasm property API returns, measured in Envoy 1.40:
//! - `["metadata"]`: the whole `envoy.config.core.v3.Metadata` message, protobuf-encoded.
//! - A deeper path (`["metadata", "filter_metadata", ns, key, "sub"]`): a string leaf as
//!   its bare bytes, but a number as 8 little-endian f64 bytes, a bool as one byte, a
//!   struct or list in proxy-wasm's pair encoding: the type is lost, so an 8-character
//!   string claim and a numeric claim are indistinguishable.
//!
//! So the adapter reads `["metadata"]` once and this module walks the protobuf: one host
//! call for all claims, and the claim types are exact (a numeric `sub` is refused
//! instead of being misread as text). Only what the walk needs is decoded; unknown
//! fields are skipped, malformed input is an error, never a panic.

/// Wire types of the protobuf encoding.
const VARINT: u64 = 0;
const I64: u64 = 1;
const LEN: u64 = 2;
const I32: u64 = 5;

/// Field numbers, from the `.proto` files.
/// `envoy.config.core.v3.Metadata.filter_metadata` (map<string, Struct>).
const METADATA_FILTER_METADATA: u64 = 1;
/// Map entries: `key = 1`, `value = 2`.
const ENTRY_KEY: u64 = 1;
const ENTRY_VALUE: u64 = 2;
/// `google.protobuf.Struct.fields` (map<string, Value>).
const STRUCT_FIELDS: u64 = 1;
/// `google.protobuf.Value` oneof members.
const VALUE_STRING: u64 = 3;
const VALUE_STRUCT: u64 = 5;

/// The input is not a well-formed protobuf message of the expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One decoded field: its number and payload (LEN fields borrow from the input).
enum Wire<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(Malformed)?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed)
    }

    fn skip(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.buf.len() {
            return Err(Malformed);
        }
        let (taken, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(taken)
    }

    /// The next field, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>, Malformed> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let (number, wire) = (tag >> 3, tag & 7);
        if number == 0 {
            return Err(Malformed);
        }
        let value = match wire {
            VARINT => {
                self.varint()?;
                Wire::Scalar
            }
            I64 => {
                self.skip(8)?;
                Wire::Scalar
            }
            I32 => {
                self.skip(4)?;
                Wire::Scalar
            }
            LEN => {
                let n = usize::try_from(self.varint()?).map_err(|_| Malformed)?;
                Wire::Bytes(self.skip(n)?)
            }
            // Groups (3, 4) are not used by these messages; anything else is invalid.
            _ => return Err(Malformed),
        };
        Ok(Some((number, value)))
    }
}

/// The value of map entry `key` in the map field `map_field` of `message`: the LEN
/// payload of the entry's value (the last entry wins, as protobuf maps are parsed).
fn map_get<'a>(message: &'a [u8], map_field: u64, key: &str) -> Result<Option<&'a [u8]>, Malformed> {
    let mut found = None;
    let mut fields = Fields { buf: message };
    while let Some((number, wire)) = fields.next_field()? {
        let Wire::Bytes(entry) = wire else {
            if number == map_field {
                return Err(Malformed);
            }
            continue;
        };
        if number != map_field {
            continue;
        }
        let (mut k, mut v): (&[u8], &[u8]) = (b"", b"");
        let mut inner = Fields { buf: entry };
        while let Some((n, w)) = inner.next_field()? {
            match (n, w) {
                (ENTRY_KEY, Wire::Bytes(b)) => k = b,
                (ENTRY_VALUE, Wire::Bytes(b)) => v = b,
                (ENTRY_KEY | ENTRY_VALUE, Wire::Scalar) => return Err(Malformed),
                _ => {}
            }
        }
        if k == key.as_bytes() {
            found = Some(v);
        }
    }
    Ok(found)
}

/// A `google.protobuf.Value`, reduced to what claims mapping needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim<'a> {
    /// No such claim in the payload.
    Absent,
    String(&'a str),
    /// A number, bool, null, list or object: never used as a name.
    Other,
}

fn value_of(value: &[u8]) -> Result<Claim<'_>, Malformed> {
    // A oneof: the last member present wins; an empty Value is "kind not set".
    let mut out = Claim::Other;
    let mut fields = Fields { buf: value };
    while let Some((number, wire)) = fields.next_field()? {
        out = match (number, wire) {
            (VALUE_STRING, Wire::Bytes(b)) => Claim::String(std::str::from_utf8(b).map_err(|_| Malformed)?),
            _ => Claim::Other,
        };
    }
    Ok(out)
}

/// The verified JWT payload (a protobuf `Struct`), borrowed from the metadata bytes.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    fields: &'a [u8],
}

impl<'a> Payload<'a> {
    /// Finds the payload in the serialized `Metadata`; `Ok(None)` when there is none
    /// (no token on the request, or the route does not verify tokens).
    pub fn find(metadata: &'a [u8], namespace: &str, payload_key: &str) -> Result<Option<Payload<'a>>, Malformed> {
        let Some(ns) = map_get(metadata, METADATA_FILTER_METADATA, namespace)? else {
            return Ok(None);
        };
        let Some(value) = map_get(ns, STRUCT_FIELDS, payload_key)? else {
            return Ok(None);
        };
        // The payload must be a struct; anything else did not come from jwt_authn.
        let mut fields = Fields { buf: value };
        let mut payload = None;
        while let Some((number, wire)) = fields.next_field()? {
            payload = match (number, wire) {
                (VALUE_STRUCT, Wire::Bytes(b)) => Some(Payload { fields: b }),
                _ => None,
            };
        }
        payload.map(Some).ok_or(Malformed)
    }

    /// A top-level claim of the payload.
    pub fn claim(&self, name: &str) -> Result<Claim<'a>, Malformed> {
        match map_get(self.fields, STRUCT_FIELDS, name)? {
            Some(v) => value_of(v),
            None => Ok(Claim::Absent),
        }
    }
}

#[cfg(test)]
pub(crate) mod encode {
    //! A minimal protobuf encoder for the tests: builds `Metadata` messages the way
    //! Envoy serializes them.

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    pub fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(number << 3 | 2, &mut out);
        varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn entry(map_field: u64, key: &str, value: &[u8]) -> Vec<u8> {
        let mut e = len_field(1, key.as_bytes());
        e.extend(len_field(2, value));
        len_field(map_field, &e)
    }

    /// A JSON-ish value as a `google.protobuf.Value`.
    pub fn value(v: &serde_json::Value) -> Vec<u8> {
        use serde_json::Value as J;
        match v {
            J::Null => vec![0x08, 0x00],
            J::Bool(b) => vec![0x20, *b as u8],
            J::Number(n) => {
                let mut out = vec![0x11];
                out.extend(n.as_f64().unwrap().to_le_bytes());
                out
            }
            J::String(s) => len_field(3, s.as_bytes()),
            J::Object(_) => len_field(5, &strukt(v)),
            J::Array(a) => {
                let mut list = Vec::new();
                for item in a {
                    list.extend(len_field(1, &value(item)));
                }
                len_field(6, &list)
            }
        }
    }

    /// A JSON object as a `google.protobuf.Struct`.
    pub fn strukt(v: &serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, item) in v.as_object().unwrap() {
            out.extend(entry(1, k, &value(item)));
        }
        out
    }

    /// `Metadata{filter_metadata: {ns: {key: payload}}}`.
    pub fn metadata(ns: &str, key: &str, payload: &serde_json::Value) -> Vec<u8> {
        let ns_struct = strukt(&serde_json::json!({ key: payload }));
        entry(1, ns, &ns_struct)
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;
    use serde_json::json;

    const NS: &str = "envoy.filters.http.jwt_authn";

    /// Bytes Envoy 1.40 returned for `get_property(["metadata"])` after jwt_authn had
    /// verified {"iss","aud","sub":"user-42","plan":"pro","exp","n":7,"nested":{"a":"b"},
    /// "flag":true,"arr":["x","y"]} with `payload_in_metadata: jwt_payload` (recorded
    /// with a probe filter in real Envoy).
    const ENVOY_METADATA: &str = "0ae9010a1c656e766f792e66696c746572732e687474702e6a77745f617574686e12c8010ac5010a0b6a77745f7061796c6f616412b5012ab2010a0a0a04666c6167120220010a160a066e6573746564120c2a0a0a080a016112031a01620a0d0a04706c616e12051a0370726f0a130a03617272120c320a0a031a01780a031a01790a160a03617564120f1a0d6b65796d657465722d746573740a1c0a0369737312151a1368747470733a2f2f6973737565722e746573740a100a036578701209110000808759c4da410a100a0373756212091a07757365722d34320a0e0a016e1209110000000000001c40";

    #[test]
    fn reads_claims_from_what_envoy_returns() {
        let bytes = hex::decode(ENVOY_METADATA).unwrap();
        let p = Payload::find(&bytes, NS, "jwt_payload").unwrap().unwrap();
        assert_eq!(p.claim("sub").unwrap(), Claim::String("user-42"));
        assert_eq!(p.claim("plan").unwrap(), Claim::String("pro"));
        assert_eq!(p.claim("iss").unwrap(), Claim::String("https://issuer.test"));
        // Typed: numbers, bools, objects and lists are not strings.
        for name in ["n", "exp", "flag", "nested", "arr"] {
            assert_eq!(p.claim(name).unwrap(), Claim::Other, "{name}");
        }
        assert_eq!(p.claim("missing").unwrap(), Claim::Absent);
        assert_eq!(p.claim("a").unwrap(), Claim::Absent, "nested claims are not top-level");
        assert!(Payload::find(&bytes, NS, "other_key").unwrap().is_none());
        assert!(Payload::find(&bytes, "other.namespace", "jwt_payload")
            .unwrap()
            .is_none());
    }

    #[test]
    fn no_metadata_is_no_payload() {
        assert!(Payload::find(b"", NS, "p").unwrap().is_none());
    }

    #[test]
    fn own_encoder_matches_envoy() {
        let p = json!({"sub": "user-42", "n": 7});
        let bytes = metadata(NS, "jwt_payload", &p);
        let found = Payload::find(&bytes, NS, "jwt_payload").unwrap().unwrap();
        assert_eq!(found.claim("sub").unwrap(), Claim::String("user-42"));
        assert_eq!(found.claim("n").unwrap(), Claim::Other);
    }

    #[test]
    fn other_namespaces_and_unknown_fields_are_skipped() {
        let mut bytes = metadata("envoy.filters.http.other", "jwt_payload", &json!({"sub": "evil"}));
        // typed_filter_metadata (field 2) and an unknown varint field.
        bytes.extend(len_field(2, b"\x0a\x03abc"));
        bytes.extend([0x18, 0x96, 0x01]);
        bytes.extend(metadata(NS, "jwt_payload", &json!({"sub": "good"})));
        let p = Payload::find(&bytes, NS, "jwt_payload").unwrap().unwrap();
        assert_eq!(p.claim("sub").unwrap(), Claim::String("good"));
    }

    #[test]
    fn last_map_entry_wins_like_protobuf() {
        let mut bytes = metadata(NS, "jwt_payload", &json!({"sub": "first"}));
        bytes.extend(metadata(NS, "jwt_payload", &json!({"sub": "second"})));
        let p = Payload::find(&bytes, NS, "jwt_payload").unwrap().unwrap();
        assert_eq!(p.claim("sub").unwrap(), Claim::String("second"));
    }

    #[test]
    fn a_payload_that_is_not_a_struct_is_malformed() {
        let bytes = metadata(NS, "jwt_payload", &json!("a string"));
        assert_eq!(Payload::find(&bytes, NS, "jwt_payload").unwrap_err(), Malformed);
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let bytes = hex::decode(ENVOY_METADATA).unwrap();
        for n in 0..bytes.len() {
            // Every prefix either parses or is refused; none panics.
            if let Ok(Some(p)) = Payload::find(&bytes[..n], NS, "jwt_payload") {
                let _ = p.claim("sub");
            }
        }
        for garbage in [
            &b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            b"\x0b",
            b"\x00",
            b"\x0a\xff\x01",
        ] {
            assert!(Payload::find(garbage, NS, "p").is_err(), "{garbage:?}");
        }
        // Invalid UTF-8 in a string claim.
        let value = len_field(3, b"\xff\xfe");
        let mut entry = len_field(1, b"sub");
        entry.extend(len_field(2, &value));
        let fields = len_field(1, &entry);
        let p = Payload { fields: &fields };
        assert_eq!(p.claim("sub").unwrap_err(), Malformed);
    }

    #[test]
    fn mutated_envoy_bytes_never_panic() {
        // Deterministic xorshift: 20 000 copies of the recorded bytes with 1-4 bytes
        // overwritten; each parses or is refused, and a found claim is valid UTF-8.
        let base = hex::decode(ENVOY_METADATA).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut m = base.clone();
            for _ in 0..=(next() % 4) {
                let i = (next() % m.len() as u64) as usize;
                m[i] = next() as u8;
            }
            if let Ok(Some(p)) = Payload::find(&m, NS, "jwt_payload") {
                for name in ["sub", "plan", "nested", "n"] {
                    if let Ok(Claim::String(s)) = p.claim(name) {
                        assert!(std::str::from_utf8(s.as_bytes()).is_ok());
                    }
                }
            }
        }
    }
}
