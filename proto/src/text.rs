//! iSCSI text format (RFC 7143 section 6): `key=value` pairs, each ended by a NUL byte.

use nom::bytes::complete::{take_till, take_while1};
use nom::character::complete::char as ch;
use nom::sequence::separated_pair;
use nom::IResult;

/// Longest key name (RFC 7143 6.1).
pub const KEY_LEN_MAX: usize = 63;
/// Longest value we accept (a CHAP challenge of 1024 bytes in hex is 2050 characters).
pub const VALUE_LEN_MAX: usize = 8192;
/// Most pairs in one text.
pub const PAIRS_MAX: usize = 512;

/// Why a text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// A pair without `=` or with an invalid key name.
    #[error("malformed key=value pair at byte {0}")]
    Malformed(usize),
    /// Key or value not UTF-8.
    #[error("text is not UTF-8 at byte {0}")]
    Utf8(usize),
    /// Key name longer than 63 bytes.
    #[error("key name longer than {KEY_LEN_MAX} bytes")]
    KeyTooLong,
    /// Value longer than the limit.
    #[error("value of {0} longer than {VALUE_LEN_MAX} bytes")]
    ValueTooLong(String),
    /// More pairs than the limit.
    #[error("more than {PAIRS_MAX} key=value pairs")]
    TooManyPairs,
}

fn is_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_')
}

fn pair(i: &[u8]) -> IResult<&[u8], (&[u8], &[u8])> {
    separated_pair(take_while1(is_key_char), ch('='), take_till(|c| c == 0))(i)
}

/// Parses NUL-terminated `key=value` pairs. Empty items (NUL padding) are skipped; the
/// last pair may lack its NUL.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest[0] == 0 {
            pos += 1;
            continue;
        }
        let (after, (k, v)) = pair(rest).map_err(|_| TextError::Malformed(pos))?;
        if !(after.is_empty() || after[0] == 0) {
            return Err(TextError::Malformed(pos));
        }
        if k.len() > KEY_LEN_MAX {
            return Err(TextError::KeyTooLong);
        }
        let key = std::str::from_utf8(k).map_err(|_| TextError::Utf8(pos))?;
        if v.len() > VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong(key.to_owned()));
        }
        let val = std::str::from_utf8(v).map_err(|_| TextError::Utf8(pos + k.len() + 1))?;
        if out.len() == PAIRS_MAX {
            return Err(TextError::TooManyPairs);
        }
        out.push((key.to_owned(), val.to_owned()));
        pos += k.len() + 1 + v.len() + 1;
    }
    Ok(out)
}

/// Appends `key=value\0` for every pair.
pub fn encode(pairs: &[(String, String)], out: &mut Vec<u8>) {
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
}

/// Cuts `data` into chunks of at most `max` bytes for continuation PDUs (the RFC lets a
/// text be split anywhere, even inside a pair).
#[must_use]
pub fn split(data: &[u8], max: usize) -> Vec<&[u8]> {
    if data.is_empty() {
        return vec![data];
    }
    data.chunks(max.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn parses_and_encodes() {
        let t = b"InitiatorName=iqn.x\0MaxBurstLength=262144\0\0\0";
        let v = parse(t).expect("valid text");
        assert_eq!(
            v,
            vec![p("InitiatorName", "iqn.x"), p("MaxBurstLength", "262144")]
        );
        let mut out = Vec::new();
        encode(&v, &mut out);
        assert_eq!(&out[..], &t[..t.len() - 2]);
        assert_eq!(parse(b"A=").expect("empty value"), vec![p("A", "")]);
        assert_eq!(
            parse(b"SendTargets=All").expect("no final NUL"),
            vec![p("SendTargets", "All")]
        );
    }

    #[test]
    fn refuses_bad_text() {
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::Malformed(0)));
        assert_eq!(parse(b"A=1\0=2\0"), Err(TextError::Malformed(4)));
        assert_eq!(parse(b"Bad Key=1\0"), Err(TextError::Malformed(0)));
        let long = format!("{}=1", "K".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(TextError::KeyTooLong));
        let big = format!("K={}", "v".repeat(VALUE_LEN_MAX + 1));
        assert!(matches!(
            parse(big.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
        assert!(matches!(parse(b"K=\xff\0"), Err(TextError::Utf8(2))));
        let many: Vec<u8> = (0..=PAIRS_MAX).flat_map(|_| b"A=1\0".to_vec()).collect();
        assert_eq!(parse(&many), Err(TextError::TooManyPairs));
    }

    #[test]
    fn split_covers_everything() {
        let d: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let parts = split(&d, 300);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), d);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn roundtrips(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.]{0,20}", "[ -~&&[^=]]{0,40}"), 0..10)) {
            let pairs: Vec<(String, String)> = pairs;
            let mut out = Vec::new();
            encode(&pairs, &mut out);
            prop_assert_eq!(parse(&out).expect("own encoding parses"), pairs);
        }
    }
}
