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
    match bincode::deserialize::<Stored>(&bytes) {
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
