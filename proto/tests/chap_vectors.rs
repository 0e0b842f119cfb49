//! CHAP responses against testdata/chap/vectors.toml (computed with Python's hashlib).

use ftss_proto::chap::{decode_binary, encode_hex, Algorithm};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    vector: Vec<V>,
}

#[derive(Deserialize)]
struct V {
    algorithm: u64,
    id: u8,
    secret: String,
    challenge: String,
    response: String,
}

#[test]
fn chap_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/chap/vectors.toml");
    let f: File = toml::from_str(&std::fs::read_to_string(path).expect("file")).expect("parse");
    assert_eq!(f.vector.len(), 12);
    for v in &f.vector {
        let alg = Algorithm::from_number(v.algorithm).expect("known algorithm");
        let c = decode_binary(&v.challenge, "challenge").expect("hex");
        let r = alg.response(v.id, v.secret.as_bytes(), &c);
        assert_eq!(
            encode_hex(&r),
            v.response,
            "algorithm {} id {}",
            v.algorithm,
            v.id
        );
    }
}
