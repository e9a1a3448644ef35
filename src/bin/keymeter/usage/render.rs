//! The three output formats: table, CSV and JSON.

use super::aggregate::Group;
use super::since::Baseline;
use super::wire::Snapshot;
use super::{now, By};
use crate::output;
use keymeter::core::metering::counts::UsageCounts;
use keymeter::core::time::format_rfc3339;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

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

/// The flat JSON fields of an output row.
fn json_fields(c: &UsageCounts, row: &mut Map<String, Value>) {
    let q = c.requests;
    for (k, v) in [
        ("admitted", q.admitted),
        ("denied", c.denied()),
        ("unauthorized", q.unauthorized),
        ("forbidden", q.forbidden),
        ("rate_limited", q.rate_limited),
        ("quota_exceeded", q.quota_exceeded),
        ("cost_units", c.cost_units),
        ("request_bytes", c.request_bytes),
        ("response_bytes", c.response_bytes),
    ] {
        row.insert(k.into(), v.into());
    }
    row.insert(
        "responses".into(),
        serde_json::to_value(c.responses).expect("counters serialize"),
    );
}

/// CSV columns, in `CSV_COUNT_COLUMNS` order.
fn csv_cells(c: &UsageCounts) -> Vec<String> {
    let (q, r) = (c.requests, c.responses);
    [
        q.admitted,
        c.denied(),
        q.unauthorized,
        q.forbidden,
        q.rate_limited,
        q.quota_exceeded,
        c.cost_units,
        c.request_bytes,
        c.response_bytes,
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

fn table_cells(c: &UsageCounts) -> Vec<String> {
    [
        c.requests.admitted,
        c.denied(),
        c.cost_units,
        c.request_bytes,
        c.response_bytes,
    ]
    .iter()
    .map(u64::to_string)
    .collect()
}

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
            .chain(csv_cells(&g.counts))
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
                .chain(table_cells(&g.counts))
                .collect()
        })
        .collect();
    let mut total = UsageCounts::default();
    for g in groups {
        total.add(&g.counts);
    }
    let mut last = vec![String::new(); group_columns(by).len()];
    last[0] = "(total)".into();
    last.extend(table_cells(&total));
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
    json_fields(&g.counts, &mut row);
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
    let mut total = UsageCounts::default();
    for g in groups {
        total.add(&g.counts);
    }
    let mut totals = Map::new();
    json_fields(&total, &mut totals);
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
