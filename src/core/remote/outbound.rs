//! One periodic HTTP call to an Envoy cluster, host-independent: schedule, backoff,
//! in-flight tracking and Envoy failure detection, shared by the key-set pull
//! (`core::pull`) and the usage export (`core::export`).
//!
//! - At most one call is in flight. A call the host never answers is given up after its
//!   timeout plus `LOST_CALL_GRACE_MS` (the caller counts it as a failure).
//! - After `n` consecutive failures the next call comes after
//!   `min(interval, 1s * 2^(n-1))`: 1s, 2s, 4s, ... capped at the interval.

use crate::core::time::format_rfc3339;
use serde::{Deserialize, Serialize};

/// First retry delay after a failure; doubles per consecutive failure up to the interval.
pub const MIN_BACKOFF_MS: u64 = 1_000;
/// How long after its timeout an unanswered call is given up.
pub const LOST_CALL_GRACE_MS: u64 = 5_000;
/// At most this much of an error response body goes into a status message.
const SNIPPET_CHARS: usize = 160;

/// RFC 3339 (whole seconds) of a unix-ms time, as the health records show times.
pub fn ts(now_ms: u64) -> String {
    format_rfc3339((now_ms / 1000) as i64)
}

/// Printable ASCII of the start of a body, whitespace collapsed, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { ' ' })
        .take(SNIPPET_CHARS)
        .collect();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Envoy reports a connection failure or a timeout of the call as a local reply (503
/// `upstream connect error ...` / `no healthy upstream`, 504 `upstream request timeout`),
/// not as a missing response; those mean "unreachable", not an answer of the peer.
/// `body` is the `snippet` of the response body.
pub fn is_envoy_upstream_failure(status: u32, body: &str) -> bool {
    match status {
        503 => body.starts_with("upstream connect error") || body == "no healthy upstream",
        504 => body == "upstream request timeout",
        _ => false,
    }
}

/// Whether a call without a usable answer may still have reached the peer and been
/// applied there (and so must be settled later if it changed anything). `status`:
/// `None` for no response at all (a timeout or reset the host reports as such); `body`
/// is the `snippet` of the body. Not applied: an answer the peer gave refusing the call
/// (4xx), and Envoy's local replies for a call never sent: no healthy upstream, a
/// connection that was never made (failure, timeout) and a full circuit breaker
/// (overflow). Anything else (no answer, Envoy's 504, a reset after connecting, a 5xx of
/// the peer, a 200 that does not parse) may have been applied.
pub fn may_have_been_applied(status: Option<u32>, body: &str) -> bool {
    match status {
        None => true,
        Some(400..=499) => false,
        Some(503) if body == "no healthy upstream" => false,
        Some(503) if body.starts_with("upstream connect error") => {
            // "... reset reason: <reason>[, transport failure reason: ...]" (also "the
            // latest reset reason" after retries).
            let reason = body.split("reset reason: ").nth(1).unwrap_or("");
            let reason = reason.split(',').next().unwrap_or("");
            !(reason.ends_with("connection failure") || reason == "connection timeout" || reason == "overflow")
        }
        Some(_) => true,
    }
}

/// `"<peer> answered HTTP <status>[: <snippet>]"`.
pub fn answered(peer: &str, status: u32, snippet: &str) -> String {
    if snippet.is_empty() {
        format!("{peer} answered HTTP {status}")
    } else {
        format!("{peer} answered HTTP {status}: {snippet}")
    }
}

/// The outcome of the last call, as the health records show it (`pending|ok|error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No call has finished yet.
    #[default]
    Pending,
    /// The last call succeeded.
    Ok,
    /// The last call failed.
    Error,
}

/// A failed call, as the health records show it (`last_error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError<K> {
    pub kind: K,
    pub message: String,
    /// RFC 3339.
    pub at: String,
}

impl<K> CallError<K> {
    pub fn new(now_ms: u64, kind: K, message: String) -> Self {
        CallError {
            kind,
            message,
            at: ts(now_ms),
        }
    }
}

/// The health every periodic outbound link (key-set pull, usage export) reports the
/// same way; each link's status record flattens it, so the status JSON keeps these
/// fields at its top level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHealth<K> {
    pub cluster: String,
    /// `http://<authority><path>`, for humans: the request goes through `cluster`.
    pub url: String,
    pub interval_ms: u64,
    /// Of the last call: `ok` or `error` (`pending` until one has finished).
    pub state: State,
    pub consecutive_failures: u32,
    pub last_success_at: Option<String>,
    /// The most recent error, kept after recovery (see `state`).
    pub last_error: Option<CallError<K>>,
    pub failures: u64,
}

impl<K> Default for LinkHealth<K> {
    fn default() -> Self {
        LinkHealth {
            cluster: String::new(),
            url: String::new(),
            interval_ms: 0,
            state: State::Pending,
            consecutive_failures: 0,
            last_success_at: None,
            last_error: None,
            failures: 0,
        }
    }
}

impl<K> LinkHealth<K> {
    /// `url` is shown without its query string (see `redact::display_url`).
    pub fn new(cluster: &str, authority: &str, path: &str, interval_ms: u64) -> Self {
        LinkHealth {
            cluster: cluster.to_string(),
            url: crate::core::redact::display_url(authority, path),
            interval_ms,
            ..LinkHealth::default()
        }
    }

    pub fn succeeded(&mut self, now_ms: u64) {
        self.state = State::Ok;
        self.consecutive_failures = 0;
        self.last_success_at = Some(ts(now_ms));
    }

    /// A failure that counts towards the back-off (see `Outbound::schedule`).
    pub fn failed(&mut self, now_ms: u64, kind: K, message: String) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.failed_without_backoff(now_ms, kind, message);
    }

    /// A failure shown in the health that must not slow the next call down.
    pub fn failed_without_backoff(&mut self, now_ms: u64, kind: K, message: String) {
        self.state = State::Error;
        self.failures += 1;
        self.last_error = Some(CallError::new(now_ms, kind, message));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct InFlight {
    token: Option<u32>,
    since_ms: u64,
}

/// Schedule and in-flight tracking of one periodic call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    interval_ms: u64,
    timeout_ms: u64,
    next_ms: u64,
    in_flight: Option<InFlight>,
}

impl Outbound {
    /// The first call is due at once.
    pub fn new(interval_ms: u64, timeout_ms: u64) -> Self {
        Outbound {
            interval_ms,
            timeout_ms,
            next_ms: 0,
            in_flight: None,
        }
    }

    /// Gives up a call in flight for longer than timeout + grace; true if it did (the
    /// caller records the failure).
    pub fn give_up_lost(&mut self, now_ms: u64) -> bool {
        match self.in_flight {
            Some(f) if now_ms >= f.since_ms + self.timeout_ms + LOST_CALL_GRACE_MS => {
                self.in_flight = None;
                true
            }
            _ => false,
        }
    }

    /// Whether a call should start now: none in flight and the next one is due.
    pub fn due(&self, now_ms: u64) -> bool {
        self.in_flight.is_none() && now_ms >= self.next_ms
    }

    /// A call starts now (token not known yet).
    pub fn begin(&mut self, now_ms: u64) {
        self.in_flight = Some(InFlight {
            token: None,
            since_ms: now_ms,
        });
    }

    /// The host accepted the call under `token`.
    pub fn dispatched(&mut self, token: u32) {
        if let Some(f) = &mut self.in_flight {
            f.token = Some(token);
        }
    }

    /// Whether `token` is the call in flight.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.is_some_and(|f| f.token == Some(token))
    }

    /// Ends the call in flight (answered, or never made).
    pub fn end(&mut self) {
        self.in_flight = None;
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// When the next call is due (unix ms).
    pub fn next_ms(&self) -> u64 {
        self.next_ms
    }

    /// Sets when the next call is due; returns it.
    pub fn set_next(&mut self, at_ms: u64) -> u64 {
        self.next_ms = at_ms;
        at_ms
    }

    /// Schedules the next call after `failures` consecutive failures; returns when.
    pub fn schedule(&mut self, now_ms: u64, failures: u32) -> u64 {
        self.set_next(now_ms + self.delay_ms(failures))
    }

    /// Delay before the next call after `failures` consecutive failures (0: healthy).
    pub fn delay_ms(&self, failures: u32) -> u64 {
        if failures == 0 {
            return self.interval_ms;
        }
        let exp = (failures - 1).min(32);
        MIN_BACKOFF_MS.saturating_mul(1u64 << exp).min(self.interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_the_interval() {
        let o = Outbound::new(10_000, 2_000);
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 40, u32::MAX].map(|f| o.delay_ms(f)),
            [10_000, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]
        );
        let short = Outbound::new(500, 2_000);
        assert_eq!([0, 1, 2].map(|f| short.delay_ms(f)), [500, 500, 500]);
    }

    #[test]
    fn one_call_in_flight_and_lost_calls_are_given_up() {
        let mut o = Outbound::new(10_000, 2_000);
        assert!(o.due(T0), "first call due at once");
        assert!(!o.give_up_lost(T0));
        o.begin(T0);
        assert!(o.in_flight() && !o.due(T0) && !o.owns(7));
        o.dispatched(7);
        assert!(o.owns(7) && !o.owns(8));
        assert!(!o.give_up_lost(T0 + 2_000 + LOST_CALL_GRACE_MS - 1));
        assert!(o.give_up_lost(T0 + 2_000 + LOST_CALL_GRACE_MS));
        assert!(!o.in_flight() && !o.owns(7));
        assert!(!o.give_up_lost(T0 + 60_000), "only once");
        assert_eq!(o.schedule(T0, 2), T0 + 2_000);
        assert!(!o.due(T0 + 1_999));
        assert!(o.due(T0 + 2_000));
        o.begin(T0 + 2_000);
        o.dispatched(9);
        o.end();
        assert!(!o.in_flight() && !o.owns(9));
        assert_eq!(o.set_next(T0 + 5), T0 + 5);
        assert_eq!(o.next_ms(), T0 + 5);
    }

    #[test]
    fn envoy_local_replies_are_upstream_failures() {
        let connect = snippet(b"upstream connect error or disconnect/reset before headers. reset reason: x");
        assert!(is_envoy_upstream_failure(503, &connect));
        assert!(is_envoy_upstream_failure(503, "no healthy upstream"));
        assert!(is_envoy_upstream_failure(504, "upstream request timeout"));
        assert!(!is_envoy_upstream_failure(503, "maintenance"));
        assert!(!is_envoy_upstream_failure(502, "no healthy upstream"));
        assert!(!is_envoy_upstream_failure(504, "upstream request timeout, retry"));
    }

    #[test]
    fn a_call_may_have_been_applied_unless_it_was_refused_or_never_sent() {
        let reset = "upstream connect error or disconnect/reset before headers. reset reason:";
        for (status, body, applied) in [
            (None, "", true),
            (Some(504), "upstream request timeout", true),
            (Some(503), "store unavailable", true),
            (Some(500), "", true),
            (Some(200), "not json", true),
            (Some(503), &*format!("{reset} connection termination"), true),
            (Some(503), &*format!("{reset} remote reset"), true),
            (Some(503), &*format!("{reset} connection failure"), false),
            (Some(503), &*format!("{reset} remote connection failure"), false),
            (Some(503), &*format!("{reset} connection timeout"), false),
            (Some(503), &*format!("{reset} overflow"), false),
            (Some(503), "no healthy upstream", false),
            (
                Some(503),
                "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: \
                 remote connection failure, transport failure reason: delayed connect error: Connection refused",
                false,
            ),
            (Some(400), "bad request", false),
            (Some(413), "", false),
        ] {
            assert_eq!(may_have_been_applied(status, body), applied, "{status:?} {body}");
        }
    }

    #[test]
    fn snippets_and_messages() {
        assert_eq!(snippet(b"  bad\n\tevent\x00 \xff"), "bad event");
        assert_eq!(snippet(&[b'a'; 500]).len(), SNIPPET_CHARS);
        assert_eq!(answered("collector", 400, ""), "collector answered HTTP 400");
        assert_eq!(answered("source", 500, "oops"), "source answered HTTP 500: oops");
    }

    #[test]
    fn state_and_times_serialize_as_the_health_records_show_them() {
        let j = serde_json::to_value([State::Pending, State::Ok, State::Error]).unwrap();
        assert_eq!(j, serde_json::json!(["pending", "ok", "error"]));
        assert_eq!(State::default(), State::Pending);
        assert_eq!(ts(T0 + 999), "2023-11-14T22:13:20Z");
        let e = CallError::new(T0, State::Error, "m".into());
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"kind": "error", "message": "m", "at": "2023-11-14T22:13:20Z"})
        );
        assert_eq!(serde_json::from_value::<CallError<State>>(j).unwrap(), e);
    }
}
