//! Login and text key=value parsing. Invariants: what parses encodes and parses back to
//! the same pairs; limits hold (key length, value length, pair count); `split` cuts a
//! text into chunks of at most the size asked for that join back to the text.
#![no_main]

use ftss_proto::text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = text::parse(data) {
        assert!(pairs.len() <= text::PAIRS_MAX);
        for (k, v) in &pairs {
            assert!(!k.is_empty() && k.len() <= text::KEY_LEN_MAX, "key {k:?}");
            assert!(v.len() <= text::VALUE_LEN_MAX);
        }
        let mut out = Vec::new();
        text::encode(&pairs, &mut out);
        assert_eq!(text::parse(&out).as_ref(), Ok(&pairs), "round trip");
    }
    let max = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let chunks = text::split(data, max);
    // An empty text still takes one (empty) PDU; otherwise no chunk is empty.
    assert!(chunks
        .iter()
        .all(|c| c.len() <= max && (!c.is_empty() || data.is_empty())));
    assert_eq!(chunks.concat(), data);
});
