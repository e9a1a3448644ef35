//! `--since-file`: the totals seen by the last run, so each run prints only what changed.

use super::wire::Snapshot;
use crate::error::{failed, Result};
use crate::keyfile::write_atomic;
use keymeter::core::metering::counts::UsageCounts;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `format` of the --since-file document.
pub const STATE_FORMAT: u32 = 1;

/// The --since-file document: the totals seen by the last run, per instance and lineage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceState {
    pub admin: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub lineages: BTreeMap<String, UsageCounts>,
}

/// What the state said about one snapshot's instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baseline {
    /// The instance was not in the state: all its counts are new.
    pub new_instance: bool,
    /// Instances the state had for the same admin URL (the Envoy restarted since).
    pub replaced: Vec<String>,
    /// Lineages whose counters went down (clamped to zero; should not happen).
    pub went_down: Vec<String>,
}

/// Turns cumulative snapshots into changes since `state`, and updates `state` to the
/// snapshots' totals. Lineages not in a snapshot (e.g. other consumers with --consumer)
/// keep their stored totals; instances replaced by a restart are dropped.
pub fn since(state: &mut State, snaps: &[Snapshot]) -> Result<(Vec<Snapshot>, Vec<Baseline>)> {
    let mut deltas = Vec::new();
    let mut infos = Vec::new();
    for s in snaps {
        let id = s.instance_id.clone().ok_or_else(|| {
            failed(format!(
                "{}: the usage API reported no instance_id: cannot compute changes for --since-file",
                s.admin
            ))
        })?;
        let mut info = Baseline::default();
        let replaced: Vec<String> = state
            .instances
            .iter()
            .filter(|(k, v)| **k != id && v.admin == s.admin)
            .map(|(k, _)| k.clone())
            .collect();
        for r in &replaced {
            state.instances.remove(r);
        }
        info.replaced = replaced;
        info.new_instance = !state.instances.contains_key(&id);
        let entry = state.instances.entry(id).or_default();
        entry.admin.clone_from(&s.admin);
        entry.started_at.clone_from(&s.started_at);
        let mut delta = s.clone();
        for (lineage, item) in delta.items.iter_mut() {
            let prev = entry.lineages.insert(lineage.clone(), item.counts).unwrap_or_default();
            let (d, down) = item.counts.since(&prev);
            if down {
                info.went_down.push(lineage.clone());
            }
            item.counts = d;
        }
        deltas.push(delta);
        infos.push(info);
    }
    Ok((deltas, infos))
}

pub fn load_state(path: &Path) -> Result<State> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(State {
                format: STATE_FORMAT,
                ..State::default()
            })
        }
        Err(e) => return Err(failed(format!("{}: cannot read: {e}", path.display()))),
    };
    let state: State = serde_json::from_slice(&bytes)
        .map_err(|e| failed(format!("{}: not a keymeter usage state file: {e}", path.display())))?;
    if state.format != STATE_FORMAT {
        return Err(failed(format!(
            "{}: unsupported state format {} (this keymeter writes {STATE_FORMAT})",
            path.display(),
            state.format
        )));
    }
    Ok(state)
}

pub fn save_state(path: &Path, state: &State) -> Result<()> {
    let mut text = serde_json::to_string_pretty(state).expect("state serializes");
    text.push('\n');
    write_atomic(path, text.as_bytes()).map_err(|e| failed(format!("{}: cannot write: {e}", path.display())))
}
