//! Usage counts in the shape the usage API, the CloudEvents export and the `keymeter
//! usage` billing job all speak. One serde type, so the Envoy side and the CLI cannot
//! drift apart; `usage::Counters` stays the compact array form stored in shared data.

use crate::core::metering::usage::Counters;
use serde::{Deserialize, Serialize};

/// Requests by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requests {
    pub admitted: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub rate_limited: u64,
    pub quota_exceeded: u64,
}

/// Responses by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Responses {
    #[serde(rename = "1xx")]
    pub c1: u64,
    #[serde(rename = "2xx")]
    pub c2: u64,
    #[serde(rename = "3xx")]
    pub c3: u64,
    #[serde(rename = "4xx")]
    pub c4: u64,
    #[serde(rename = "5xx")]
    pub c5: u64,
}

/// One set of usage counters. Missing fields read as zero, so a newer Envoy adding a
/// field does not break an older billing job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageCounts {
    pub requests: Requests,
    pub responses: Responses,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub cost_units: u64,
}

const N_COUNTS: usize = 13;

impl UsageCounts {
    fn to_array(self) -> [u64; N_COUNTS] {
        let (q, r) = (self.requests, self.responses);
        [
            q.admitted,
            q.unauthorized,
            q.forbidden,
            q.rate_limited,
            q.quota_exceeded,
            r.c1,
            r.c2,
            r.c3,
            r.c4,
            r.c5,
            self.request_bytes,
            self.response_bytes,
            self.cost_units,
        ]
    }

    fn from_array(a: [u64; N_COUNTS]) -> UsageCounts {
        UsageCounts {
            requests: Requests {
                admitted: a[0],
                unauthorized: a[1],
                forbidden: a[2],
                rate_limited: a[3],
                quota_exceeded: a[4],
            },
            responses: Responses {
                c1: a[5],
                c2: a[6],
                c3: a[7],
                c4: a[8],
                c5: a[9],
            },
            request_bytes: a[10],
            response_bytes: a[11],
            cost_units: a[12],
        }
    }

    /// Field-by-field sum, saturating (a billing job summing many Envoys must not wrap).
    pub fn add(&mut self, o: &UsageCounts) {
        let (mut a, b) = (self.to_array(), o.to_array());
        for (x, y) in a.iter_mut().zip(b) {
            *x = x.saturating_add(y);
        }
        *self = UsageCounts::from_array(a);
    }

    /// `self - earlier`, field by field, clamped at zero; and whether any field went down
    /// (which a cumulative counter of one instance never does).
    pub fn since(&self, earlier: &UsageCounts) -> (UsageCounts, bool) {
        let (mut a, b) = (self.to_array(), earlier.to_array());
        let mut went_down = false;
        for (x, y) in a.iter_mut().zip(b) {
            went_down |= *x < y;
            *x = x.saturating_sub(y);
        }
        (UsageCounts::from_array(a), went_down)
    }

    /// Refused requests of an authentic key: everything but `admitted`.
    pub fn denied(&self) -> u64 {
        let q = self.requests;
        q.unauthorized
            .saturating_add(q.forbidden)
            .saturating_add(q.rate_limited)
            .saturating_add(q.quota_exceeded)
    }

    pub fn is_zero(&self) -> bool {
        *self == UsageCounts::default()
    }
}

impl From<&Counters> for UsageCounts {
    /// `Counters` indexes requests like `Outcome::ALL` and responses like
    /// `STATUS_CLASSES`; the array order of `to_array` is the same.
    fn from(c: &Counters) -> UsageCounts {
        let mut a = [0u64; N_COUNTS];
        a[..5].copy_from_slice(&c.requests);
        a[5..10].copy_from_slice(&c.responses);
        a[10] = c.request_bytes;
        a[11] = c.response_bytes;
        a[12] = c.cost_units;
        UsageCounts::from_array(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metering::usage::Outcome;

    #[test]
    fn json_shape_is_the_usage_api_shape() {
        let mut c = Counters::default();
        c.record(Outcome::Admitted, 200, 3, 5, 2);
        c.record(Outcome::QuotaExceeded, 429, 0, 7, 2);
        let v = serde_json::to_value(UsageCounts::from(&c)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "requests": {"admitted": 1, "unauthorized": 0, "forbidden": 0,
                             "rate_limited": 0, "quota_exceeded": 1},
                "responses": {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 0},
                "request_bytes": 3, "response_bytes": 12, "cost_units": 2,
            })
        );
    }

    #[test]
    fn add_and_since_are_field_by_field() {
        let a = UsageCounts::from_array(std::array::from_fn(|i| i as u64 + 1));
        assert_eq!(a.to_array(), std::array::from_fn(|i| i as u64 + 1));
        let mut b = a;
        b.add(&a);
        assert_eq!(b.to_array(), std::array::from_fn(|i| 2 * (i as u64 + 1)));
        assert_eq!(b.since(&a), (a, false));
        let (d, down) = a.since(&b);
        assert!(d.is_zero() && down);
        assert_eq!(a.denied(), 2 + 3 + 4 + 5);
    }

    #[test]
    fn since_clamps_and_reports_a_reset() {
        let mut a = UsageCounts::default();
        a.requests.admitted = 5;
        a.response_bytes = 10;
        let mut b = a;
        b.requests.admitted = 7;
        assert_eq!(b.since(&a).0.requests.admitted, 2);
        assert!(!b.since(&a).1);
        let (d, went_down) = a.since(&b);
        assert_eq!(d.requests.admitted, 0);
        assert!(went_down);
    }

    #[test]
    fn add_saturates() {
        let mut a = UsageCounts {
            cost_units: u64::MAX - 1,
            ..Default::default()
        };
        a.add(&UsageCounts {
            cost_units: 5,
            ..Default::default()
        });
        assert_eq!(a.cost_units, u64::MAX);
        assert_eq!(a.denied(), 0);
    }
}
