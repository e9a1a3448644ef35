//! A worker's memory of which lineages have their own labelled metric series.
//!
//! The decision is made once per lineage in shared data (a per-lineage marker under a
//! process-wide cap of labelled lineages); each worker caches it to avoid a host call
//! per flush. Labelled lineages are bounded by that cap, but unlabelled ones are not
//! (every key ever seen past the cap): their cached "no" entries are dropped when
//! `max_unlabelled` accumulate, and re-read from the marker when next needed.

use std::collections::HashMap;

pub struct LabelCache {
    map: HashMap<String, bool>,
    unlabelled: usize,
    max_unlabelled: usize,
}

impl LabelCache {
    pub fn new(max_unlabelled: usize) -> Self {
        LabelCache {
            map: HashMap::new(),
            unlabelled: 0,
            max_unlabelled: max_unlabelled.max(1),
        }
    }

    pub fn get(&self, lineage: &str) -> Option<bool> {
        self.map.get(lineage).copied()
    }

    pub fn insert(&mut self, lineage: &str, labelled: bool) {
        if !labelled {
            if self.unlabelled >= self.max_unlabelled {
                self.map.retain(|_, l| *l);
                self.unlabelled = 0;
            }
            self.unlabelled += 1;
        }
        if let Some(was) = self.map.insert(lineage.to_string(), labelled) {
            self.unlabelled -= usize::from(!was);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10.17: a long-running worker that sees ever new keys past the series cap
    /// keeps a bounded cache; labelled lineages are never forgotten.
    #[test]
    fn unlabelled_churn_is_bounded_and_labelled_entries_stay() {
        let mut c = LabelCache::new(1000);
        for i in 0..50 {
            c.insert(&format!("l{i}"), true);
        }
        for i in 0..100_000 {
            let l = format!("u{i}");
            c.insert(&l, false);
            assert_eq!(c.get(&l), Some(false));
        }
        assert!(c.len() <= 50 + 1000, "{} cached", c.len());
        assert!((0..50).all(|i| c.get(&format!("l{i}")) == Some(true)));
        c.insert("u99999", false); // re-inserting does not count twice
        assert!(c.len() <= 1050);
    }
}
