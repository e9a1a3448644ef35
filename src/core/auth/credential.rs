//! Finding the caller's key in a request.
//!
//! Sources are tried in a fixed order (API-key header, `Authorization: Bearer`,
//! `Authorization: Basic`, query parameter) and the first one *present* decides: a
//! malformed key there is an error even if another source holds a good one, so a
//! request never authenticates in a way its sender did not obviously intend.

use crate::core::auth::api_key::{ApiKey, KeyFormatError, ID_LEN, KEY_LEN, PREFIX};
use base64::Engine;

/// Which sources are enabled; built from the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSources {
    /// Header carrying the bare key, lowercase (`x-api-key` by default); `None` disables.
    pub header: Option<String>,
    pub bearer: bool,
    pub basic: bool,
    /// Query parameter carrying the key; off by default because URLs end up in logs.
    pub query_param: Option<String>,
}

impl Default for CredentialSources {
    fn default() -> Self {
        CredentialSources {
            header: Some("x-api-key".into()),
            bearer: true,
            basic: true,
            query_param: None,
        }
    }
}

/// Where a credential was found, so the adapter knows what to strip before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Bearer,
    Basic,
    Query,
}

/// A request field a credential may come from; the adapter fetches each only when the
/// order below reaches it, so a request with `x-api-key` costs one header read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    ApiKeyHeader,
    Authorization,
    Path,
}

/// Why no usable key was found. None of the variants carries key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    Missing,
    Malformed(Source),
    BadChecksum(Source),
}

/// A found key, copied into a fixed buffer (no allocation; the request's header strings
/// are gone once the adapter's call returns).
#[derive(Clone, Copy)]
pub struct Credential {
    pub source: Source,
    buf: [u8; KEY_LEN],
}

impl Credential {
    pub fn key(&self) -> ApiKey<'_> {
        // The buffer was filled from a key that parsed, so it is ASCII and valid.
        let s = std::str::from_utf8(&self.buf).expect("validated ascii");
        ApiKey::parse(s).expect("validated key")
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({:?}, {:?})", self.source, self.key())
    }
}

/// Finds the caller's key according to `sources`, asking `fetch` for request fields
/// lazily (only enabled sources, and only until one is present).
pub fn find(
    sources: &CredentialSources,
    mut fetch: impl FnMut(Field) -> Option<String>,
) -> Result<Credential, CredentialError> {
    if sources.header.is_some() {
        if let Some(v) = fetch(Field::ApiKeyHeader) {
            return from_text(v.trim(), Source::Header);
        }
    }
    if sources.bearer || sources.basic {
        if let Some(auth) = fetch(Field::Authorization) {
            let auth = auth.trim();
            let (scheme, rest) = auth.split_once(' ').unwrap_or((auth, ""));
            let rest = rest.trim_start();
            if sources.bearer && scheme.eq_ignore_ascii_case("bearer") {
                return from_text(rest, Source::Bearer);
            }
            if sources.basic && scheme.eq_ignore_ascii_case("basic") {
                return from_basic(rest);
            }
            // Other schemes (or disabled ones) belong to someone else: ignore them.
        }
    }
    if let Some(name) = &sources.query_param {
        if let Some(path) = fetch(Field::Path) {
            if let Some(v) = query_value(&path, name) {
                return from_text(v, Source::Query);
            }
        }
    }
    Err(CredentialError::Missing)
}

fn from_text(text: &str, source: Source) -> Result<Credential, CredentialError> {
    match ApiKey::parse(text) {
        Ok(_) => {
            let mut buf = [0u8; KEY_LEN];
            buf.copy_from_slice(text.as_bytes());
            Ok(Credential { source, buf })
        }
        Err(KeyFormatError::Malformed) => Err(CredentialError::Malformed(source)),
        Err(KeyFormatError::BadChecksum) => Err(CredentialError::BadChecksum(source)),
    }
}

/// Basic auth accepts three spellings, covering what real clients can be told to do:
/// `id:secret` (key id as user, the part after the second `_` as password), `key:` (whole
/// key as user, Stripe style) and `anything:key` (whole key as password).
fn from_basic(b64: &str) -> Result<Credential, CredentialError> {
    let malformed = Err(CredentialError::Malformed(Source::Basic));
    // Any valid spelling decodes to < 2 keys' worth; refuse to decode more.
    if b64.len() > 4 * (2 * KEY_LEN + 64) / 3 {
        return malformed;
    }
    let mut raw = [0u8; 2 * KEY_LEN + 64];
    let n = match base64::engine::general_purpose::STANDARD.decode_slice(b64, &mut raw) {
        Ok(n) => n,
        Err(_) => return malformed,
    };
    let Ok(text) = std::str::from_utf8(&raw[..n]) else {
        return malformed;
    };
    let Some((user, pass)) = text.split_once(':') else {
        return malformed;
    };
    if pass.is_empty() {
        return from_text(user, Source::Basic);
    }
    if pass.len() == KEY_LEN && pass.starts_with(PREFIX) {
        return from_text(pass, Source::Basic);
    }
    if user.len() != ID_LEN || pass.len() != KEY_LEN - PREFIX.len() - ID_LEN - 1 {
        return malformed;
    }
    let mut buf = [0u8; KEY_LEN];
    let mut at = 0;
    for part in [PREFIX, user, "_", pass] {
        buf[at..at + part.len()].copy_from_slice(part.as_bytes());
        at += part.len();
    }
    match std::str::from_utf8(&buf) {
        Ok(s) => from_text(s, Source::Basic),
        Err(_) => malformed,
    }
}

/// The raw value of query parameter `name` in `path`, if present. Keys are base62, so
/// a percent-encoded value is not a key and is left for `ApiKey::parse` to reject.
pub fn query_value<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// `path` without any `name=` query parameter, so the key does not reach the backend.
pub fn strip_query_param(path: &str, name: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    if kept.is_empty() || kept == [""] {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::auth::api_key::assemble;

    fn key() -> String {
        assemble("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJkl")
    }
    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }
    fn all() -> CredentialSources {
        CredentialSources {
            query_param: Some("api_key".into()),
            ..Default::default()
        }
    }
    #[derive(Default)]
    struct RequestFields<'a> {
        api_key_header: Option<&'a str>,
        authorization: Option<&'a str>,
        path: Option<&'a str>,
    }
    fn run(sources: &CredentialSources, req: &RequestFields<'_>) -> Result<Credential, CredentialError> {
        find(sources, |f| {
            match f {
                Field::ApiKeyHeader => req.api_key_header,
                Field::Authorization => req.authorization,
                Field::Path => req.path,
            }
            .map(str::to_string)
        })
    }
    fn found(req: RequestFields<'_>) -> (Source, String) {
        let c = run(&all(), &req).unwrap();
        (c.source, c.key().as_str().to_string())
    }

    #[test]
    fn header_bearer_basic_query() {
        let k = key();
        assert_eq!(
            found(RequestFields {
                api_key_header: Some(&k),
                ..Default::default()
            }),
            (Source::Header, k.clone())
        );
        let auth = format!("Bearer {k}");
        assert_eq!(
            found(RequestFields {
                authorization: Some(&auth),
                ..Default::default()
            }),
            (Source::Bearer, k.clone())
        );
        let auth = format!("bearer   {k} ");
        assert_eq!(
            found(RequestFields {
                authorization: Some(&auth),
                ..Default::default()
            })
            .0,
            Source::Bearer
        );
        let path = format!("/x?a=1&api_key={k}&b=2");
        assert_eq!(
            found(RequestFields {
                path: Some(&path),
                ..Default::default()
            }),
            (Source::Query, k.clone())
        );
    }

    #[test]
    fn basic_spellings() {
        let k = key();
        let (id, secret) = (&k[3..15], &k[16..]);
        for user_pass in [format!("{id}:{secret}"), format!("{k}:"), format!("apikey:{k}")] {
            let auth = format!("Basic {}", b64(&user_pass));
            assert_eq!(
                found(RequestFields {
                    authorization: Some(&auth),
                    ..Default::default()
                }),
                (Source::Basic, k.clone())
            );
        }
        for bad in [
            "Basic !!!",
            "Basic ",
            &format!("Basic {}", b64("nocolon")),
            &format!("Basic {}", b64("a:b")),
        ] {
            let r = run(
                &all(),
                &RequestFields {
                    authorization: Some(bad),
                    ..Default::default()
                },
            );
            assert_eq!(r.unwrap_err(), CredentialError::Malformed(Source::Basic), "{bad}");
        }
        let huge = format!("Basic {}", "QUFB".repeat(1000));
        assert!(run(
            &all(),
            &RequestFields {
                authorization: Some(&huge),
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn first_present_source_decides() {
        let k = key();
        let auth = format!("Bearer {k}");
        let r = run(
            &all(),
            &RequestFields {
                api_key_header: Some("nope"),
                authorization: Some(&auth),
                path: None,
            },
        );
        assert_eq!(r.unwrap_err(), CredentialError::Malformed(Source::Header));
    }

    #[test]
    fn foreign_or_disabled_schemes_are_ignored() {
        let k = key();
        let auth = format!("Bearer {k}");
        let no_bearer = CredentialSources { bearer: false, ..all() };
        assert_eq!(
            run(
                &no_bearer,
                &RequestFields {
                    authorization: Some(&auth),
                    ..Default::default()
                }
            )
            .unwrap_err(),
            CredentialError::Missing
        );
        let r = run(
            &all(),
            &RequestFields {
                authorization: Some("Digest abc"),
                ..Default::default()
            },
        );
        assert_eq!(r.unwrap_err(), CredentialError::Missing);
        let no_query = CredentialSources::default();
        let path = format!("/x?api_key={k}");
        assert_eq!(
            run(
                &no_query,
                &RequestFields {
                    path: Some(&path),
                    ..Default::default()
                }
            )
            .unwrap_err(),
            CredentialError::Missing
        );
    }

    #[test]
    fn typo_is_bad_checksum() {
        let mut k = key();
        k.replace_range(20..21, "Z");
        let r = run(
            &all(),
            &RequestFields {
                api_key_header: Some(&k),
                ..Default::default()
            },
        );
        assert_eq!(r.unwrap_err(), CredentialError::BadChecksum(Source::Header));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // xorshift: deterministic junk, biased towards the characters the parsers care about
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let alphabet = "km_aZ09:=&?/ %\u{fffd}é\u{0}Bearer Basic QUFB=";
        let chars: Vec<char> = alphabet.chars().collect();
        for _ in 0..20_000 {
            let mut sample = String::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for i in 0..(x % 80) {
                sample.push(chars[((x >> (i % 50)) as usize + i as usize) % chars.len()]);
            }
            let _ = ApiKey::parse(&sample);
            let _ = run(
                &all(),
                &RequestFields {
                    api_key_header: Some(&sample),
                    ..Default::default()
                },
            );
            let auth = format!("Basic {sample}");
            let _ = run(
                &all(),
                &RequestFields {
                    authorization: Some(&auth),
                    ..Default::default()
                },
            );
            let _ = run(
                &all(),
                &RequestFields {
                    authorization: Some(&sample),
                    path: Some(&sample),
                    ..Default::default()
                },
            );
            let _ = strip_query_param(&sample, "api_key");
        }
    }

    #[test]
    fn query_helpers() {
        assert_eq!(query_value("/a?x=1&api_key=v#f", "api_key"), Some("v"));
        assert_eq!(query_value("/a?api_keyx=1", "api_key"), None);
        assert_eq!(strip_query_param("/a?x=1&api_key=v&y=2", "api_key"), "/a?x=1&y=2");
        assert_eq!(strip_query_param("/a?api_key=v", "api_key"), "/a");
        assert_eq!(strip_query_param("/a", "api_key"), "/a");
    }
}
