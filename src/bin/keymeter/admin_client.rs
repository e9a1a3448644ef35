//! A minimal HTTP/1.1 client for the keymeter admin API, over `std::net::TcpStream`.
//!
//! Plain `http://host[:port][/prefix]` only. One request per connection
//! (`Connection: close`); request bodies with Content-Length; responses delimited by
//! Content-Length, chunked transfer coding, or connection close.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;
/// How long a key-set change waits while another update holds the writer lock or its
/// bounded sweep is still running (`409 update-in-progress`); such a refusal changed
/// nothing, so sending the same request again is safe.
pub const BUSY_WAIT: Duration = Duration::from_secs(60);
const BUSY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Where the admin API is, and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Host as written (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub base: String,
    token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// `409 update-in-progress`: another key-set update is running; nothing was changed.
    pub fn busy(&self) -> bool {
        self.status == 409
            && self.json().as_ref().and_then(|v| v.get("type")).and_then(Value::as_str)
                == Some("urn:keymeter:problem:update-in-progress")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// One line describing a failed call: status, and the problem's title/detail
    /// (RFC 9457) or the start of the body.
    pub fn problem(&self) -> String {
        let mut msg = format!("HTTP {}", self.status);
        if !self.reason.is_empty() {
            msg.push(' ');
            msg.push_str(&self.reason);
        }
        let v = self.json();
        let field = |name: &str| {
            v.as_ref()
                .and_then(|v| v.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        match (field("title"), field("detail")) {
            (Some(t), Some(d)) => msg.push_str(&format!(": {t}: {d}")),
            (Some(t), None) => msg.push_str(&format!(": {t}")),
            (None, Some(d)) => msg.push_str(&format!(": {d}")),
            (None, None) => {
                let text = String::from_utf8_lossy(&self.body);
                let text = text.trim();
                if !text.is_empty() {
                    let cut: String = text.chars().take(300).collect();
                    msg.push_str(&format!(": {cut}"));
                }
            }
        }
        if self.status == 401 {
            msg.push_str(" (wrong or missing admin token: check --token / KEYMETER_ADMIN_TOKEN)");
        }
        msg
    }
}

impl Admin {
    /// Parses `http://host[:port][/prefix]`. The token must be a single header-safe line.
    pub fn new(url: &str, token: Option<String>) -> Result<Admin, String> {
        let bad =
            || format!("admin URL '{url}' is not of the form http://host:port[/prefix] (only plain http is supported)");
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) || authority.contains('@') || authority.is_empty() {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        if host.is_empty() || !host.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_:".contains(&c)) {
            return Err(bad());
        }
        if path.bytes().any(|c| c <= b' ' || c == 0x7f) {
            return Err(bad());
        }
        if let Some(t) = &token {
            if t.is_empty() || t.bytes().any(|c| !(0x21..0x7f).contains(&c)) {
                return Err("admin token must be printable ASCII without spaces".into());
            }
        }
        Ok(Admin {
            host: host.to_string(),
            port,
            base: path.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL of an API path, for messages.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority(), self.base, path)
    }

    /// The request bytes for one call.
    pub fn build_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: keymeter-cli/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            self.base,
            self.authority(),
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if let Some(b) = body {
            out.extend_from_slice(b);
        }
        out
    }

    /// Like `call`, but while the answer is `409 update-in-progress` waits (the
    /// server's `Retry-After`, at most 1 s, shorter at first) and sends it again, for at
    /// most `wait` in all. For key-set changes only: a busy refusal changed nothing.
    pub fn call_waiting(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        wait: Duration,
    ) -> Result<Response, String> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut told = false;
        loop {
            let r = self.call(method, path, body)?;
            if !r.busy() || start.elapsed() + pause > wait {
                return Ok(r);
            }
            if !told {
                eprintln!(
                    "keymeter: another key-set update is in progress; waiting up to {}s",
                    wait.as_secs()
                );
                told = true;
            }
            let asked = r
                .header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            std::thread::sleep(asked.map_or(pause, |a| a.min(pause)));
            pause = (pause * 2).min(BUSY_PAUSE_MAX);
        }
    }

    /// Sends one request and reads the whole response.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, String> {
        let target = self.authority();
        let cant = |e: std::io::Error| format!("cannot reach admin API at {target}: {e}");
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(cant)?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut stream = match stream {
            Some(s) => s,
            None => return Err(cant(last.unwrap_or_else(|| std::io::Error::other("no address")))),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(cant)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(cant)?;
        stream
            .write_all(&self.build_request(method, path, body))
            .map_err(cant)?;
        stream.flush().map_err(cant)?;
        read_response(&mut BufReader::new(stream), method == "HEAD")
            .map_err(|e| format!("bad response from admin API at {target}: {e}"))
    }
}

fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<String, String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed early".into());
    }
    if n > *budget {
        return Err("response head too large".into());
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err("connection closed early".into());
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| "non-UTF-8 header line".to_string())
}

/// Status code, reason phrase, headers (names lowercased).
type Head = (u16, String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> Result<Head, String> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, &mut budget)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1.x status line: {:?}",
            status_line.chars().take(80).collect::<String>()
        ));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or("bad status code")?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or("malformed header line")?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((status, reason, headers))
}

/// Reads one response (skipping interim 1xx responses). `head_request`: the body is
/// empty whatever the headers say.
pub fn read_response(r: &mut impl BufRead, head_request: bool) -> Result<Response, String> {
    let (status, reason, headers) = loop {
        let head = read_head(r)?;
        if !(100..200).contains(&head.0) || head.0 == 101 {
            break head;
        }
    };
    let header = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    let chunked = header("transfer-encoding")
        .iter()
        .flat_map(|v| v.split(','))
        .next_back()
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
    let body = if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if chunked {
        read_chunked(r)?
    } else if let Some(first) = header("content-length").first() {
        let lens = header("content-length");
        if lens.iter().any(|l| l != first) {
            return Err("conflicting Content-Length headers".into());
        }
        let len: usize = first.parse().map_err(|_| "bad Content-Length")?;
        if len > MAX_BODY {
            return Err("response body too large".into());
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)
            .map_err(|e| format!("body shorter than Content-Length: {e}"))?;
        body
    } else {
        let mut body = Vec::new();
        r.take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| e.to_string())?;
        if body.len() > MAX_BODY {
            return Err("response body too large".into());
        }
        body
    };
    Ok(Response {
        status,
        reason,
        headers,
        body,
    })
}

fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(r, &mut budget)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {size_text:?}"))?;
        if size == 0 {
            // trailers, up to the empty line
            while !read_line(r, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err("response body too large".into());
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| format!("truncated chunk: {e}"))?;
        if !read_line(r, &mut budget)?.is_empty() {
            return Err("missing CRLF after chunk".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Response, String> {
        read_response(&mut raw.as_bytes(), false)
    }

    #[test]
    fn urls() {
        let a = Admin::new("http://127.0.0.1:9902", None).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.base.as_str()), ("127.0.0.1", 9902, ""));
        assert_eq!(a.url("/v1/status"), "http://127.0.0.1:9902/v1/status");
        let a = Admin::new("http://admin.local/keymeter/", None).unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.base.as_str()),
            ("admin.local", 80, "/keymeter")
        );
        let a = Admin::new("http://[::1]:9902/", None).unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 9902));
        assert_eq!(a.url("/v1/x"), "http://[::1]:9902/v1/x");
        for bad in [
            "https://x:1",
            "x:1",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://u@h:1",
            "http://h:1/a?b",
            "http://h h:1",
        ] {
            assert!(Admin::new(bad, None).is_err(), "{bad}");
        }
        assert!(Admin::new("http://h:1", Some("a b".into())).is_err());
        assert!(Admin::new("http://h:1", Some("x\r\nEvil: 1".into())).is_err());
    }

    #[test]
    fn request_bytes() {
        let a = Admin::new("http://127.0.0.1:9902/p", Some("s3cret".into())).unwrap();
        let req = String::from_utf8(a.build_request("PUT", "/v1/keyset", Some(b"{}"))).unwrap();
        assert!(
            req.starts_with("PUT /p/v1/keyset HTTP/1.1\r\nHost: 127.0.0.1:9902\r\n"),
            "{req}"
        );
        assert!(req.contains("\r\nAuthorization: Bearer s3cret\r\n"));
        assert!(req.contains("\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"));
        assert!(req.ends_with("\r\n\r\n{}"));
        let get = String::from_utf8(
            Admin::new("http://h:1", None)
                .unwrap()
                .build_request("GET", "/v1/status", None),
        )
        .unwrap();
        assert!(!get.contains("Authorization") && !get.contains("Content-Length"));
    }

    #[test]
    fn content_length_response() {
        let r = parse(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}trailing",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "OK");
        assert_eq!(r.body, b"{\"ok\":true}");
        assert_eq!(r.json().unwrap()["ok"], true);
        assert!(r.headers.contains(&("content-type".into(), "application/json".into())));
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            .unwrap_err()
            .contains("shorter"));
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab").is_err());
    }

    #[test]
    fn chunked_response() {
        let raw = "HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5;ext=1\r\n{\"tit\r\n1A\r\nle\":\"stale\",\"detail\":\"v3\"}\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let r = parse(raw).unwrap();
        assert_eq!(r.status, 409);
        assert_eq!(r.body, br#"{"title":"stale","detail":"v3"}"#);
        assert_eq!(r.problem(), "HTTP 409 Conflict: stale: v3");
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .unwrap_err()
            .contains("chunk size"));
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\n").is_err());
    }

    #[test]
    fn other_framings() {
        let r = parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil close").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"until close"[..]));
        let r = parse("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert!(r.body.is_empty());
        let r = read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..], true).unwrap();
        assert!(r.body.is_empty());
        assert!(parse("SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 1").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn problems() {
        let r = Response {
            status: 401,
            reason: "Unauthorized".into(),
            headers: vec![],
            body: br#"{"title":"unauthorized"}"#.to_vec(),
        };
        assert_eq!(
            r.problem(),
            "HTTP 401 Unauthorized: unauthorized (wrong or missing admin token: check --token / KEYMETER_ADMIN_TOKEN)"
        );
        let r = Response {
            status: 502,
            reason: String::new(),
            headers: vec![],
            body: b"upstream down\n".to_vec(),
        };
        assert_eq!(r.problem(), "HTTP 502: upstream down");
        assert!(!r.ok());
    }

    /// A one-thread admin API that answers the given responses in turn and records
    /// how many requests it got.
    fn serve(answers: Vec<&'static str>) -> (Admin, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        std::thread::spawn(move || {
            for a in answers {
                let (mut c, _) = l.accept().unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut n = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        n = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; n];
                r.read_exact(&mut body).unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                c.write_all(a.as_bytes()).unwrap();
            }
        });
        (Admin::new(&format!("http://127.0.0.1:{port}"), None).unwrap(), seen)
    }

    const BUSY: &str = "HTTP/1.1 409 Conflict\r\nretry-after: 1\r\ncontent-length: 83\r\n\r\n\
        {\"type\":\"urn:keymeter:problem:update-in-progress\",\"status\":409,\"title\":\"busy\"}     ";
    const STALE: &str = "HTTP/1.1 409 Conflict\r\ncontent-length: 70\r\n\r\n\
        {\"type\":\"urn:keymeter:problem:stale-version\",\"status\":409,\"title\":\"s\"}";
    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";

    #[test]
    fn a_busy_admin_is_asked_again_until_it_answers() {
        let (admin, seen) = serve(vec![BUSY, BUSY, OK]);
        let r = admin
            .call_waiting("POST", "/v1/keyset/delta", Some(b"{}"), BUSY_WAIT)
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn other_refusals_and_an_exhausted_wait_are_returned_as_they_are() {
        let (admin, seen) = serve(vec![STALE]);
        let r = admin.call_waiting("PUT", "/v1/keyset", Some(b"{}"), BUSY_WAIT).unwrap();
        assert_eq!((r.status, r.busy()), (409, false));
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (admin, seen) = serve(vec![BUSY, BUSY, BUSY]);
        let r = admin
            .call_waiting("PUT", "/v1/keyset", Some(b"{}"), Duration::from_millis(250))
            .unwrap();
        assert!(r.busy());
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "100 ms, then 200 ms would pass 250 ms"
        );
    }
}
