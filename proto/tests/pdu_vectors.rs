//! Runs the PDU vectors in testdata/pdu/vectors.toml.

use bytes::BytesMut;
use ftss_proto::pdu::{Framing, Pdu};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    vector: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    hex: String,
    #[serde(default)]
    header_digest: bool,
    #[serde(default)]
    fields: Vec<String>,
    error: Option<String>,
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert!(digits.len().is_multiple_of(2), "odd hex digit count");
    digits
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).expect("ascii"), 16).expect("hex"))
        .collect()
}

#[test]
fn pdu_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/pdu/vectors.toml");
    let file: File = toml::from_str(&std::fs::read_to_string(path).expect("vectors file"))
        .expect("vectors parse");
    assert!(file.vector.len() >= 15);
    for v in &file.vector {
        let bytes = unhex(&v.hex);
        let framing = Framing {
            header_digest: v.header_digest,
            ..Framing::default()
        };
        match (&v.error, Pdu::decode(&bytes, &framing)) {
            (Some(want), Err(e)) => {
                let got = format!("{e:?}");
                assert!(
                    got.contains(want.as_str()),
                    "{}: error {got} lacks {want}",
                    v.name
                );
            }
            (Some(_), Ok((p, _))) => panic!("{}: decoded {p:?} but an error was expected", v.name),
            (None, Err(e)) => panic!("{}: {e}", v.name),
            (None, Ok((p, n))) => {
                assert_eq!(n, bytes.len(), "{}: consumed length", v.name);
                let dbg = format!("{p:?}");
                for f in &v.fields {
                    assert!(dbg.contains(f.as_str()), "{}: {dbg}\n lacks {f}", v.name);
                }
                let mut out = BytesMut::new();
                p.encode(&mut out, &framing);
                assert_eq!(&out[..], &bytes[..], "{}: re-encoding differs", v.name);
            }
        }
    }
}
