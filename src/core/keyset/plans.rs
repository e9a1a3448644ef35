//! `km/plans/<slot>`: the plans of the generation in that slot.
//!
//! Workers cache decoded plans by (generation, `plans_rev`), so the plans a reader
//! sees must change exactly when `km/meta`'s `plans_rev` does. The value therefore
//! holds the plans by revision: a delta that changes plans first writes the current
//! and the next revision side by side, then bumps `plans_rev` in `km/meta`; readers
//! pick the revision their meta names.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::plans_name;
use crate::core::limits::plan::Plan;
use crate::core::store::{read_value, Store};
use std::collections::BTreeMap;

pub type Plans = BTreeMap<String, Plan>;

/// Generation, then (revision, plans) pairs, oldest first.
type Stored = (u64, Vec<(u64, Plans)>);

pub fn read_plans(store: &dyn Store, meta: &Meta) -> Plans {
    let Some(bytes) = read_value(store, &plans_name(meta.slot)).0 else {
        return Plans::default();
    };
    use bincode::Options;
    let exact = || bincode::options().with_fixint_encoding().reject_trailing_bytes();
    // Before revisions were kept the value was (generation, plans): still read, so
    // plans written by a previous build of the plugin survive an in-place upgrade.
    let decoded = exact().deserialize::<Stored>(&bytes).or_else(|_| {
        exact()
            .deserialize::<(u64, Plans)>(&bytes)
            .map(|(g, p)| (g, vec![(meta.plans_rev, p)]))
    });
    match decoded {
        Ok((gen, revs)) if gen == meta.gen => {
            // The revision meta names; the newest when none matches (a full push
            // writes its one revision before the flip).
            let pick = revs.iter().position(|(r, _)| *r == meta.plans_rev);
            let i = pick.unwrap_or(revs.len().saturating_sub(1));
            revs.into_iter().nth(i).map(|(_, p)| p).unwrap_or_default()
        }
        _ => Plans::default(),
    }
}

/// Writes the plans of generation `gen` into `slot`: `revs` are (revision, plans)
/// pairs, oldest first.
pub(crate) fn write_plans(store: &dyn Store, slot: u8, gen: u64, revs: &[(u64, &Plans)]) -> Result<(), ApplyError> {
    let bytes = bincode::serialize(&(gen, revs)).expect("plans encode");
    store.set(&plans_name(slot), &bytes, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemStore;

    #[test]
    fn reads_the_revision_meta_names_and_the_previous_format() {
        let s = MemStore::default();
        let (mut a, mut b) = (Plans::default(), Plans::default());
        a.insert(
            "a".into(),
            crate::core::keyset::document::compile_plan("x", &Default::default(), "plans").unwrap(),
        );
        b.insert(
            "b".into(),
            crate::core::keyset::document::compile_plan("x", &Default::default(), "plans").unwrap(),
        );
        let meta = |plans_rev| Meta {
            gen: 7,
            plans_rev,
            ..Meta::default()
        };
        write_plans(&s, 0, 7, &[(1, &a), (2, &b)]).unwrap();
        assert!(read_plans(&s, &meta(1)).contains_key("a"));
        assert!(read_plans(&s, &meta(2)).contains_key("b"));
        assert!(read_plans(&s, &Meta { gen: 8, ..meta(2) }).is_empty());
        s.set(&plans_name(0), &bincode::serialize(&(7u64, &a)).unwrap(), None)
            .unwrap();
        assert!(read_plans(&s, &meta(5)).contains_key("a"));
    }
}
