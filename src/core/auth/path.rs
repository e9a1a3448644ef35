//! The request path that scopes and route costs are matched against.
//!
//! keymeter must be safe whatever the HTTP connection manager does (`normalize_path` is
//! off by default in Envoy, and even on it leaves `;` path parameters alone, which
//! Tomcat and Spring strip: `/v1/public/..;/admin`). The backend receives the raw
//! `:path`, and servers disagree on what several forms mean, so for a rule to hold,
//! keymeter must match exactly the resource the backend will serve. Two cases:
//!
//! - **Unambiguous, canonicalised**: percent-encoded *unreserved* characters
//!   (`A-Z a-z 0-9 - . _ ~`) mean the same as the characters themselves (RFC 3986
//!   2.3, every server agrees), so `/v1/%72eports` is matched as `/v1/reports`.
//!   Hex digits of other escapes are upper-cased (`%c3` = `%C3`).
//! - **Ambiguous, refused** ([`Ambiguity`]): dot segments (`.`, `..`, also spelt
//!   `%2e`), empty segments (`//`), `;` path parameters (raw or `%3b`), encoded
//!   separators (`%2f`, `%5c`), a raw backslash, `%00` and broken escapes. Whether a
//!   backend resolves, collapses, strips or decodes these differs between servers
//!   (and their settings); no canonical form picked here is right for all of them, so
//!   the only safe answer is to refuse the request (403) when a rule depends on its path.
//!
//! The query and fragment are not part of the path and are dropped.

use std::borrow::Cow;

/// Why a path has no single meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// A `.` or `..` segment (possibly percent-encoded): resolved differently, or not at all.
    DotSegment,
    /// `//`: some servers collapse it, others keep an empty segment.
    EmptySegment,
    /// `;` (or `%3b`): path parameters, stripped by some servers (`..;/`).
    PathParameter,
    /// `%2f` or `%5c`: a slash that some servers decode into a separator.
    EncodedSeparator,
    /// A raw `\`: a separator on some servers.
    Backslash,
    /// `%` not followed by two hex digits, or an encoded NUL.
    BadEscape,
}

impl Ambiguity {
    /// For logs and problem details: says which form was refused, never the path.
    pub fn describe(self) -> &'static str {
        match self {
            Ambiguity::DotSegment => "a '.' or '..' path segment",
            Ambiguity::EmptySegment => "an empty path segment ('//')",
            Ambiguity::PathParameter => "a ';' path parameter",
            Ambiguity::EncodedSeparator => "an encoded '/' or '\\' (%2F, %5C)",
            Ambiguity::Backslash => "a backslash",
            Ambiguity::BadEscape => "an invalid percent-escape",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The path part of `:path` (before `?` or `#`) in the canonical form scopes and
/// route costs are matched on, or why it has none. Borrows when nothing needs
/// decoding (the common case: no allocation).
pub fn canonical(raw: &str) -> Result<Cow<'_, str>, Ambiguity> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let bytes = path.as_bytes();
    // First pass: find the forms we refuse and whether anything must be rewritten.
    let mut rewrite = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(Ambiguity::Backslash),
            b';' => return Err(Ambiguity::PathParameter),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(Ambiguity::BadEscape);
                };
                match h << 4 | l {
                    0 => return Err(Ambiguity::BadEscape),
                    b'/' | b'\\' => return Err(Ambiguity::EncodedSeparator),
                    b';' => return Err(Ambiguity::PathParameter),
                    b if is_unreserved(b) => rewrite = true,
                    _ => rewrite |= bytes[i + 1].is_ascii_lowercase() || bytes[i + 2].is_ascii_lowercase(),
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let out: Cow<'_, str> = if rewrite {
        let mut s = String::with_capacity(path.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                // Checked above: two hex digits follow.
                let b = hex(bytes[i + 1]).unwrap_or(0) << 4 | hex(bytes[i + 2]).unwrap_or(0);
                if is_unreserved(b) {
                    s.push(b as char);
                } else {
                    s.push('%');
                    s.push(bytes[i + 1].to_ascii_uppercase() as char);
                    s.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
            } else {
                // Runs of other bytes are copied whole, so multi-byte UTF-8 stays intact.
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'%')
                    .map_or(bytes.len(), |p| i + p);
                s.push_str(&path[i..end]);
                i = end;
            }
        }
        Cow::Owned(s)
    } else {
        Cow::Borrowed(path)
    };
    // Segments of the decoded path (a trailing '/' is an empty last segment: allowed).
    if let Some(rest) = out.strip_prefix('/') {
        let mut segments = rest.split('/').peekable();
        while let Some(seg) = segments.next() {
            match seg {
                "." | ".." => return Err(Ambiguity::DotSegment),
                "" if segments.peek().is_some() => return Err(Ambiguity::EmptySegment),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// The path a request's scopes and route costs are matched on: [`canonical`] when
/// `has_rules` (the key has scopes or its plan has route costs), else `raw` untouched:
/// with no path rule there is nothing to dodge, and the backend decides alone.
pub fn for_rules(raw: &str, has_rules: bool) -> Result<Cow<'_, str>, Ambiguity> {
    if has_rules {
        canonical(raw)
    } else {
        Ok(Cow::Borrowed(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ambiguity::*;

    fn ok(raw: &str) -> String {
        canonical(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}")).into_owned()
    }

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/v1",
            "/v1/reports",
            "/v1/reports/",
            "/v1/a-b_c.d~e",
            "/v1/a.json",
            "/v1/...",
            "/v1/.well-known",
            "/v1/%20x",
            "/v1/caf%C3%A9",
            "/v1/✓",
            "*",
        ] {
            let c = canonical(p).unwrap();
            assert!(matches!(c, Cow::Borrowed(_)), "{p} allocated");
            assert_eq!(c, p);
        }
    }

    #[test]
    fn query_and_fragment_are_not_part_of_the_path() {
        assert_eq!(ok("/v1/reports?x=/../..;%2f"), "/v1/reports");
        assert_eq!(ok("/v1/reports#frag/.."), "/v1/reports");
        assert_eq!(ok("/v1?"), "/v1");
        assert_eq!(ok(""), "");
    }

    #[test]
    fn encoded_unreserved_characters_are_decoded() {
        assert_eq!(ok("/v1/%72eports"), "/v1/reports");
        assert_eq!(ok("/v1/%52%45PORTS"), "/v1/REPORTS");
        assert_eq!(ok("/%76%31/reports"), "/v1/reports");
        assert_eq!(ok("/v1/%7euser"), "/v1/~user");
        assert_eq!(ok("/v1/a%2Ejson"), "/v1/a.json");
        assert_eq!(ok("/v1/a%2d%5F"), "/v1/a-_");
        // other escapes stay escaped, hex upper-cased; UTF-8 around them intact
        assert_eq!(ok("/v1/a%20b"), "/v1/a%20b");
        assert_eq!(ok("/v1/caf%c3%a9"), "/v1/caf%C3%A9");
        assert_eq!(ok("/v1/✓%41✓"), "/v1/✓A✓");
        assert_eq!(ok("/v1/%3F%23%2525"), "/v1/%3F%23%2525");
    }

    #[test]
    fn dot_segments_are_refused_raw_and_encoded() {
        for p in [
            "/v1/../admin",
            "/v1/./reports",
            "/..",
            "/.",
            "/v1/reports/..",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/%2e/reports",
            "/v1/reports/%2e%2e",
            "/v1/..?x",
        ] {
            assert_eq!(canonical(p), Err(DotSegment), "{p}");
        }
    }

    #[test]
    fn empty_segments_are_refused_but_a_trailing_slash_is_not() {
        for p in ["//v1/reports", "/v1//reports", "/v1/reports//", "///"] {
            assert_eq!(canonical(p), Err(EmptySegment), "{p}");
        }
        assert_eq!(ok("/v1/reports/"), "/v1/reports/");
        assert_eq!(ok("/"), "/");
    }

    #[test]
    fn path_parameters_are_refused() {
        for p in [
            "/v1/reports;x",
            "/v1/public/..;/admin",
            "/v1;/reports",
            "/;",
            "/v1/reports%3bx",
            "/v1/%3B",
        ] {
            assert_eq!(canonical(p), Err(PathParameter), "{p}");
        }
        // in the query a ';' is just a character
        assert_eq!(ok("/v1/reports?a=1;b=2"), "/v1/reports");
    }

    #[test]
    fn encoded_separators_and_backslashes_are_refused() {
        for p in [
            "/v1%2freports",
            "/v1%2Freports",
            "/v1/..%2fadmin",
            "/v1%5creports",
            "/v1%5C..%5Cadmin",
        ] {
            assert_eq!(canonical(p), Err(EncodedSeparator), "{p}");
        }
        for p in ["/v1\\reports", "\\v1", "/v1/..\\admin"] {
            assert_eq!(canonical(p), Err(Backslash), "{p}");
        }
    }

    #[test]
    fn only_paths_that_rules_depend_on_are_checked() {
        assert_eq!(for_rules("/v1/..;/admin", false).unwrap(), "/v1/..;/admin");
        assert_eq!(for_rules("/v1/..;/admin", true), Err(PathParameter));
        assert_eq!(for_rules("/v1/%72?q", true).unwrap(), "/v1/r");
    }

    #[test]
    fn broken_escapes_and_nul_are_refused() {
        for p in ["/v1/%", "/v1/%2", "/v1/%zz", "/v1/%g0", "/v1/%00", "/v1/%%41"] {
            assert_eq!(canonical(p), Err(BadEscape), "{p}");
        }
    }

    /// Every canonical path is a fixed point, and never contains a refused form: what
    /// was matched is what a second decoding (by a proxy or the backend) would see.
    #[test]
    fn canonical_form_is_stable() {
        let alphabet = [
            "/", "a", ".", "%2e", "%2E", "%41", "%7e", "%20", "%c3", ";", "%2f", "\\", "%", "?", "~",
        ];
        let mut checked = 0;
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    for d in alphabet {
                        let p = format!("/{a}{b}{c}{d}");
                        if let Ok(c1) = canonical(&p) {
                            let c2 = canonical(&c1).expect("canonical form refused");
                            assert_eq!(c1, c2, "{p}");
                            assert!(!c1.contains(';') && !c1.contains('\\') && !c1.contains("//"), "{p}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 1000);
    }
}
