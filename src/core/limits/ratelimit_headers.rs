//! Values of the IETF `RateLimit-Policy` and `RateLimit` response header fields, in the
//! syntax of draft-ietf-httpapi-ratelimit-headers-10.
//!
//! Both fields are Structured Field Lists (RFC 9651) whose members are sf-string Items
//! naming a policy, with Integer parameters:
//!
//! ```text
//! RateLimit-Policy: "burst";q=100;w=60, "day";q=1000;w=86400
//! RateLimit: "burst";r=50;t=30
//! ```
//!
//! The writers append to a caller-provided `String`, so a caller can render both fields
//! into buffers sized once for the common case.

use core::fmt::Write;

/// Largest value an sf-integer may carry (15 digits, RFC 9651 section 3.3.1).
pub const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Appends the `RateLimit-Policy` value for `policies`, each `(name, quota, window_secs)`
/// becoming `"name";q=quota;w=window_secs`, separated by `", "`.
///
/// Tells clients the limits they are subject to so they can pace themselves. Numbers above
/// [`SF_INTEGER_MAX`] are clamped to it so the field stays parseable; names are escaped
/// as in [`push_sf_string`]. An empty slice appends nothing: the field must be a non-empty
/// list, so the caller should then omit the header.
pub fn push_ratelimit_policy(out: &mut String, policies: &[(&str, u64, u64)]) {
    push_list(out, policies, "q", "w");
}

/// Appends the `RateLimit` value for `limits`, each `(name, remaining, reset_secs)`
/// becoming `"name";r=remaining;t=reset_secs`, separated by `", "`.
///
/// Tells clients how much of each policy is left and when more becomes available (the
/// draft's `t`: seconds until additional quota is available — for a token bucket that is
/// the time to the next token, for a calendar quota the time to the period end). Same
/// clamping, escaping and empty-slice rules as [`push_ratelimit_policy`].
pub fn push_ratelimit(out: &mut String, limits: &[(&str, u64, u64)]) {
    push_list(out, limits, "r", "t");
}

/// Appends `s` as an sf-string: in double quotes, with `"` and `\` backslash-escaped and
/// every character outside printable ASCII (0x20..=0x7E) dropped.
///
/// Policy names come from configuration; a stray quote, control character or non-ASCII
/// letter must not make the whole header field invalid.
pub fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

/// Appends `"name";{first}=a;{second}=b` items separated by `", "`.
fn push_list(out: &mut String, items: &[(&str, u64, u64)], first: &str, second: &str) {
    for (i, &(name, a, b)) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_sf_string(out, name);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            ";{first}={};{second}={}",
            a.min(SF_INTEGER_MAX),
            b.min(SF_INTEGER_MAX)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(items: &[(&str, u64, u64)]) -> String {
        let mut s = String::new();
        push_ratelimit_policy(&mut s, items);
        s
    }

    fn limit(items: &[(&str, u64, u64)]) -> String {
        let mut s = String::new();
        push_ratelimit(&mut s, items);
        s
    }

    #[test]
    fn policy_single_and_multiple() {
        assert_eq!(policy(&[("default", 100, 10)]), r#""default";q=100;w=10"#);
        assert_eq!(
            policy(&[("burst", 100, 60), ("day", 1000, 86_400)]),
            r#""burst";q=100;w=60, "day";q=1000;w=86400"#
        );
        assert_eq!(
            policy(&[("a", 1, 1), ("b", 2, 2), ("c", 0, 3)]),
            r#""a";q=1;w=1, "b";q=2;w=2, "c";q=0;w=3"#
        );
    }

    #[test]
    fn ratelimit_single_and_multiple() {
        assert_eq!(limit(&[("burst", 50, 30)]), r#""burst";r=50;t=30"#);
        assert_eq!(
            limit(&[("burst", 0, 1), ("month", 123_456, 2_592_000)]),
            r#""burst";r=0;t=1, "month";r=123456;t=2592000"#
        );
    }

    #[test]
    fn appends_to_existing_content() {
        let mut s = String::from("RateLimit: ");
        push_ratelimit(&mut s, &[("x", 1, 2)]);
        assert_eq!(s, r#"RateLimit: "x";r=1;t=2"#);
        let mut s = String::from("keep");
        push_ratelimit_policy(&mut s, &[]);
        push_ratelimit(&mut s, &[]);
        assert_eq!(s, "keep");
    }

    #[test]
    fn names_are_escaped_and_filtered() {
        assert_eq!(limit(&[(r#"say "hi""#, 1, 1)]), r#""say \"hi\"";r=1;t=1"#);
        assert_eq!(limit(&[(r"back\slash", 1, 1)]), r#""back\\slash";r=1;t=1"#);
        assert_eq!(limit(&[("tab\there\n\r\x7f\0", 1, 1)]), r#""tabhere";r=1;t=1"#);
        assert_eq!(limit(&[("café ☕ plan", 1, 1)]), r#""caf  plan";r=1;t=1"#);
        assert_eq!(limit(&[("", 1, 1)]), r#""";r=1;t=1"#);
        assert_eq!(limit(&[(" ~!", 1, 1)]), r#"" ~!";r=1;t=1"#);
    }

    #[test]
    fn sf_string_alone() {
        let mut s = String::new();
        push_sf_string(&mut s, "a\"b\\c\u{1}d");
        assert_eq!(s, r#""a\"b\\cd""#);
    }

    #[test]
    fn integers_are_clamped_to_sf_range() {
        assert_eq!(
            policy(&[("big", u64::MAX, SF_INTEGER_MAX + 1)]),
            r#""big";q=999999999999999;w=999999999999999"#
        );
        assert_eq!(limit(&[("big", SF_INTEGER_MAX, 0)]), r#""big";r=999999999999999;t=0"#);
    }
}
