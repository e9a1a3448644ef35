//! `keymeter usage`: the example billing job.
//!
//! Pages through `GET {admin}/v1/usage` on every Envoy, sums the per-lineage counters
//! across Envoys and prints them per consumer, key (lineage) or plan. Each Envoy's
//! counters are cumulative since that Envoy process started; its `instance_id` changes
//! when it restarts (counters start again from zero).
//!
//! With `--since-file`, the last seen totals per (instance_id, lineage) are kept in a
//! file and only the change since the previous run is printed. A lineage or instance the
//! file does not know counts from zero.

//!
//! `wire` reads the usage API, `since` keeps the --since-file totals, `aggregate` sums
//! rows and `render` prints them.

mod aggregate;
mod render;
mod since;
mod wire;

use aggregate::aggregate;
use render::{render_csv, render_json, render_table};
use since::{load_state, save_state, since};
use wire::{check_distinct, fetch};

use crate::error::Result;
use crate::output;
use crate::Ctx;
use keymeter::core::time::format_rfc3339;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Consumer,
    Key,
    Plan,
}

impl By {
    fn label(self) -> &'static str {
        match self {
            By::Consumer => "consumer",
            By::Key => "key",
            By::Plan => "plan",
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub struct Options<'a> {
    pub consumer: Option<&'a str>,
    pub format: Format,
    pub by: By,
    pub since_file: Option<&'a Path>,
}

pub fn run(ctx: &Ctx, o: Options) -> Result<()> {
    let admins = ctx.admins("usage")?;
    // Read the state first: a broken file fails before any request is made.
    let mut state = o.since_file.map(load_state).transpose()?;
    let mut snaps = Vec::with_capacity(admins.len());
    for a in &admins {
        snaps.push(fetch(a, o.consumer)?);
    }
    check_distinct(&snaps)?;
    let (counted, baselines) = match (&mut state, o.since_file) {
        (Some(st), Some(path)) => {
            let (deltas, infos) = since(st, &snaps)?;
            for (s, b) in snaps.iter().zip(&infos) {
                let id = s.instance_id.as_deref().unwrap_or("?");
                for old in &b.replaced {
                    output::warn(&format!(
                        "{}: Envoy restarted since the last run (instance {old} is now {id}): \
                         its usage after the last run and before the restart is lost; counting {id} from zero",
                        s.admin
                    ));
                }
                if !b.went_down.is_empty() {
                    output::warn(&format!(
                        "{}: counters went down for lineage(s) {} of instance {id}; counted as no change",
                        s.admin,
                        b.went_down.join(", ")
                    ));
                }
            }
            st.updated_at = Some(format_rfc3339(now()));
            // Saved before printing: if saving fails, nothing is reported as billed.
            save_state(path, st)?;
            (deltas, Some(infos))
        }
        _ => (snaps.clone(), None),
    };
    let groups = aggregate(counted.iter().flat_map(|s| s.items.values()), o.by);
    match o.format {
        Format::Json => ctx
            .out
            .json(&render_json(&groups, o.by, &snaps, baselines.as_deref(), o.since_file)),
        Format::Csv => print!("{}", render_csv(&groups, o.by)),
        Format::Table => {
            print!("{}", render_table(&groups, o.by));
            println!();
            let what = if o.since_file.is_some() {
                "change since the last run"
            } else {
                "cumulative since each Envoy started"
            };
            println!("{what}, from {} Envoy(s):", snaps.len());
            for (i, s) in snaps.iter().enumerate() {
                let mut line = format!(
                    "  {}  instance {}  started {}",
                    s.admin,
                    s.instance_id.as_deref().unwrap_or("?"),
                    s.started_at.as_deref().unwrap_or("?")
                );
                if let Some(b) = baselines.as_ref().and_then(|b| b.get(i)) {
                    if !b.replaced.is_empty() {
                        line.push_str(&format!("  (restarted; was {})", b.replaced.join(", ")));
                    } else if b.new_instance {
                        line.push_str("  (new: counted from zero)");
                    }
                }
                println!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
