//! The usage API as the billing job reads it: pages, items, one snapshot per Envoy.

use crate::admin_client::Admin;
use crate::error::{failed, Result};
use keymeter::core::metering::counts::UsageCounts;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Items asked for per page.
pub const PAGE_LIMIT: usize = 1000;
const USAGE_API: &str = "/v1/usage";

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
    pub counts: UsageCounts,
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

pub fn fetch(admin: &Admin, consumer: Option<&str>) -> Result<Snapshot> {
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
pub fn check_distinct(snaps: &[Snapshot]) -> Result<()> {
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
