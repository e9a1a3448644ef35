//! Summing per-lineage items into output rows.

use super::wire::Item;
use super::By;
use keymeter::core::metering::counts::UsageCounts;
use std::collections::{BTreeMap, BTreeSet};

/// One output row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// The consumer, lineage or plan.
    pub name: String,
    pub consumers: BTreeSet<String>,
    pub plans: BTreeSet<String>,
    pub key_ids: BTreeSet<String>,
    pub counts: UsageCounts,
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
