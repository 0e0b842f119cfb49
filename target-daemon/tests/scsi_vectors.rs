//! Runs testdata/scsi/vectors.toml, in order, against a real ScsiTarget over FileStores.

use std::sync::Arc;

use ftss_target::media::file::FileStore;
use ftss_target::media::BlockStore;
use ftss_target::scsi::{ItNexus, LunSpec, ScsiCommand, ScsiTarget, TargetIdentity, TaskAttr};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    vector: Vec<Vector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    #[serde(default)]
    lun: u64,
    cdb: String,
    data_out: Option<String>,
    data_out_fill: Option<(u8, usize)>,
    /// Runs of bytes, one after the other: [[byte, count], ...].
    data_out_fills: Option<Vec<(u8, usize)>>,
    edtl: Option<u32>,
    #[serde(default)]
    status: u8,
    sense: Option<String>,
    field: Option<String>,
    info: Option<u64>,
    #[serde(default)]
    descriptor: bool,
    data_in: Option<String>,
    data_in_len: Option<usize>,
    data_out_len: Option<u32>,
}

fn unhex(s: &str) -> Vec<u8> {
    let d: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    d.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).expect("ascii"), 16).expect("hex"))
        .collect()
}

#[test]
fn scsi_vectors() {
    let dir = std::env::temp_dir().join(format!("ftss-scsi-vectors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let store = |n: &str| -> Arc<dyn BlockStore> {
        Arc::new(FileStore::open(&dir.join(n), 2048 * 512, 512).expect("store"))
    };
    let spec = |lun, name: &str, read_only, removable| LunSpec {
        lun,
        store: store(name),
        read_only,
        removable,
        initiators: None,
        // 4 KiB pages under 512-byte blocks, as a LUN on a file is.
        physical_block_size: Some(4096),
    };
    let target = ScsiTarget::new(
        TargetIdentity {
            iqn: "iqn.2026-11.org.ftss:vectors".into(),
        },
        vec![
            spec(0, "l0", false, false),
            spec(1, "l1", true, false),
            spec(2, "l2", false, true),
        ],
    )
    .expect("target");
    let nexus = ItNexus {
        id: 1,
        initiator_name: Arc::from("iqn.2026-11.org.ftss:init"),
        isid: [0x40, 0, 0, 0, 0, 1],
        tpgt: 1,
    };
    target.nexus_added(&nexus);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/scsi/vectors.toml");
    let file: File =
        toml::from_str(&std::fs::read_to_string(path).expect("vectors")).expect("parse");
    assert!(file.vector.len() >= 50, "{} vectors", file.vector.len());
    for v in &file.vector {
        let cdb = unhex(&v.cdb);
        let data_out = match (&v.data_out, v.data_out_fill, &v.data_out_fills) {
            (Some(h), _, _) => unhex(h),
            (None, Some((b, n)), _) => vec![b; n],
            (None, None, Some(runs)) => runs.iter().flat_map(|&(b, n)| vec![b; n]).collect(),
            (None, None, None) => Vec::new(),
        };
        let cmd = ScsiCommand {
            lun: v.lun,
            cdb: &cdb,
            data_out: &data_out,
            expected_len: v.edtl.unwrap_or(data_out.len().max(1 << 20) as u32),
            attr: TaskAttr::Simple,
            resume_until: None,
        };
        let o = target.execute(&nexus, &cmd);
        let n = &v.name;
        assert_eq!(o.status, v.status, "{n}: status (sense {:02x?})", o.sense);
        match &v.sense {
            Some(want) => {
                let s = o
                    .sense
                    .as_deref()
                    .unwrap_or_else(|| panic!("{n}: no sense data"));
                let parts: Vec<u8> = want
                    .split('/')
                    .map(|x| u8::from_str_radix(x, 16).expect("sense hex"))
                    .collect();
                let got = ftss_proto::sense::Sense::parse(s)
                    .unwrap_or_else(|| panic!("{n}: bad sense {s:02x?}"));
                assert_eq!(got, (parts[0], parts[1], parts[2]), "{n}: sense");
                assert_eq!(s[0] & 0x7f == 0x72, v.descriptor, "{n}: sense format");
                if let Some(f) = &v.field {
                    let f = f.strip_prefix("cdb:").expect("cdb field");
                    let (byte, bit) = match f.split_once('.') {
                        Some((b, bit)) => (
                            b.parse::<u16>().expect("byte"),
                            Some(bit.parse::<u8>().expect("bit")),
                        ),
                        None => (f.parse::<u16>().expect("byte"), None),
                    };
                    assert!(
                        s.len() >= 18 && s[0] & 0x7f == 0x70,
                        "{n}: field pointers checked in fixed format"
                    );
                    let sks = &s[15..18];
                    assert_eq!(sks[0] & 0xc0, 0xc0, "{n}: SKSV and C/D");
                    assert_eq!(
                        u16::from_be_bytes([sks[1], sks[2]]),
                        byte,
                        "{n}: field byte"
                    );
                    match bit {
                        Some(b) => assert_eq!(sks[0] & 0x0f, 0x08 | b, "{n}: field bit"),
                        None => assert_eq!(sks[0] & 0x08, 0, "{n}: no bit pointer"),
                    }
                }
                if let Some(i) = v.info {
                    assert!(s[0] & 0x80 != 0, "{n}: VALID");
                    assert_eq!(
                        u32::from_be_bytes([s[3], s[4], s[5], s[6]]) as u64,
                        i,
                        "{n}: information"
                    );
                }
            }
            None => assert!(o.sense.is_none(), "{n}: unexpected sense {:02x?}", o.sense),
        }
        if let Some(h) = &v.data_in {
            let want = unhex(h);
            assert!(
                o.data_in.len() >= want.len(),
                "{n}: data-in {:02x?} shorter than {want:02x?}",
                o.data_in
            );
            assert_eq!(&o.data_in[..want.len()], &want[..], "{n}: data-in");
        }
        if let Some(l) = v.data_in_len {
            assert_eq!(o.data_in.len(), l, "{n}: data-in length");
        }
        if let Some(l) = v.data_out_len {
            assert_eq!(o.data_out_len, Some(l), "{n}: data-out length");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
