//! `usage`: the example billing job.
//!
//! Pages through `GET {admin}/v1/usage` on every Envoy, sums the per-lineage counters
//! across Envoys and prints them per consumer, key (lineage) or plan. Each Envoy's
//! counters are cumulative since that Envoy process started; its `instance_id` changes
//! when it restarts (counters start again from zero).
//!
//! With `--since-file`, the last seen totals per (instance_id, lineage) are kept in a
//! file and only the change since the previous run is printed. A lineage or instance the
//! file does not know counts from zero.

use crate::admin_client::Admin;
use crate::error::{failed, Result};
use crate::keyfile::write_atomic;
use crate::output;
use crate::Ctx;
use keymeter::core::time::format_rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Items asked for per page.
pub const PAGE_LIMIT: usize = 1000;
const USAGE_API: &str = "/v1/usage";
/// `format` of the --since-file document.
const STATE_FORMAT: u32 = 1;

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

/// Requests by outcome, as in the usage API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requests {
    pub admitted: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub rate_limited: u64,
    pub quota_exceeded: u64,
}

/// Responses by status class, as in the usage API.
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

/// One set of usage counters (the usage API's shape, also used in the --since-file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    pub requests: Requests,
    pub responses: Responses,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub cost_units: u64,
}

const N_COUNTS: usize = 13;

impl Counts {
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

    fn from_array(a: [u64; N_COUNTS]) -> Counts {
        Counts {
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

    pub fn add(&mut self, o: &Counts) {
        let (mut a, b) = (self.to_array(), o.to_array());
        for (x, y) in a.iter_mut().zip(b) {
            *x = x.saturating_add(y);
        }
        *self = Counts::from_array(a);
    }

    /// `self - earlier`, field by field, clamped at zero; and whether any field went down
    /// (which a cumulative counter of one instance never does).
    pub fn since(&self, earlier: &Counts) -> (Counts, bool) {
        let (mut a, b) = (self.to_array(), earlier.to_array());
        let mut went_down = false;
        for (x, y) in a.iter_mut().zip(b) {
            went_down |= *x < y;
            *x = x.saturating_sub(y);
        }
        (Counts::from_array(a), went_down)
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
        *self == Counts::default()
    }

    /// The flat JSON fields of an output row.
    fn json_fields(&self, row: &mut Map<String, Value>) {
        let q = self.requests;
        for (k, v) in [
            ("admitted", q.admitted),
            ("denied", self.denied()),
            ("unauthorized", q.unauthorized),
            ("forbidden", q.forbidden),
            ("rate_limited", q.rate_limited),
            ("quota_exceeded", q.quota_exceeded),
            ("cost_units", self.cost_units),
            ("request_bytes", self.request_bytes),
            ("response_bytes", self.response_bytes),
        ] {
            row.insert(k.into(), v.into());
        }
        row.insert(
            "responses".into(),
            serde_json::to_value(self.responses).expect("counters serialize"),
        );
    }

    /// CSV columns, in `CSV_COUNT_COLUMNS` order.
    fn csv_cells(&self) -> Vec<String> {
        let (q, r) = (self.requests, self.responses);
        [
            q.admitted,
            self.denied(),
            q.unauthorized,
            q.forbidden,
            q.rate_limited,
            q.quota_exceeded,
            self.cost_units,
            self.request_bytes,
            self.response_bytes,
            r.c1,
            r.c2,
            r.c3,
            r.c4,
            r.c5,
        ]
        .iter()
        .map(u64::to_string)
        .collect()
    }

    fn table_cells(&self) -> Vec<String> {
        [
            self.requests.admitted,
            self.denied(),
            self.cost_units,
            self.request_bytes,
            self.response_bytes,
        ]
        .iter()
        .map(u64::to_string)
        .collect()
    }
}

const CSV_COUNT_COLUMNS: [&str; 14] = [
    "admitted",
    "denied",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "quota_exceeded",
    "cost_units",
    "request_bytes",
    "response_bytes",
    "responses_1xx",
    "responses_2xx",
    "responses_3xx",
    "responses_4xx",
    "responses_5xx",
];
const TABLE_COUNT_COLUMNS: [&str; 5] = ["ADMITTED", "DENIED", "COST_UNITS", "REQUEST_BYTES", "RESPONSE_BYTES"];

/// One usage item: a lineage's cumulative counters on one Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Item {
    pub lineage: String,
    /// The last key id, consumer and plan this Envoy saw for the lineage.
    #[serde(default)]
    pub key_id: String,
    #[serde(default)]
    pub consumer: String,
    #[serde(default)]
    pub plan: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// One page of `GET /v1/usage`.
#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    pub items: Vec<Item>,
    #[serde(default)]
    pub next_cursor: Option<u64>,
}

/// Everything one Envoy reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub admin: String,
    pub instance_id: Option<String>,
    pub started_at: Option<String>,
    /// By lineage.
    pub items: BTreeMap<String, Item>,
}

/// `/v1/usage?cursor=N&limit=L[&consumer=C]`.
pub fn page_path(cursor: u64, consumer: Option<&str>) -> String {
    let mut p = format!("{USAGE_API}?cursor={cursor}&limit={PAGE_LIMIT}");
    if let Some(c) = consumer {
        p.push_str("&consumer=");
        p.push_str(&percent_encode(c));
    }
    p
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Pages through one Envoy's usage: `get_page(cursor)` until `next_cursor` is null.
/// A lineage listed twice keeps its later (newer) counters.
pub fn collect(admin: &str, mut get_page: impl FnMut(u64) -> Result<Page>) -> Result<Snapshot> {
    let mut cursor = 0;
    let mut snap: Option<Snapshot> = None;
    loop {
        let page = get_page(cursor)?;
        let s = snap.get_or_insert_with(|| Snapshot {
            admin: admin.to_string(),
            instance_id: page.instance_id.clone(),
            started_at: page.started_at.clone(),
            items: BTreeMap::new(),
        });
        if s.instance_id != page.instance_id {
            return Err(failed(format!(
                "{admin}: Envoy restarted while its usage was read (instance {}, then {}): run again",
                s.instance_id.as_deref().unwrap_or("?"),
                page.instance_id.as_deref().unwrap_or("?")
            )));
        }
        for item in page.items {
            s.items.insert(item.lineage.clone(), item);
        }
        match page.next_cursor {
            None => break,
            Some(n) if n <= cursor => {
                return Err(failed(format!(
                    "{admin}: the usage API's next_cursor {n} does not advance past {cursor}"
                )))
            }
            Some(n) => cursor = n,
        }
    }
    Ok(snap.expect("at least one page"))
}

fn fetch(admin: &Admin, consumer: Option<&str>) -> Result<Snapshot> {
    let base = admin.url("");
    collect(&base, |cursor| {
        let path = page_path(cursor, consumer);
        let resp = admin.call("GET", &path, None).map_err(failed)?;
        if !resp.ok() {
            return Err(failed(format!("{}: {}", admin.url(&path), resp.problem())));
        }
        serde_json::from_slice(&resp.body).map_err(|e| failed(format!("{}: not a usage page: {e}", admin.url(&path))))
    })
}

/// Two admin URLs that reach the same Envoy would count its usage twice.
fn check_distinct(snaps: &[Snapshot]) -> Result<()> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for s in snaps {
        if let Some(id) = s.instance_id.as_deref() {
            if let Some(other) = seen.insert(id, &s.admin) {
                return Err(failed(format!(
                    "{other} and {} are the same Envoy (instance {id}): its usage would be counted twice",
                    s.admin
                )));
            }
        }
    }
    Ok(())
}

/// One output row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// The consumer, lineage or plan.
    pub name: String,
    pub consumers: BTreeSet<String>,
    pub plans: BTreeSet<String>,
    pub key_ids: BTreeSet<String>,
    pub counts: Counts,
}

/// Sums items into rows, sorted by name. Per key means per lineage: a key and its
/// rotated successors are one row. Rows with nothing counted are left out.
pub fn aggregate<'a>(items: impl IntoIterator<Item = &'a Item>, by: By) -> Vec<Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for it in items {
        let name = match by {
            By::Consumer => &it.consumer,
            By::Key => &it.lineage,
            By::Plan => &it.plan,
        };
        let g = groups.entry(name.clone()).or_insert_with(|| Group {
            name: name.clone(),
            ..Group::default()
        });
        g.consumers.insert(it.consumer.clone());
        g.plans.insert(it.plan.clone());
        if !it.key_id.is_empty() {
            g.key_ids.insert(it.key_id.clone());
        }
        g.counts.add(&it.counts);
    }
    groups.into_values().filter(|g| !g.counts.is_zero()).collect()
}

// ------------------------------------------------------------------ --since-file

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
    pub lineages: BTreeMap<String, Counts>,
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

fn load_state(path: &Path) -> Result<State> {
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

fn save_state(path: &Path, state: &State) -> Result<()> {
    let mut text = serde_json::to_string_pretty(state).expect("state serializes");
    text.push('\n');
    write_atomic(path, text.as_bytes()).map_err(|e| failed(format!("{}: cannot write: {e}", path.display())))
}

// ------------------------------------------------------------------ output

fn group_columns(by: By) -> &'static [&'static str] {
    match by {
        By::Consumer => &["consumer"],
        By::Plan => &["plan"],
        By::Key => &["lineage", "key_ids", "consumer", "plan"],
    }
}

fn join(set: &BTreeSet<String>, sep: &str) -> String {
    set.iter().map(String::as_str).collect::<Vec<_>>().join(sep)
}

fn group_cells(g: &Group, by: By, sep: &str) -> Vec<String> {
    match by {
        By::Consumer | By::Plan => vec![g.name.clone()],
        By::Key => vec![
            g.name.clone(),
            join(&g.key_ids, sep),
            join(&g.consumers, sep),
            join(&g.plans, sep),
        ],
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn render_csv(groups: &[Group], by: By) -> String {
    let mut out = String::new();
    let header: Vec<&str> = group_columns(by)
        .iter()
        .chain(CSV_COUNT_COLUMNS.iter())
        .copied()
        .collect();
    out.push_str(&header.join(","));
    out.push('\n');
    for g in groups {
        let cells: Vec<String> = group_cells(g, by, " ")
            .into_iter()
            .chain(g.counts.csv_cells())
            .map(|c| csv_cell(&c))
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

pub fn render_table(groups: &[Group], by: By) -> String {
    let header: Vec<String> = group_columns(by)
        .iter()
        .map(|c| c.to_ascii_uppercase())
        .chain(TABLE_COUNT_COLUMNS.iter().map(|c| c.to_string()))
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            group_cells(g, by, ",")
                .into_iter()
                .chain(g.counts.table_cells())
                .collect()
        })
        .collect();
    let mut total = Counts::default();
    for g in groups {
        total.add(&g.counts);
    }
    let mut last = vec![String::new(); group_columns(by).len()];
    last[0] = "(total)".into();
    last.extend(total.table_cells());
    rows.push(last);
    output::table(&header, &rows)
}

fn group_json(g: &Group, by: By) -> Value {
    let mut row = Map::new();
    match by {
        By::Consumer => {
            row.insert("consumer".into(), g.name.clone().into());
        }
        By::Plan => {
            row.insert("plan".into(), g.name.clone().into());
        }
        By::Key => {
            row.insert("lineage".into(), g.name.clone().into());
            row.insert("key_ids".into(), json!(g.key_ids));
            row.insert("consumer".into(), join(&g.consumers, ",").into());
            row.insert("plan".into(), join(&g.plans, ",").into());
        }
    }
    g.counts.json_fields(&mut row);
    Value::Object(row)
}

/// The `--format json` document.
pub fn render_json(
    groups: &[Group],
    by: By,
    snaps: &[Snapshot],
    baselines: Option<&[Baseline]>,
    since_file: Option<&Path>,
) -> Value {
    let mut total = Counts::default();
    for g in groups {
        total.add(&g.counts);
    }
    let mut totals = Map::new();
    total.json_fields(&mut totals);
    let instances: Vec<Value> = snaps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = json!({
                "admin": s.admin,
                "instance_id": s.instance_id,
                "started_at": s.started_at,
                "lineages": s.items.len(),
            });
            if let Some(b) = baselines.and_then(|b| b.get(i)) {
                v["new_instance"] = json!(b.new_instance);
                v["restarted"] = json!(!b.replaced.is_empty());
                v["previous_instance_ids"] = json!(b.replaced);
            }
            v
        })
        .collect();
    json!({
        "by": by.label(),
        "mode": if since_file.is_some() { "since" } else { "cumulative" },
        "since_file": since_file.map(|p| p.display().to_string()),
        "generated_at": format_rfc3339(now()),
        "instances": instances,
        "rows": groups.iter().map(|g| group_json(g, by)).collect::<Vec<_>>(),
        "totals": totals,
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

// ------------------------------------------------------------------ the command

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
mod tests {
    use super::*;

    fn counts(admitted: u64, rate_limited: u64, cost: u64) -> Counts {
        Counts {
            requests: Requests {
                admitted,
                rate_limited,
                ..Requests::default()
            },
            responses: Responses {
                c2: admitted,
                c4: rate_limited,
                ..Responses::default()
            },
            request_bytes: 10 * admitted,
            response_bytes: 100 * admitted,
            cost_units: cost,
        }
    }

    fn item(lineage: &str, key_id: &str, consumer: &str, plan: &str, c: Counts) -> Item {
        Item {
            lineage: lineage.into(),
            key_id: key_id.into(),
            consumer: consumer.into(),
            plan: plan.into(),
            counts: c,
        }
    }

    fn snap(admin: &str, id: &str, items: Vec<Item>) -> Snapshot {
        Snapshot {
            admin: admin.into(),
            instance_id: Some(id.into()),
            started_at: Some("2030-01-01T00:00:00Z".into()),
            items: items.into_iter().map(|i| (i.lineage.clone(), i)).collect(),
        }
    }

    #[test]
    fn parses_the_api_item_shape() {
        let v = json!({"lineage": "L1", "key_id": "K2", "consumer": "acme", "plan": "pro",
            "requests": {"admitted": 5, "unauthorized": 1, "forbidden": 2, "rate_limited": 3, "quota_exceeded": 4},
            "responses": {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 10, "5xx": 1},
            "request_bytes": 7, "response_bytes": 8, "cost_units": 9, "some_future_field": true});
        let it: Item = serde_json::from_value(v).unwrap();
        assert_eq!((it.lineage.as_str(), it.key_id.as_str()), ("L1", "K2"));
        assert_eq!(it.counts.requests.quota_exceeded, 4);
        assert_eq!(it.counts.denied(), 10);
        assert_eq!((it.counts.responses.c4, it.counts.responses.c5), (10, 1));
        assert_eq!(
            (it.counts.request_bytes, it.counts.response_bytes, it.counts.cost_units),
            (7, 8, 9)
        );
        // counters the API does not send count as zero
        let it: Item = serde_json::from_value(json!({"lineage": "L", "consumer": "c", "plan": "p"})).unwrap();
        assert!(it.counts.is_zero());
        assert!(serde_json::from_value::<Item>(json!({"consumer": "c"})).is_err());
    }

    #[test]
    fn add_and_since_are_field_by_field() {
        let a = Counts::from_array(std::array::from_fn(|i| i as u64 + 1));
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
    fn aggregates_across_envoys_by_consumer_key_and_plan() {
        let e1 = snap(
            "http://e1",
            "i1",
            vec![
                item("L1", "L1", "acme", "free", counts(5, 1, 5)),
                item("L2", "K2", "acme", "pro", counts(2, 0, 4)),
                item("L3", "L3", "zeta", "pro", counts(1, 3, 1)),
            ],
        );
        let e2 = snap(
            "http://e2",
            "i2",
            vec![
                // L2 was rotated: this Envoy last saw the successor K3; L1 moved to pro here
                item("L2", "K3", "acme", "pro", counts(3, 2, 6)),
                item("L1", "L1", "acme", "pro", counts(1, 0, 1)),
                item("L4", "L4", "idle", "free", Counts::default()),
            ],
        );
        let items = || [&e1, &e2].into_iter().flat_map(|s| s.items.values());

        let by_consumer = aggregate(items(), By::Consumer);
        assert_eq!(
            by_consumer.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["acme", "zeta"],
            "sorted, idle consumer left out"
        );
        let acme = &by_consumer[0].counts;
        assert_eq!((acme.requests.admitted, acme.denied(), acme.cost_units), (11, 3, 16));
        assert_eq!((acme.request_bytes, acme.response_bytes), (110, 1100));
        assert_eq!(by_consumer[1].counts, counts(1, 3, 1));

        let by_key = aggregate(items(), By::Key);
        assert_eq!(
            by_key.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["L1", "L2", "L3"]
        );
        assert_eq!(by_key[1].key_ids, BTreeSet::from(["K2".to_string(), "K3".to_string()]));
        assert_eq!(by_key[1].counts.requests.admitted, 5);
        assert_eq!(by_key[0].plans, BTreeSet::from(["free".to_string(), "pro".to_string()]));

        let by_plan = aggregate(items(), By::Plan);
        assert_eq!(
            by_plan
                .iter()
                .map(|g| (g.name.as_str(), g.counts.requests.admitted))
                .collect::<Vec<_>>(),
            [("free", 5), ("pro", 7)]
        );
        assert_eq!(by_plan[1].consumers.len(), 2);
    }

    fn page(id: &str, items: Vec<Item>, next: Option<u64>) -> Page {
        Page {
            instance_id: Some(id.into()),
            started_at: Some("2030-01-01T00:00:00Z".into()),
            items,
            next_cursor: next,
        }
    }

    #[test]
    fn collects_pages_until_the_cursor_is_null() {
        let mut asked = Vec::new();
        let s = collect("http://e1", |c| {
            asked.push(c);
            Ok(match c {
                0 => page("i1", vec![item("A", "A", "c", "p", counts(1, 0, 1))], Some(1000)),
                // the index listed A twice: the later read wins
                1000 => page(
                    "i1",
                    vec![
                        item("B", "B", "c", "p", counts(2, 0, 2)),
                        item("A", "A", "c", "p", counts(3, 0, 3)),
                    ],
                    None,
                ),
                _ => unreachable!(),
            })
        })
        .unwrap();
        assert_eq!(asked, [0, 1000]);
        assert_eq!(s.items.len(), 2);
        assert_eq!(s.items["A"].counts.requests.admitted, 3);
        assert_eq!(s.instance_id.as_deref(), Some("i1"));

        let e = collect("http://e1", |c| {
            Ok(page(if c == 0 { "i1" } else { "i2" }, vec![], Some(5)))
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("restarted while") && e.contains("i1") && e.contains("i2"),
            "{e}"
        );
        let e = collect("http://e1", |_| Ok(page("i1", vec![], Some(0))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not advance"), "{e}");
        assert_eq!(page_path(0, None), "/v1/usage?cursor=0&limit=1000");
        assert_eq!(
            page_path(7, Some("a b&c")),
            "/v1/usage?cursor=7&limit=1000&consumer=a%20b%26c"
        );
    }

    #[test]
    fn the_same_envoy_twice_is_refused() {
        let a = snap("http://a", "i1", vec![]);
        let b = snap("http://b", "i1", vec![]);
        assert!(check_distinct(&[a.clone(), snap("http://c", "i2", vec![])]).is_ok());
        let e = check_distinct(&[a, b]).unwrap_err().to_string();
        assert!(
            e.contains("http://a and http://b") && e.contains("counted twice"),
            "{e}"
        );
    }

    #[test]
    fn since_counts_changes_restarts_and_keeps_unseen_lineages() {
        let mut st = State {
            format: STATE_FORMAT,
            ..State::default()
        };
        // first run: everything is new
        let run1 = vec![
            snap(
                "http://e1",
                "i1",
                vec![
                    item("A", "A", "acme", "p", counts(5, 1, 5)),
                    item("B", "B", "zeta", "p", counts(2, 0, 2)),
                ],
            ),
            snap("http://e2", "j1", vec![item("A", "A", "acme", "p", counts(1, 0, 1))]),
        ];
        let (d, info) = since(&mut st, &run1).unwrap();
        assert_eq!(d, run1);
        assert!(info.iter().all(|b| b.new_instance && b.replaced.is_empty()));
        assert_eq!(st.instances["i1"].lineages["A"], counts(5, 1, 5));

        // second run, only consumer acme (B is not listed); e2 restarted (j1 -> j2)
        let run2 = vec![
            snap("http://e1", "i1", vec![item("A", "A2", "acme", "p", counts(8, 1, 9))]),
            snap("http://e2", "j2", vec![item("A", "A2", "acme", "p", counts(2, 0, 2))]),
        ];
        let (d, info) = since(&mut st, &run2).unwrap();
        assert_eq!(
            d[0].items["A"].counts,
            Counts::from_array(std::array::from_fn(|i| [3, 0, 0, 0, 0, 0, 3, 0, 0, 0, 30, 300, 4][i]))
        );
        assert_eq!(d[0].items["A"].key_id, "A2");
        assert_eq!(
            d[1].items["A"].counts,
            counts(2, 0, 2),
            "a new instance counts from zero"
        );
        assert_eq!(
            info[0],
            Baseline {
                new_instance: false,
                ..Baseline::default()
            }
        );
        assert_eq!(info[1].replaced, ["j1"]);
        assert!(info[1].new_instance);
        assert!(!st.instances.contains_key("j1"), "the replaced instance is dropped");
        assert_eq!(st.instances["i1"].lineages["B"], counts(2, 0, 2), "unseen lineage kept");
        assert_eq!(st.instances["i1"].lineages["A"], counts(8, 1, 9));

        // third run: no change gives zero rows; a counter going down is clamped and reported
        let run3 = vec![snap(
            "http://e1",
            "i1",
            vec![
                item("A", "A2", "acme", "p", counts(8, 1, 9)),
                item("B", "B", "zeta", "p", counts(1, 0, 2)),
            ],
        )];
        let (d, info) = since(&mut st, &run3).unwrap();
        assert!(aggregate(d.iter().flat_map(|s| s.items.values()), By::Consumer).is_empty());
        assert_eq!(info[0].went_down, ["B"]);
        assert!(
            st.instances.contains_key("j2"),
            "instances not asked this time are kept"
        );

        // the state survives a round trip through its file format
        let text = serde_json::to_string(&st).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), st);

        let mut no_id = snap("http://e3", "x", vec![]);
        no_id.instance_id = None;
        assert!(since(&mut st, &[no_id])
            .unwrap_err()
            .to_string()
            .contains("no instance_id"));
    }

    #[test]
    fn renders_csv_table_and_json() {
        let groups = vec![
            Group {
                name: "L1".into(),
                consumers: BTreeSet::from(["acme".to_string()]),
                plans: BTreeSet::from(["free".to_string(), "pro".to_string()]),
                key_ids: BTreeSet::from(["K1".to_string(), "K2".to_string()]),
                counts: counts(3, 2, 7),
            },
            Group {
                name: "we,ird\"".into(),
                counts: counts(1, 0, 1),
                ..Group::default()
            },
        ];
        let csv = render_csv(&groups, By::Key);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "lineage,key_ids,consumer,plan,admitted,denied,unauthorized,forbidden,rate_limited,quota_exceeded,\
             cost_units,request_bytes,response_bytes,responses_1xx,responses_2xx,responses_3xx,responses_4xx,responses_5xx"
        );
        assert_eq!(lines[1], "L1,K1 K2,acme,free pro,3,2,0,0,2,0,7,30,300,0,3,0,2,0");
        assert!(lines[2].starts_with("\"we,ird\"\"\",,,,1,0,"), "{}", lines[2]);

        let t = render_table(&groups[..1], By::Consumer);
        assert_eq!(
            t,
            "CONSUMER  ADMITTED  DENIED  COST_UNITS  REQUEST_BYTES  RESPONSE_BYTES\n\
             L1        3         2       7           30             300\n\
             (total)   3         2       7           30             300\n"
        );

        let snaps = vec![snap("http://e1", "i1", vec![])];
        let v = render_json(&groups[..1], By::Key, &snaps, None, None);
        assert_eq!(v["by"], "key");
        assert_eq!(v["mode"], "cumulative");
        assert_eq!(
            v["instances"],
            json!([{"admin": "http://e1", "instance_id": "i1", "started_at": "2030-01-01T00:00:00Z", "lineages": 0}])
        );
        assert_eq!(
            v["rows"][0],
            json!({"lineage": "L1", "key_ids": ["K1", "K2"], "consumer": "acme", "plan": "free,pro",
                   "admitted": 3, "denied": 2, "unauthorized": 0, "forbidden": 0, "rate_limited": 2,
                   "quota_exceeded": 0, "cost_units": 7, "request_bytes": 30, "response_bytes": 300,
                   "responses": {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 2, "5xx": 0}})
        );
        assert_eq!(v["totals"]["admitted"], 3);
        let b = vec![Baseline {
            new_instance: true,
            replaced: vec!["i0".into()],
            went_down: vec![],
        }];
        let v = render_json(&[], By::Plan, &snaps, Some(&b), Some(Path::new("s.json")));
        assert_eq!(
            (v["mode"].as_str(), v["since_file"].as_str()),
            (Some("since"), Some("s.json"))
        );
        assert_eq!(v["instances"][0]["restarted"], true);
        assert_eq!(v["instances"][0]["previous_instance_ids"], json!(["i0"]));
        assert_eq!(v["rows"], json!([]));
    }
}
