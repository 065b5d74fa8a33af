//! `state::parse_state` (the state file `up` restores from) on arbitrary
//! text: never panics; whatever parses converts to mappings without panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portfwd::model as state;

fuzz_target!(|text: &str| {
    if let Ok(records) = state::parse_state(text) {
        for record in &records {
            let mapping = record.to_mapping();
            let _ = (mapping.key(), mapping.value(), mapping.to_string());
            assert_eq!(&state::Record::from(&mapping), record);
        }
    }
});
