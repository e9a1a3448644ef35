//! Keeping values that may be secrets out of error bodies, status and logs.
//!
//! Two leaks are closed here: serde's messages quote the offending string value
//! (`invalid type: string "s3cr3t", expected u64`), and a pull or export URL may carry
//! a credential in its query string (`/keyset.json?token=...`). Field names, positions
//! and numbers stay: they are what an operator needs to fix the document.

use std::borrow::Cow;

/// What replaces a removed query string.
pub const REDACTED_QUERY: &str = "?<redacted>";

/// `http://<authority><path>` for humans, with any query string replaced by
/// [`REDACTED_QUERY`] (the real path is still what is requested).
pub fn display_url(authority: &str, path: &str) -> String {
    match path.split_once('?') {
        Some((p, _)) => format!("http://{authority}{p}{REDACTED_QUERY}"),
        None => format!("http://{authority}{path}"),
    }
}

/// `message` with every quoted string value serde put in it (`string "…"`) replaced
/// by `a string`. Borrows when there is none.
pub fn serde_values(message: &str) -> Cow<'_, str> {
    const MARK: &str = "string \"";
    if !message.contains(MARK) {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        // serde writes the value with Debug escaping: skip to the unescaped closing quote.
        let value = &rest[at + MARK.len()..];
        let mut end = value.len();
        let mut escaped = false;
        for (i, c) in value.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_query() {
        assert_eq!(
            display_url("keys.internal", "/keyset.json"),
            "http://keys.internal/keyset.json"
        );
        assert_eq!(
            display_url("keys.internal", "/keyset.json?token=abc&x=1"),
            "http://keys.internal/keyset.json?<redacted>"
        );
        assert_eq!(display_url("a", "/?"), "http://a/?<redacted>");
    }

    #[test]
    fn serde_string_values_are_removed() {
        let doc: Result<u64, _> = serde_json::from_str(r#""s3cr3t \"quoted\" ✓""#);
        let msg = doc.unwrap_err().to_string();
        assert!(msg.contains("s3cr3t"), "serde quotes the value: {msg}");
        let clean = serde_values(&msg);
        assert!(!clean.contains("s3cr3t") && !clean.contains("quoted"), "{clean}");
        assert!(clean.starts_with("invalid type: a string, expected u64"), "{clean}");
        assert_eq!(
            serde_values(r#"x string "a" y string "b\\" z"#),
            "x a string y a string z"
        );
        assert!(matches!(
            serde_values("unknown field `kyes` at line 1"),
            Cow::Borrowed(_)
        ));
        assert_eq!(serde_values(r#"string "unterminated"#), "a string");
    }
}
