//! `UnmapSelector::from_str` on arbitrary text: never panics, errors are one
//! line without control characters, and whatever parses round-trips through
//! its Display form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portfwd::model::UnmapSelector;

fuzz_target!(|text: &str| {
    match text.parse::<UnmapSelector>() {
        Ok(selector) => {
            let canonical = selector.to_string();
            assert_eq!(
                canonical.parse::<UnmapSelector>().as_ref(),
                Ok(&selector),
                "{text:?} -> {canonical:?}"
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }
});
