//! Runs the vendor command vectors in testdata/vendor/vectors.toml, and checks that every
//! `sg_raw` example in docs/vendor-commands.md is one of them, byte for byte.

use std::collections::HashMap;
use std::fmt::Debug;

use ftss_proto::vendor::{
    AckCdb, AckList, AddressList, NodeCdb, NodeInfo, QueueStats, RecordList, RouteList, SendList,
    SendResults, SendStatus, VendorCdb, VendorError,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    vector: Vec<Vector>,
    outcome: Vec<OutcomeVector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    cdb: String,
    #[serde(default)]
    data_out: String,
    #[serde(default)]
    data_in: String,
    #[serde(default)]
    fields: Vec<String>,
    error: Option<String>,
    sense: Option<String>,
    field: Option<String>,
}

#[derive(Deserialize)]
struct OutcomeVector {
    name: String,
    status: u8,
    #[serde(default)]
    sense: String,
    expect: String,
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert!(digits.len().is_multiple_of(2), "odd hex digit count in {s}");
    digits
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).expect("ascii"), 16).expect("hex"))
        .collect()
}

fn load() -> File {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/vendor/vectors.toml"
    );
    toml::from_str(&std::fs::read_to_string(path).expect("vectors file")).expect("vectors parse")
}

/// Decodes `bytes`, checks they re-encode to themselves, returns the Debug form.
fn round_trip<T: Debug>(
    bytes: &[u8],
    dec: fn(&[u8]) -> Result<T, VendorError>,
    enc: fn(&T) -> Vec<u8>,
) -> Result<String, VendorError> {
    let v = dec(bytes)?;
    assert_eq!(enc(&v), bytes, "re-encoding of {v:?} differs");
    Ok(format!("{v:?}"))
}

/// Decodes a vector's CDB and data by the command they belong to.
fn decode(v: &Vector) -> Result<String, VendorError> {
    let cdb_bytes = unhex(&v.cdb);
    let cdb = VendorCdb::parse(&cdb_bytes)?;
    assert_eq!(cdb.encode(), cdb_bytes, "{}: CDB re-encoding", v.name);
    let mut dbg = format!("{cdb:?}");
    let out = unhex(&v.data_out);
    let inn = unhex(&v.data_in);
    assert_eq!(
        cdb.data_out_len() as usize,
        out.len(),
        "{}: PARAMETER LIST LENGTH vs data-out",
        v.name
    );
    if !out.is_empty() {
        dbg += &match cdb {
            VendorCdb::Send(_) => round_trip(&out, SendList::decode, SendList::encode)?,
            VendorCdb::Ack(AckCdb::List { .. }) => {
                round_trip(&out, AckList::decode, AckList::encode)?
            }
            VendorCdb::Node(NodeCdb::Register { .. }) => {
                round_trip(&out, AddressList::decode, AddressList::encode)?
            }
            _ => panic!("{}: data-out for a command without one", v.name),
        };
    }
    if !inn.is_empty() {
        assert!(
            inn.len() <= cdb.alloc_len() as usize,
            "{}: data-in above the allocation length",
            v.name
        );
        dbg += &match cdb {
            VendorCdb::Receive(_) | VendorCdb::Replay(_) => {
                round_trip(&inn, RecordList::decode, RecordList::encode)?
            }
            VendorCdb::SendResults(_) => {
                round_trip(&inn, SendResults::decode, SendResults::encode)?
            }
            VendorCdb::Node(NodeCdb::Query { .. }) => {
                round_trip(&inn, NodeInfo::decode, NodeInfo::encode)?
            }
            VendorCdb::Node(NodeCdb::RoutingTable { .. }) => {
                round_trip(&inn, RouteList::decode, RouteList::encode)?
            }
            VendorCdb::Node(NodeCdb::QueueStats { .. }) => {
                round_trip(&inn, QueueStats::decode, QueueStats::encode)?
            }
            _ => panic!("{}: data-in for a command without one", v.name),
        };
    }
    Ok(dbg)
}

#[test]
fn vendor_vectors() {
    let file = load();
    assert!(file.vector.len() >= 20);
    for v in &file.vector {
        match (&v.error, decode(v)) {
            (None, Ok(dbg)) => {
                for f in &v.fields {
                    assert!(dbg.contains(f.as_str()), "{}: {dbg}\n lacks {f}", v.name);
                }
            }
            (None, Err(e)) => panic!("{}: {e}", v.name),
            (Some(_), Ok(dbg)) => panic!("{}: decoded {dbg} but an error was expected", v.name),
            (Some(want), Err(e)) => {
                let got = format!("{e:?}");
                assert!(
                    got.contains(want.as_str()),
                    "{}: {got} lacks {want}",
                    v.name
                );
                let s = e.sense();
                if let Some(want) = &v.sense {
                    let got = format!("{:02x}/{:02x}/{:02x}", s.key, s.asc, s.ascq);
                    assert_eq!(&got, want, "{}: sense", v.name);
                }
                if let Some(want) = &v.field {
                    let f = s.field.expect("field pointer");
                    let mut got = format!("{}:{}", if f.in_cdb { "cdb" } else { "param" }, f.byte);
                    if let Some(bit) = f.bit {
                        got += &format!(".{bit}");
                    }
                    assert_eq!(&got, want, "{}: field pointer", v.name);
                }
            }
        }
    }
}

#[test]
fn outcome_vectors() {
    let file = load();
    assert!(file.outcome.len() >= 7);
    for o in &file.outcome {
        let sense = unhex(&o.sense);
        let st = SendStatus::from_reply(o.status, &sense);
        assert_eq!(format!("{st:?}"), o.expect, "{}", o.name);
        // The target side produces exactly these bytes (fixed format).
        if let Some(st) = st {
            // The target answers media full with TASK SET FULL; BUSY reads back the same.
            let busy = st == SendStatus::MediaFull && o.status == 0x08;
            assert!(busy || st.status() == o.status, "{}: status", o.name);
            if sense.len() == 18 {
                assert_eq!(st.sense().map(|s| s.fixed()), Some(sense), "{}", o.name);
            }
        }
    }
}

/// Every `sg_raw` line in the docs must be a vector: its CDB bytes, its `-s` / `-r`
/// lengths, the data-out its `-i` file is built from (an `xxd -r -p > FILE <<'EOF'`
/// block) and the data-in shown for its `-o` file (`xxd -p FILE` and the lines after).
#[test]
fn docs_examples_are_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vendor-commands.md");
    let doc = std::fs::read_to_string(path).expect("docs/vendor-commands.md");
    let file = load();
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut lines = doc.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(name) = t
            .strip_prefix("xxd -r -p > ")
            .and_then(|r| r.strip_suffix(" <<'EOF'"))
        {
            let mut hex = String::new();
            for l in lines.by_ref() {
                if l.trim() == "EOF" {
                    break;
                }
                hex += l;
            }
            assert!(
                files.insert(name.to_string(), unhex(&hex)).is_none(),
                "{name} twice"
            );
        } else if let Some(name) = t.strip_prefix("xxd -p ") {
            let mut hex = String::new();
            while let Some(l) = lines.next_if(|l| !l.trim_start().starts_with("```")) {
                hex += l;
            }
            assert!(
                files.insert(name.to_string(), unhex(&hex)).is_none(),
                "{name} twice"
            );
        }
    }
    let mut used = vec![false; file.vector.len()];
    let mut examples = 0;
    for line in doc
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("sg_raw "))
    {
        examples += 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        let dev = words
            .iter()
            .position(|w| w.starts_with("/dev/"))
            .unwrap_or_else(|| panic!("no device in {line}"));
        let cdb = unhex(&words[dev + 1..].join(""));
        let opt = |o: &str| {
            words[..dev]
                .iter()
                .position(|w| *w == o)
                .map(|i| words[i + 1])
        };
        let (i, v) = file
            .vector
            .iter()
            .enumerate()
            .find(|(_, v)| v.error.is_none() && unhex(&v.cdb) == cdb)
            .unwrap_or_else(|| panic!("docs example is not a vector: {line}"));
        used[i] = true;
        let out = unhex(&v.data_out);
        let inn = unhex(&v.data_in);
        let parsed = VendorCdb::parse(&cdb).expect("vector CDB");
        match opt("-s") {
            Some(n) => assert_eq!(n.parse::<usize>().ok(), Some(out.len()), "{line}"),
            None => assert!(out.is_empty(), "{line}: data-out without -s"),
        }
        if let Some(f) = opt("-i") {
            assert_eq!(files.get(f), Some(&out), "{line}: contents of {f}");
        }
        match opt("-r") {
            Some(n) => assert_eq!(n.parse::<u32>().ok(), Some(parsed.alloc_len()), "{line}"),
            None => assert_eq!(
                parsed.alloc_len(),
                0,
                "{line}: allocation length without -r"
            ),
        }
        if let Some(f) = opt("-o") {
            assert_eq!(files.get(f), Some(&inn), "{line}: data-in shown for {f}");
        }
    }
    assert!(examples >= 12, "only {examples} sg_raw examples");
    for (v, u) in file.vector.iter().zip(&used) {
        if v.name.starts_with("docs: ") {
            assert!(u, "{} is not shown in the docs", v.name);
        }
    }
}
