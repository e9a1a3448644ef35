//! Key-entry bytes (`keyset::entry_format`): any bytes decode to an entry or to `None`,
//! never a panic or a huge allocation; whatever decodes re-encodes in the current format
//! to an entry that decodes to the same thing (format 1 input included).
#![no_main]

use keymeter::core::keyset::entry_format::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(entry) = decode(data, "AbCdEf012345") else {
        return;
    };
    let again = encode(&entry);
    if entry.slots.iter().all(Option::is_none) {
        assert!(again.is_empty());
        return;
    }
    assert_eq!(decode(&again, "AbCdEf012345").as_ref(), Some(&entry), "re-encoded entry differs");
});
