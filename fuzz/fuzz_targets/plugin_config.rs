//! The plugin configuration (Envoy hands it over verbatim): parsing never panics, and a
//! configuration it accepts renders its challenges.
#![no_main]

use keymeter::core::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Config::parse(data) {
        for ch in c.challenges() {
            assert!(
                !ch.contains('\n') && !ch.contains('\r'),
                "challenge header with a line break"
            );
        }
    }
});
