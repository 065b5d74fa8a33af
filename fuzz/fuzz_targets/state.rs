//! `model::parse_state` (the state file `up` restores from) on arbitrary
//! text: never panics; whatever parses gives map entries without panic, and
//! is written back in a form that reads as the same mappings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portfwd::model;

fuzz_target!(|text: &str| {
    if let Ok(mappings) = model::parse_state(text) {
        for mapping in &mappings {
            let _ = (mapping.key(), mapping.value(), mapping.to_string());
            let stored = serde_json::to_string(mapping).unwrap();
            let back: model::Mapping = serde_json::from_str(&stored).unwrap();
            assert_eq!(&back, mapping);
        }
    }
});
