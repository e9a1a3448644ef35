//! Staged uploads (admin `POST /v1/keyset/uploads`, `PUT .../keys`, `POST .../commit`,
//! `DELETE`), interleaved with one-shot pushes, cleanup steps and time passing (lock
//! expiry), from a script: never panic; after every step `km/meta`'s key count equals
//! the records requests can see; the running set changes only on a successful commit
//! or push.
//!
//! Input: steps separated by 0xFF; a step's first byte picks the operation, the rest
//! is its body (`b`egin, `k`eys chunk, `c`ommit, `a`bort, `t`ime + n seconds,
//! `p`ush, `s`tep of cleanup; other bytes map onto these).
#![no_main]

use keymeter::core::keyset::meta::read_meta;
use keymeter::core::keyset::stream::push_stream;
use keymeter::core::keyset::sweep::cleanup_step;
use keymeter::core::keyset::upload::{upload_abort, upload_begin, upload_commit, upload_keys};
use keymeter::core::time::Clock;
use keymeter_fuzz::{active, check_layout, loaded_store, T0_MS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = loaded_store();
    let mut now = T0_MS;
    let mut uploads: Vec<String> = Vec::new();
    for (n, step) in data.split(|b| *b == 0xFF).take(64).enumerate() {
        let Some((&op, body)) = step.split_first() else {
            continue;
        };
        let id = |i: usize| uploads.get(i).cloned().unwrap_or_else(|| "none".to_string());
        let pick = body.first().map_or(0, |b| *b as usize) % (uploads.len().max(1));
        let meta_before = read_meta(&store);
        let running_before = meta_before.map(|m| active(&store, &m));
        let mut may_change = false;
        let kind = match op {
            b'b' | b'k' | b'c' | b'a' | b't' | b'p' | b's' => op,
            other => b"bkcatps"[other as usize % 7],
        };
        match kind {
            b'b' => {
                let uid = format!("u{n}");
                if upload_begin(&store, &uid, now).is_ok() {
                    uploads.push(uid);
                }
            }
            b'k' => {
                let _ = upload_keys(&store, &id(pick), body.get(1..).unwrap_or_default(), now);
            }
            b'c' => {
                may_change = upload_commit(&store, &id(pick), body.get(1..).unwrap_or_default(), now, true).is_ok();
            }
            b'a' => {
                let _ = upload_abort(&store, &id(pick), now);
            }
            b't' => now += 1000 * body.first().map_or(1, |b| *b as u64),
            b'p' => may_change = push_stream(&store, body, Clock::Fixed(now), true).is_ok(),
            _ => {
                let _ = cleanup_step(&store, now, 1 + body.len() % 3);
            }
        }
        if !may_change {
            let after = read_meta(&store);
            assert_eq!(after, meta_before, "step {n} ({op}) changed km/meta without a commit");
            assert_eq!(
                after.map(|m| active(&store, &m)),
                running_before,
                "step {n} changed the running set"
            );
        }
        check_layout(&store);
    }
});
