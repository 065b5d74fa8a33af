//! `PublishSpec::from_str` on arbitrary text: never panics, errors are one
//! line without control characters, and whatever parses has a canonical
//! form that parses back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portfwd::model::PublishSpec;

fuzz_target!(|text: &str| {
    match text.parse::<PublishSpec>() {
        Ok(spec) => {
            let canonical = spec.to_string();
            assert_eq!(
                canonical.parse::<PublishSpec>().as_ref(),
                Ok(&spec),
                "{text:?} -> {canonical:?}"
            );
            // Expanding must not panic either (bounded: ranges can be huge).
            for item in spec.expand().take(4) {
                let _ = item;
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }
});
