//! The key-set pull: a poll state machine, independent of the host.
//!
//! The pull service (role `service`, one per Envoy process) asks this module whether a
//! poll is due, which `If-None-Match` to send, and what a response means; it performs the
//! HTTP call and the shared-data update itself. Every call takes the current time, so
//! the logic is tested with an injected clock.
//!
//! Policy:
//! - A healthy source is polled every `interval`. The first poll is due at once.
//! - After a failure the next poll comes after `min(interval, 1s * 2^(failures-1))`:
//!   1s, 2s, 4s, ... capped at the interval. A blip is retried quickly, and a source
//!   that stays down is never asked more often than a healthy one (one call per
//!   interval per Envoy), so the fleet does not add load to a struggling source.
//! - Only one poll is in flight. A call the host never answers is given up after the
//!   timeout plus a grace period, counted as a failure.
//! - `If-None-Match` carries the ETag of the document that produced the running set, and
//!   only while the running version is still the one pulled (after an admin push the
//!   source's answer is read again in full, and its version compared).
//! - 304 -> unchanged. 200 -> the document is validated completely: the running version
//!   -> unchanged; older than running -> refused (error `stale`), newer -> apply. Any
//!   failure keeps the running set; the ETag of a refused document is not remembered,
//!   so the source is read again in full next time.

use crate::core::config::SourceConfig;
use crate::core::keyset::apply::{ApplyError, ApplyReport};
use crate::core::keyset::document::DocError;
use crate::core::keyset::stream::peek_version;
use crate::core::remote::outbound::{
    answered, is_envoy_upstream_failure, snippet, ts, CallError, LinkHealth, Outbound,
};
pub use crate::core::remote::outbound::{State, LOST_CALL_GRACE_MS, MIN_BACKOFF_MS};
use serde::{Deserialize, Serialize};

/// Shared-data key holding the pull health (JSON of `Health`) for the admin status.
pub const SOURCE: &str = "km/source";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The call could not be made (unknown cluster, host refused it).
    Dispatch,
    /// No response: timeout, connection failure, reset.
    Unreachable,
    /// An HTTP status other than 200 and 304.
    Http,
    /// The body is not a valid key-set document.
    Invalid,
    /// The document's version is older than the running one.
    Stale,
    /// The document was valid but writing it to shared data failed.
    Apply,
}

/// `{kind, message, at}` of a failed poll.
pub type SourceError = CallError<ErrorKind>;

/// What the admin status shows under `source` (stored in `km/source`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Cluster, URL, state (of the last poll: `error` keeps the running set, if any),
    /// failures and the last error.
    #[serde(flatten)]
    pub link: LinkHealth<ErrorKind>,
    /// Version and ETag of the last document applied (or found equal to the running set).
    pub applied_version: Option<u64>,
    pub etag: Option<String>,
    pub last_poll_at: Option<String>,
    /// When a pulled document last changed the running set.
    pub last_change_at: Option<String>,
    pub next_poll_at: Option<String>,
    pub polls: u64,
    pub applied: u64,
    pub unchanged: u64,
}

/// The HTTP answer to a poll, as the host reported it.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// `None`: no response at all (timeout, connection failure, reset).
    pub status: Option<u32>,
    pub etag: Option<&'a str>,
    pub body: Body<'a>,
}

/// A response body: in memory, or read on demand from the host's buffer so a large
/// key-set document is never copied whole into the VM.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Bytes(&'a [u8]),
    /// Opens a fresh reader over the whole body each time it is called.
    Reader(&'a dyn Fn() -> Box<dyn std::io::Read + 'a>),
}

impl std::fmt::Debug for Body<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Body::Bytes({} bytes)", b.len()),
            Body::Reader(_) => f.write_str("Body::Reader"),
        }
    }
}

impl<'a> Body<'a> {
    pub fn reader(&self) -> Box<dyn std::io::Read + 'a> {
        match self {
            Body::Bytes(b) => Box::new(*b),
            Body::Reader(open) => open(),
        }
    }

    /// The whole body (tests).
    #[cfg(test)]
    fn prefix_all(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut self.reader(), &mut out);
        out
    }

    /// The first bytes, for error messages.
    fn prefix(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(self.reader(), 4096), &mut out);
        out
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> From<&'a T> for Body<'a> {
    fn from(b: &'a T) -> Self {
        Body::Bytes(b.as_ref())
    }
}

/// What the caller must do with a poll's response.
#[derive(Debug, PartialEq, Eq)]
pub enum PollResult {
    /// Nothing changed (304, or the running version); health already updated.
    Unchanged,
    /// A newer document (of this version): apply the response body with
    /// `keyset::stream::push_stream`, then report with `applied`, `apply_failed` or
    /// `invalid`.
    Apply(u64),
    /// The poll failed; the running set stays. Health already updated.
    Failed,
    /// Not the call in flight (a late answer to a call already given up).
    Ignored,
}

/// The poll state machine of one pull service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poller {
    call: Outbound,
    /// Whether the call in flight carries `If-None-Match`.
    sent_etag: bool,
    /// ETag of the document being applied, remembered once the apply succeeds.
    pending_etag: Option<Option<String>>,
    pub health: Health,
}

impl Poller {
    pub fn new(source: &SourceConfig) -> Self {
        Poller {
            call: Outbound::new(source.interval_ms, source.timeout_ms),
            sent_etag: false,
            pending_etag: None,
            health: Health {
                link: LinkHealth::new(&source.cluster, &source.authority, &source.path, source.interval_ms),
                ..Health::default()
            },
        }
    }

    /// Whether a poll should start now. Gives up a call in flight for too long (counted
    /// as a failure), so a lost callback cannot stop the polling for good.
    pub fn due(&mut self, now_ms: u64) -> bool {
        if self.call.give_up_lost(now_ms) {
            self.pending_etag = None;
            self.fail(
                now_ms,
                ErrorKind::Unreachable,
                "no answer from the source (call lost)".into(),
            );
        }
        self.call.due(now_ms)
    }

    /// Starts a poll; returns the `If-None-Match` value to send, if any. `running` is the
    /// version of the set running now (`None`: nothing loaded).
    pub fn begin(&mut self, now_ms: u64, running: Option<u64>) -> Option<String> {
        let etag = match (&self.health.etag, running) {
            (Some(e), Some(r)) if self.health.applied_version == Some(r) => Some(e.clone()),
            _ => None,
        };
        self.call.begin(now_ms);
        self.sent_etag = etag.is_some();
        self.health.polls += 1;
        self.health.last_poll_at = Some(ts(now_ms));
        etag
    }

    /// The host accepted the call under `token`.
    pub fn dispatched(&mut self, token: u32) {
        self.call.dispatched(token);
    }

    /// The host refused to make the call.
    pub fn dispatch_failed(&mut self, now_ms: u64, message: String) {
        self.call.end();
        self.fail(now_ms, ErrorKind::Dispatch, message);
    }

    /// Interprets the answer to the call `token`. `running` as in `begin`, read now.
    pub fn on_response(&mut self, now_ms: u64, token: u32, resp: Response<'_>, running: Option<u64>) -> PollResult {
        if !self.call.owns(token) {
            return PollResult::Ignored;
        }
        self.call.end();
        let sent_etag = self.sent_etag;
        let status = match resp.status {
            None => {
                self.fail(
                    now_ms,
                    ErrorKind::Unreachable,
                    "no response from the source (timeout or connection failure)".into(),
                );
                return PollResult::Failed;
            }
            Some(s) => s,
        };
        match status {
            304 if sent_etag => {
                self.succeed(now_ms);
                self.health.unchanged += 1;
                PollResult::Unchanged
            }
            304 => {
                self.fail(
                    now_ms,
                    ErrorKind::Http,
                    "source answered 304 Not Modified to a request without If-None-Match".into(),
                );
                PollResult::Failed
            }
            200 => match peek_version(resp.body.reader()) {
                Err(e) => {
                    let e = crate::core::redact::serde_values(&e.to_string()).into_owned();
                    self.fail(now_ms, ErrorKind::Invalid, format!("invalid key-set document: {e}"));
                    PollResult::Failed
                }
                Ok(version) => match running {
                    Some(r) if version == r => {
                        // In sync: remember the ETag so the next polls can be 304s.
                        self.health.applied_version = Some(r);
                        self.health.etag = resp.etag.map(str::to_string);
                        self.succeed(now_ms);
                        self.health.unchanged += 1;
                        PollResult::Unchanged
                    }
                    Some(r) if version < r => {
                        self.fail(
                            now_ms,
                            ErrorKind::Stale,
                            format!("source serves version {version}, older than the running version {r}; keeping {r}"),
                        );
                        PollResult::Failed
                    }
                    _ => {
                        self.pending_etag = Some(resp.etag.map(str::to_string));
                        PollResult::Apply(version)
                    }
                },
            },
            s => {
                let body = snippet(&resp.body.prefix());
                let (kind, message) = if is_envoy_upstream_failure(s, &body) {
                    (
                        ErrorKind::Unreachable,
                        format!("source unreachable: Envoy answered {s}: {body}"),
                    )
                } else {
                    (ErrorKind::Http, answered("source", s, &body))
                };
                self.fail(now_ms, kind, message);
                PollResult::Failed
            }
        }
    }

    /// The set from `PollResult::Apply` is running now.
    pub fn applied(&mut self, now_ms: u64, report: &ApplyReport) {
        self.health.etag = self.pending_etag.take().flatten();
        self.health.applied_version = Some(report.version);
        self.health.last_change_at = Some(ts(now_ms));
        self.health.applied += 1;
        self.succeed(now_ms);
    }

    /// The document of `PollResult::Apply` failed validation while being applied; the
    /// running set stays.
    pub fn invalid(&mut self, now_ms: u64, e: &DocError) {
        self.pending_etag = None;
        let e = crate::core::redact::serde_values(&e.to_string()).into_owned();
        self.fail(now_ms, ErrorKind::Invalid, format!("invalid key-set document: {e}"));
    }

    /// Writing the set from `PollResult::Apply` failed; the running set stays.
    pub fn apply_failed(&mut self, now_ms: u64, e: &ApplyError) {
        self.pending_etag = None;
        let kind = match e {
            ApplyError::Stale { .. } => ErrorKind::Stale,
            _ => ErrorKind::Apply,
        };
        self.fail(now_ms, kind, format!("applying the pulled key set failed: {e}"));
    }

    /// When the next poll is due (unix ms).
    pub fn next_poll_ms(&self) -> u64 {
        self.call.next_ms()
    }

    pub fn in_flight(&self) -> bool {
        self.call.in_flight()
    }

    /// Delay before the next poll after `failures` consecutive failures (0: healthy).
    pub fn delay_ms(&self, failures: u32) -> u64 {
        self.call.delay_ms(failures)
    }

    fn schedule(&mut self, now_ms: u64) {
        let next = self.call.schedule(now_ms, self.health.link.consecutive_failures);
        self.health.next_poll_at = Some(ts(next));
    }

    fn succeed(&mut self, now_ms: u64) {
        self.health.link.succeeded(now_ms);
        self.schedule(now_ms);
    }

    fn fail(&mut self, now_ms: u64, kind: ErrorKind, message: String) {
        self.health.link.failed(now_ms, kind, message);
        self.schedule(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::apply::ApplyOptions;
    use crate::core::keyset::document::{parse_json, KeySetDoc};
    use crate::core::keyset::full_push::apply_full;
    use crate::core::keyset::meta::read_meta;
    use crate::core::keyset::stream::{push_stream, PushError};
    use crate::core::store::{MemStore, Store};

    const H: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    const T0: u64 = 1_700_000_000_000;

    fn source(interval_ms: u64) -> SourceConfig {
        SourceConfig {
            cluster: "keyset_source".into(),
            path: "/keyset.json".into(),
            authority: "keys.internal".into(),
            interval_ms,
            timeout_ms: 2_000,
            headers: vec![],
        }
    }

    fn doc(version: u64, ids: &[&str]) -> String {
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"id":"{id}","hash":"{H}","consumer":"c","plan":"p"}}"#))
            .collect();
        format!(
            r#"{{"version":{version},"plans":{{"p":{{}}}},"keys":[{}]}}"#,
            keys.join(",")
        )
    }

    fn ok<'a>(etag: &'a str, body: &'a str) -> Response<'a> {
        Response {
            status: Some(200),
            etag: Some(etag),
            body: body.as_bytes().into(),
        }
    }

    /// A poller driven against a fake shared-data store, the way the adapter drives it.
    struct Rig {
        p: Poller,
        store: MemStore,
        now: u64,
        token: u32,
        /// `If-None-Match` of the last request.
        sent: Option<String>,
    }

    impl Rig {
        fn new(interval_ms: u64) -> Self {
            Rig {
                p: Poller::new(&source(interval_ms)),
                store: MemStore::default(),
                now: T0,
                token: 0,
                sent: None,
            }
        }
        fn running(&self) -> Option<u64> {
            read_meta(&self.store).map(|m| m.version)
        }
        /// Starts a poll (which must be due) and answers it with `resp`.
        fn poll(&mut self, resp: Response<'_>) -> &'static str {
            assert!(self.p.due(self.now), "poll not due at +{}ms", self.now - T0);
            self.sent = self.p.begin(self.now, self.running());
            self.token += 1;
            self.p.dispatched(self.token);
            let running = self.running();
            let doc = resp.body.prefix_all();
            match self.p.on_response(self.now, self.token, resp, running) {
                PollResult::Unchanged => "unchanged",
                PollResult::Failed => "failed",
                PollResult::Ignored => "ignored",
                PollResult::Apply(_) => {
                    match push_stream(&self.store, &doc[..], crate::core::time::Clock::Fixed(self.now), false) {
                        Ok(r) => {
                            self.p.applied(self.now, &r);
                            "applied"
                        }
                        Err(PushError::Doc(e)) => {
                            self.p.invalid(self.now, &e);
                            "failed"
                        }
                        Err(PushError::Apply(e)) => {
                            self.p.apply_failed(self.now, &e);
                            "apply failed"
                        }
                    }
                }
            }
        }
        fn advance(&mut self, ms: u64) {
            self.now += ms;
        }
        /// Advances to the next due poll.
        fn skip_to_next_poll(&mut self) -> u64 {
            let d = self.p.next_poll_ms() - self.now;
            assert!(!self.p.due(self.now + d - 1));
            self.now += d;
            d
        }
        fn error(&self) -> (ErrorKind, String) {
            let e = self.p.health.link.last_error.clone().unwrap();
            (e.kind, e.message)
        }
    }

    #[test]
    fn first_poll_is_immediate_and_applies() {
        let mut r = Rig::new(10_000);
        assert_eq!(r.p.health.link.state, State::Pending);
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &["aaaaaaaaaaa1"]))), "applied");
        assert_eq!(r.sent, None, "nothing to revalidate on the first poll");
        assert_eq!(r.running(), Some(1));
        let h = &r.p.health;
        assert_eq!(h.link.state, State::Ok);
        assert_eq!((h.applied_version, h.etag.as_deref()), (Some(1), Some("\"v1\"")));
        assert_eq!((h.polls, h.applied, h.link.failures), (1, 1, 0));
        assert!(h.last_change_at.is_some() && h.link.last_success_at.is_some());
        assert_eq!(r.skip_to_next_poll(), 10_000);
    }

    #[test]
    fn etag_revalidation_and_304() {
        let mut r = Rig::new(10_000);
        r.poll(ok("\"v1\"", &doc(1, &["aaaaaaaaaaa1"])));
        r.skip_to_next_poll();
        let not_modified = Response {
            status: Some(304),
            etag: Some("\"v1\""),
            body: b"".into(),
        };
        assert_eq!(r.poll(not_modified), "unchanged");
        assert_eq!(r.sent.as_deref(), Some("\"v1\""));
        assert_eq!((r.p.health.unchanged, r.p.health.applied), (1, 1));
        // a new version replaces the ETag
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"v2\"", &doc(2, &["aaaaaaaaaaa2"]))), "applied");
        r.skip_to_next_poll();
        r.poll(not_modified);
        assert_eq!(r.sent.as_deref(), Some("\"v2\""));
    }

    #[test]
    fn no_etag_is_sent_when_the_running_set_came_from_elsewhere() {
        let mut r = Rig::new(10_000);
        r.poll(ok("\"v1\"", &doc(1, &["aaaaaaaaaaa1"])));
        // an admin push of version 5 meanwhile
        let pushed = parse_json::<KeySetDoc>(doc(5, &[]).as_bytes())
            .unwrap()
            .compile()
            .unwrap();
        apply_full(
            &r.store,
            &pushed,
            ApplyOptions {
                force: false,
                now_ms: T0,
            },
        )
        .unwrap();
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &["aaaaaaaaaaa1"]))), "failed");
        assert_eq!(r.sent, None);
        assert_eq!(r.error().0, ErrorKind::Stale);
        // a 304 to a request without If-None-Match is not "unchanged"
        r.skip_to_next_poll();
        let resp = Response {
            status: Some(304),
            etag: None,
            body: b"".into(),
        };
        assert_eq!(r.poll(resp), "failed");
        assert_eq!(r.error().0, ErrorKind::Http);
    }

    #[test]
    fn the_running_version_is_unchanged_and_adopts_the_etag() {
        let mut r = Rig::new(10_000);
        let set = parse_json::<KeySetDoc>(doc(3, &[]).as_bytes())
            .unwrap()
            .compile()
            .unwrap();
        apply_full(
            &r.store,
            &set,
            ApplyOptions {
                force: false,
                now_ms: T0,
            },
        )
        .unwrap();
        assert_eq!(r.poll(ok("\"v3\"", &doc(3, &[]))), "unchanged");
        assert_eq!(r.p.health.etag.as_deref(), Some("\"v3\""));
        assert_eq!(r.p.health.applied, 0);
        r.skip_to_next_poll();
        r.poll(Response {
            status: Some(304),
            etag: None,
            body: b"".into(),
        });
        assert_eq!(r.sent.as_deref(), Some("\"v3\""));
        assert_eq!(r.p.health.link.state, State::Ok);
    }

    #[test]
    fn older_version_is_refused_as_stale_and_keeps_the_set() {
        let mut r = Rig::new(10_000);
        r.poll(ok("\"v5\"", &doc(5, &["aaaaaaaaaaa1"])));
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"v4\"", &doc(4, &["aaaaaaaaaaa2"]))), "failed");
        let (kind, msg) = r.error();
        assert_eq!(kind, ErrorKind::Stale);
        assert!(msg.contains("version 4") && msg.contains("running version 5"), "{msg}");
        assert_eq!(r.running(), Some(5));
        assert_eq!(
            r.p.health.etag.as_deref(),
            Some("\"v5\""),
            "the refused ETag is not kept"
        );
        assert_eq!(r.p.health.link.consecutive_failures, 1);
        // serialized form names the kind
        let j = serde_json::to_value(&r.p.health).unwrap();
        assert_eq!(j["last_error"]["kind"], "stale");
        assert_eq!(j["state"], "error");
    }

    #[test]
    fn garbage_and_invalid_documents_keep_the_last_good_set() {
        let mut r = Rig::new(10_000);
        r.poll(ok("\"v1\"", &doc(1, &["aaaaaaaaaaa1"])));
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"g\"", "<html>oops</html>")), "failed");
        let (kind, msg) = r.error();
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(msg.starts_with("invalid key-set document: invalid document:"), "{msg}");
        r.skip_to_next_poll();
        let bad = doc(2, &["aaaaaaaaaaa2"]).replace(r#""plan":"p""#, r#""plan":"nope""#);
        assert_eq!(r.poll(ok("\"v2\"", &bad)), "failed");
        let (kind, msg) = r.error();
        assert_eq!(kind, ErrorKind::Invalid);
        assert!(msg.contains("keys[0]") && msg.contains("unknown plan 'nope'"), "{msg}");
        assert_eq!(r.running(), Some(1));
        assert_eq!(r.p.health.link.consecutive_failures, 2);
        // still revalidating against the good document
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"v2\"", &doc(2, &["aaaaaaaaaaa2"]))), "applied");
        assert_eq!(r.sent.as_deref(), Some("\"v1\""));
        assert_eq!(r.p.health.link.consecutive_failures, 0);
        assert_eq!(
            r.p.health.link.last_error.as_ref().unwrap().kind,
            ErrorKind::Invalid,
            "kept"
        );
    }

    #[test]
    fn failures_back_off_exponentially_capped_at_the_interval() {
        let mut r = Rig::new(10_000);
        let down = Response {
            status: Some(500),
            etag: None,
            body: b"<h1>Internal\n Server Error</h1>".into(),
        };
        let mut delays = vec![];
        for _ in 0..6 {
            assert_eq!(r.poll(down), "failed");
            delays.push(r.skip_to_next_poll());
        }
        assert_eq!(delays, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
        let h = &r.p.health;
        assert_eq!(
            (h.link.consecutive_failures, h.link.failures, h.link.state),
            (6, 6, State::Error)
        );
        let (kind, msg) = r.error();
        assert_eq!(kind, ErrorKind::Http);
        assert_eq!(msg, "source answered HTTP 500: <h1>Internal Server Error</h1>");
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &[]))), "applied");
        assert_eq!(r.p.health.link.consecutive_failures, 0);
        assert_eq!(r.skip_to_next_poll(), 10_000);
        // an interval shorter than the first backoff step caps it
        let r = Rig::new(1_000);
        assert_eq!(r.p.delay_ms(1), 1_000);
        assert_eq!(r.p.delay_ms(40), 1_000);
    }

    #[test]
    fn no_response_and_dispatch_failures_are_errors() {
        let mut r = Rig::new(10_000);
        let none = Response {
            status: None,
            etag: None,
            body: b"".into(),
        };
        assert_eq!(r.poll(none), "failed");
        assert_eq!(r.error().0, ErrorKind::Unreachable);
        // Envoy's local replies for a refused connection and a timeout
        for (status, body) in [
            (
                503,
                &b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
                    [..],
            ),
            (504, b"upstream request timeout"),
            (503, b"no healthy upstream"),
        ] {
            r.skip_to_next_poll();
            assert_eq!(
                r.poll(Response {
                    status: Some(status),
                    etag: None,
                    body: body.into()
                }),
                "failed"
            );
            let (kind, msg) = r.error();
            assert_eq!(kind, ErrorKind::Unreachable, "{msg}");
            assert!(
                msg.starts_with(&format!("source unreachable: Envoy answered {status}: ")),
                "{msg}"
            );
        }
        r.skip_to_next_poll();
        r.poll(Response {
            status: Some(503),
            etag: None,
            body: b"maintenance".into(),
        });
        assert_eq!(r.error().0, ErrorKind::Http);
        r.skip_to_next_poll();
        assert!(r.p.due(r.now));
        r.p.begin(r.now, None);
        r.p.dispatch_failed(r.now, "dispatch_http_call failed: BadArgument".into());
        assert_eq!(r.error().0, ErrorKind::Dispatch);
        assert!(!r.p.in_flight());
        assert_eq!(r.p.health.link.consecutive_failures, 6);
    }

    #[test]
    fn only_one_call_in_flight_and_a_lost_call_is_given_up() {
        let mut r = Rig::new(10_000);
        assert!(r.p.due(r.now));
        r.p.begin(r.now, None);
        r.p.dispatched(7);
        // within timeout + grace: still waiting
        r.now = T0 + 2_000 + LOST_CALL_GRACE_MS - 1;
        assert!(!r.p.due(r.now));
        r.advance(1);
        assert!(!r.p.due(r.now), "given up, then backing off");
        assert_eq!(r.error().0, ErrorKind::Unreachable);
        // the late answer is ignored
        let late = r.p.on_response(r.now, 7, ok("\"v1\"", &doc(1, &[])), None);
        assert_eq!(late, PollResult::Ignored);
        assert_eq!(
            r.p.on_response(r.now, 99, ok("\"v1\"", &doc(1, &[])), None),
            PollResult::Ignored
        );
        r.skip_to_next_poll();
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &[]))), "applied");
    }

    #[test]
    fn apply_errors_are_reported_and_retried() {
        let mut r = Rig::new(10_000);
        // another writer holds the lock
        r.store
            .set(crate::core::keyset::names::LOCK, &(T0 + 60_000).to_le_bytes(), None)
            .unwrap();
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &[]))), "apply failed");
        let (kind, msg) = r.error();
        assert_eq!(kind, ErrorKind::Apply);
        assert!(msg.contains("another key-set update is in progress"), "{msg}");
        assert_eq!(r.p.health.etag, None, "not applied: no ETag");
        assert_eq!(r.skip_to_next_poll(), 1_000);
        r.store
            .set(crate::core::keyset::names::LOCK, &0u64.to_le_bytes(), None)
            .unwrap();
        assert_eq!(r.poll(ok("\"v1\"", &doc(1, &[]))), "applied");
        assert_eq!(r.p.health.etag.as_deref(), Some("\"v1\""));
    }

    #[test]
    fn health_serializes_round_trip() {
        let mut r = Rig::new(10_000);
        r.poll(ok("\"v1\"", &doc(1, &[])));
        let j = serde_json::to_value(&r.p.health).unwrap();
        assert_eq!(j["url"], "http://keys.internal/keyset.json");
        assert_eq!(j["cluster"], "keyset_source");
        assert_eq!(j["state"], "ok");
        assert_eq!(j["applied_version"], 1);
        assert_eq!(j["last_error"], serde_json::Value::Null);
        assert_eq!(j["last_success_at"], "2023-11-14T22:13:20Z");
        let back: Health = serde_json::from_value(j).unwrap();
        assert_eq!(back, r.p.health);
        let p: Poller = serde_json::from_str(&serde_json::to_string(&r.p).unwrap()).unwrap();
        assert_eq!(p, r.p);
    }
}
