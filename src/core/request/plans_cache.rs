//! A worker's decoded copy of the active plans.

use crate::core::keyset::meta::Meta;
use crate::core::keyset::plans::read_plans;
use crate::core::limits::plan::Plan;
use crate::core::store::Store;
use std::collections::BTreeMap;
use std::rc::Rc;

/// Re-read only when `km/meta` says the plans changed (generation or `plans_rev`), so a
/// request neither copies nor decodes the plans blob.
#[derive(Default)]
pub struct PlansCache {
    key: Option<(u64, u64)>,
    plans: Rc<BTreeMap<String, Plan>>,
}

impl PlansCache {
    pub fn get(&mut self, store: &dyn Store, meta: &Meta) -> Rc<BTreeMap<String, Plan>> {
        let key = (meta.gen, meta.plans_rev);
        if self.key != Some(key) {
            self.plans = Rc::new(read_plans(store, meta));
            self.key = Some(key);
        }
        self.plans.clone()
    }
}
