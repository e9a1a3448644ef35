//! Fleet health across one Envoy's workers, for `GET /v1/status` (`fleet`).
//!
//! Every worker has its own circuit breaker and tracks its own subjects, so one worker
//! can be partitioned while another is connected. Each worker publishes its own entry
//! (at least every [`HEARTBEAT_MS`]); the node's `state` is the worst live worker's
//! (`partitioned` > `probing` > `connected`), never whichever worker wrote last. An
//! entry not refreshed for [`STALE_MS`] (a worker of an unloaded plugin that could not
//! remove its own) is dropped.

use serde::{Deserialize, Serialize};

/// A live worker refreshes its entry at least this often.
pub const HEARTBEAT_MS: u64 = 1_000;
/// An entry older than this is a worker that is gone.
pub const STALE_MS: u64 = 10_000;

/// One worker's view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// The worker (`w<n>`, unique in the process).
    pub worker: String,
    /// `connected`, `partitioned` (its breaker is open), `probing` (half-open, with
    /// subjects to try it on) or `idle` (half-open with nothing to call for: it stays so
    /// until traffic comes, and does not make the node look degraded).
    pub state: String,
    /// Subjects this worker tracks (workers overlap: a subject busy on two workers
    /// counts on both).
    pub subjects: usize,
    /// Quota units admitted on overdraft, not yet reported, in the subjects it tracks.
    pub overdraft_in_use: u64,
    pub refill_latency_ms_last: u64,
    pub updated_at_ms: u64,
}

fn rank(state: &str) -> u8 {
    match state {
        "partitioned" => 2,
        "probing" => 1,
        _ => 0,
    }
}

/// The node's summary of its live workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The worst live worker's state (`connected` when none is partitioned or probing).
    pub state: String,
    /// Workers partitioned or probing.
    pub degraded_workers: usize,
    /// The most any one worker tracks / sees on overdraft (entries are shared by the
    /// workers, so a sum would count a subject once per worker).
    pub subjects: usize,
    pub overdraft_in_use: u64,
}

/// Puts `mine` in place of its worker's previous entry.
pub fn upsert(workers: &mut Vec<WorkerHealth>, mine: WorkerHealth) {
    match workers.iter_mut().find(|w| w.worker == mine.worker) {
        Some(w) => *w = mine,
        None => workers.push(mine),
    }
}

/// Drops stale entries at `now_ms` and summarises the rest.
pub fn summarize(workers: &mut Vec<WorkerHealth>, now_ms: u64) -> Summary {
    workers.retain(|w| now_ms.saturating_sub(w.updated_at_ms) <= STALE_MS);
    let worst = workers.iter().map(|w| w.state.as_str()).max_by_key(|s| rank(s));
    Summary {
        state: worst.filter(|s| rank(s) > 0).unwrap_or("connected").to_string(),
        degraded_workers: workers.iter().filter(|w| rank(&w.state) > 0).count(),
        subjects: workers.iter().map(|w| w.subjects).max().unwrap_or(0),
        overdraft_in_use: workers.iter().map(|w| w.overdraft_in_use).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(worker: &str, state: &str, at: u64) -> WorkerHealth {
        WorkerHealth {
            worker: worker.into(),
            state: state.into(),
            subjects: 2,
            overdraft_in_use: u64::from(state == "partitioned") * 3,
            refill_latency_ms_last: 1,
            updated_at_ms: at,
        }
    }

    #[test]
    fn the_worst_live_worker_decides_whoever_wrote_last() {
        let mut ws = Vec::new();
        upsert(&mut ws, w("a", "partitioned", 1_000));
        // Worker b, connected, publishes after a: the node is still partitioned.
        upsert(&mut ws, w("b", "connected", 1_500));
        let s = summarize(&mut ws, 1_600);
        assert_eq!(
            (s.state.as_str(), s.degraded_workers, s.overdraft_in_use),
            ("partitioned", 1, 3)
        );
        upsert(&mut ws, w("a", "probing", 1_700));
        assert_eq!(summarize(&mut ws, 1_800).state, "probing");
        upsert(&mut ws, w("a", "connected", 1_900));
        let s = summarize(&mut ws, 2_000);
        assert_eq!((s.state.as_str(), s.degraded_workers, s.subjects), ("connected", 0, 2));
        // A worker with nothing to try its breaker on is idle, not degraded.
        upsert(&mut ws, w("a", "idle", 2_100));
        assert_eq!(ws.len(), 2);
        let s = summarize(&mut ws, 2_200);
        assert_eq!((s.state.as_str(), s.degraded_workers), ("connected", 0));
    }

    #[test]
    fn workers_gone_for_long_are_dropped() {
        let mut ws = Vec::new();
        upsert(&mut ws, w("old", "partitioned", 0));
        upsert(&mut ws, w("new", "connected", STALE_MS + 1));
        let s = summarize(&mut ws, STALE_MS + 1);
        assert_eq!(s.state, "connected");
        assert_eq!(ws.iter().map(|w| w.worker.as_str()).collect::<Vec<_>>(), ["new"]);
        assert_eq!(summarize(&mut Vec::new(), 0).state, "connected");
    }
}
