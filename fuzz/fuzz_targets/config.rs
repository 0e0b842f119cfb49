//! The TOML configuration: parsing and validation. Invariants: a configuration that
//! validates serializes (as `admin config --effective` does) to TOML that parses and
//! validates again to the same configuration; errors name a key.
#![no_main]

use ftss_target::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(c) => {
            let again = toml::to_string(&c).expect("a valid configuration serializes");
            let back = Config::parse(&again)
                .unwrap_or_else(|e| panic!("re-parse of\n{again}\nfailed: {e}"));
            assert_eq!(
                toml::to_string(&back).expect("serializes"),
                again,
                "configuration round trip"
            );
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
});
