//! Deltas (admin `POST /v1/keyset/delta`) against a loaded store: never panic; a
//! refused delta changes nothing; an applied one keeps `km/meta`'s key count equal to
//! the records requests can see, and its upserts and revokes are visible.
#![no_main]

use keymeter::core::keyset::apply::ApplyOptions;
use keymeter::core::keyset::delta::apply_delta;
use keymeter::core::keyset::document::{parse_json, CompiledOp, DeltaDoc};
use keymeter::core::keyset::entry::lookup;
use keymeter::core::keyset::meta::read_meta;
use keymeter::core::keyset::plans::read_plans;
use keymeter_fuzz::{check_layout, loaded_store, snapshot, T0_MS};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let store = loaded_store();
    let before = snapshot(&store);
    let meta = read_meta(&store).expect("base set");
    let plans = read_plans(&store, &meta);
    let Ok(doc) = parse_json::<DeltaDoc>(data) else { return };
    let Ok(ops) = doc.compile(|p| plans.contains_key(p)) else {
        return;
    };
    let opts = ApplyOptions {
        force: data.len() % 2 == 0,
        now_ms: T0_MS + 1000,
    };
    match apply_delta(&store, doc.version, &ops, opts) {
        Err(_) => assert_eq!(snapshot(&store), before, "a refused delta changed the store"),
        Ok(_) => {
            let meta = read_meta(&store).expect("meta after a delta");
            assert_eq!(meta.version, doc.version);
            // The last op on each id decides what requests see.
            let mut last: BTreeMap<&str, Option<&CompiledOp>> = BTreeMap::new();
            for op in &ops {
                match op {
                    CompiledOp::Upsert(r) => {
                        last.insert(&r.id, Some(op));
                    }
                    CompiledOp::Revoke(id) => {
                        last.insert(id, None);
                    }
                    CompiledOp::SetEnabled(..) | CompiledOp::SetPlan(..) => {}
                }
            }
            for (id, op) in last {
                let now = lookup(&store, &meta, id);
                match op {
                    None => assert!(now.is_none(), "{id} revoked but visible"),
                    Some(_) => assert!(now.is_some(), "{id} upserted but not visible"),
                }
            }
        }
    }
    check_layout(&store);
});
