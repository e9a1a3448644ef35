//! Human vs `--json` output, error lines, and redaction of anything that looks like a key.

use serde_json::Value;

/// How results are printed: human text, or JSON on stdout (`--json`).
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints a JSON value (pretty) on stdout.
    pub fn json(&self, v: &Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).expect("a Value always serializes")
        );
    }
}

/// `keymeter: <message>` on stderr, with any full key redacted.
pub fn error(msg: &str) {
    eprintln!("keymeter: {}", redact(msg));
}

pub fn warn(msg: &str) {
    eprintln!("keymeter: warning: {}", redact(msg));
}

/// Replaces the secret part of anything shaped like a keymeter key
/// (`km_` + 12 alphanumerics + `_` + 38 alphanumerics) with `[redacted]`, so error
/// messages (ours, clap's echo of arguments, a server's) never carry a full key.
pub fn redact(s: &str) -> String {
    let b = s.as_bytes();
    let alnum = |r: &[u8]| r.iter().all(u8::is_ascii_alphanumeric);
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i + 54 <= b.len() {
        if &b[i..i + 3] == b"km_" && alnum(&b[i + 3..i + 15]) && b[i + 15] == b'_' && alnum(&b[i + 16..i + 54]) {
            out.push_str(&s[copied..i + 16]);
            out.push_str("[redacted]");
            i += 54;
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[copied..]);
    out
}

/// Flattens JSON into `path=value` lines (`a.b=1`, `list[0]=x`); strings unquoted.
pub fn flatten(v: &Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{prefix}[{i}]"), v, out);
                }
            }
            Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

/// Prints `key=value` lines for a JSON value.
pub fn print_kv(v: &Value) {
    for (k, v) in flatten(v) {
        println!("{k}={v}");
    }
}

/// Left-aligned text table with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == widths.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymeter::core::auth::api_key::assemble;

    #[test]
    fn redacts_keys_anywhere() {
        let k = assemble("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJkl");
        let msg = format!("unexpected argument '{k}' found; again:{k}");
        let r = redact(&msg);
        assert!(!r.contains(&k[16..]));
        assert_eq!(
            r,
            "unexpected argument 'km_AbCdEf012345_[redacted]' found; again:km_AbCdEf012345_[redacted]"
        );
        assert_eq!(redact("no key here, km_short_x"), "no key here, km_short_x");
        assert_eq!(redact("é km_ ü"), "é km_ ü");
    }

    #[test]
    fn flattens() {
        let v: Value =
            serde_json::json!({"version": 3, "keys": {"total": 2}, "plans": ["a", "b"], "ok": true, "e": {}});
        let lines: Vec<String> = flatten(&v).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            lines,
            [
                "e={}",
                "keys.total=2",
                "ok=true",
                "plans[0]=a",
                "plans[1]=b",
                "version=3"
            ]
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "STATE"],
            &[vec!["a".into(), "enabled".into()], vec!["long-id".into(), "x".into()]],
        );
        assert_eq!(t, "ID       STATE\na        enabled\nlong-id  x\n");
    }
}
