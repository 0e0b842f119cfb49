//! The SCSI execute path on the product's default LUN (mirrored on two files behind the
//! nonvolatile write cache, here on the simulated file system) with the link unit's vendor
//! side (the routing agent) behind the same target: a program of commands from three
//! nexuses, any CDB and data-out. Invariants: every outcome has a defined status and
//! well-formed sense exactly with CHECK CONDITION; a parked command answers; data-in of
//! a RECEIVE or REPLAY that succeeded decodes as a record list whose packets carry the
//! source address the target stamped; the cache and the agent survive every program,
//! and what the cache holds destages.
#![no_main]

use ftss_fuzz::{check_outcome, exec, join, nexus, open_system, Input};
use ftss_proto::vendor::RecordList;
use ftss_target::media::disk::SimFs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fs = SimFs::new(7);
    let sys = open_system(&fs, true).expect("fresh system");
    for k in 0..2 {
        assert_eq!(join(&sys, k).status, 0);
    }
    let mut input = Input::new(data);
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let who = input.u8();
        let k = who % 3;
        let n = nexus(k);
        if who & 0x80 != 0 {
            // Between commands: the clock moves, housekeeping runs, sessions come and go.
            match who & 0x70 {
                0x00 => sys.clock.0.fetch_add(
                    u64::from(input.u16()) * 10,
                    std::sync::atomic::Ordering::Relaxed,
                ),
                0x10 => {
                    sys.agent.tick();
                    0
                }
                0x20 => {
                    sys.target.nexus_removed(&n);
                    0
                }
                0x30 => {
                    sys.target.nexus_added(&n);
                    0
                }
                _ => {
                    let _ = sys.cache.destage_committed();
                    0
                }
            };
            continue;
        }
        let cdb_len = [6usize, 10, 12, 16][usize::from(input.u8() % 4)];
        let mut cdb = input.take(cdb_len).to_vec();
        cdb.resize(cdb_len, 0);
        let data_len = usize::from(input.u16() % 8192);
        let data_out = input.take(data_len).to_vec();
        let expected = if data_out.is_empty() {
            u32::from(input.u16())
        } else {
            data_out.len() as u32
        };
        let out = exec(&sys, &n, &cdb, &data_out, expected);
        check_outcome(&out);
        if out.status == 0 && matches!(cdb[0], 0xc1 | 0xc3) && !out.data_in.is_empty() {
            let list = RecordList::decode(&out.data_in).expect("RECEIVE/REPLAY data decodes");
            for r in &list.records {
                // The target stamps every packet with its sender's registered address.
                assert!(
                    r.flags.failure_notice || !r.source.is_unspecified(),
                    "node {k} got a packet without a source: {r:?}"
                );
            }
        }
    }
    sys.cache
        .destage_committed()
        .expect("what the cache holds destages");
});
