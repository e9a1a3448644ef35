//! `km/plans/<slot>`: the plans of the generation in that slot.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::plans_name;
use crate::core::limits::plan::Plan;
use crate::core::store::{read_value, Store};
use std::collections::BTreeMap;

pub fn read_plans(store: &dyn Store, meta: &Meta) -> BTreeMap<String, Plan> {
    read_value(store, &plans_name(meta.slot))
        .0
        .and_then(|b| bincode::deserialize::<(u64, BTreeMap<String, Plan>)>(&b).ok())
        .filter(|(gen, _)| *gen == meta.gen)
        .map(|(_, p)| p)
        .unwrap_or_default()
}

pub(crate) fn write_plans(
    store: &dyn Store,
    slot: u8,
    gen: u64,
    plans: &BTreeMap<String, Plan>,
) -> Result<(), ApplyError> {
    let bytes = bincode::serialize(&(gen, plans)).expect("plans encode");
    store.set(&plans_name(slot), &bytes, None)?;
    Ok(())
}
