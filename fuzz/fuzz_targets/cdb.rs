//! CDB decoding: the generic fields every block command reads (`block_range`,
//! `allocation_length`, `cdb_len`) and the vendor CDBs. Invariants: a vendor CDB that
//! decodes encodes to a CDB that decodes to the same command, and a decode error maps to
//! sense data with a sense key; a block range's field pointer lies inside the CDB.
#![no_main]

use ftss_proto::cdb;
use ftss_proto::vendor::VendorCdb;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(&op) = data.first() else {
        return;
    };
    if let Some(n) = cdb::cdb_len(op) {
        assert!((6..=16).contains(&n), "opcode {op:#04x} length {n}");
    }
    if let Ok(r) = cdb::block_range(data) {
        assert!(
            usize::from(r.len_field) < data.len(),
            "field pointer outside the CDB"
        );
    }
    let _ = cdb::allocation_length(data);
    match VendorCdb::parse(data) {
        Ok(c) => {
            let bytes = c.encode();
            assert_eq!(VendorCdb::parse(&bytes), Ok(c), "vendor CDB round trip");
            let _ = (c.data_out_len(), c.alloc_len());
        }
        Err(e) => {
            let s = e.sense();
            assert!(s.key != 0, "an error with sense key NO SENSE: {e:?}");
        }
    }
});
