//! Fuzz target: `casexml::parse` must return `Ok` or a typed `Err` for any bytes, never panic,
//! and stay within its limits (R50). Seed it with `crates/casexml/tests/data/`:
//!     cargo +nightly fuzz run casexml_parse ../crates/casexml/tests/data/conformance/*/ \
//!         ../crates/casexml/tests/data/hostile
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits reach the limit checks with inputs libFuzzer can actually produce.
    let small = casexml::Limits {
        max_bytes: 64 * 1024,
        max_depth: 16,
        max_blocks: 8,
        max_value_bytes: 256,
    };
    for limits in [casexml::Limits::default(), small] {
        if let Ok(form) = casexml::parse(data, &limits) {
            assert!(form.blocks.len() <= limits.max_blocks);
            assert!(!form.instance_id.as_str().is_empty());
        }
    }
    let _ = casexml::content_hash(data);
});
