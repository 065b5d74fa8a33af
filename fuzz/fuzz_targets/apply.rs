//! `state::parse_apply` (the file `portfwd apply` reads) on arbitrary text,
//! as JSON and as TOML: never panics, errors are one line without control
//! characters, and the publish strings of a file that parses go through the
//! `-p` parser too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portfwd::model::{self as state, Format, PublishSpec};

fuzz_target!(|text: &str| {
    for format in [Format::Json, Format::Toml] {
        match state::parse_apply(text, format) {
            Ok(file) => {
                for entry in &file.mappings {
                    for publish in &entry.publish {
                        let _ = publish.parse::<PublishSpec>();
                    }
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                assert!(!message.chars().any(char::is_control), "{message:?}");
            }
        }
    }
});
