//! Logical block provisioning: WRITE SAME (10) and (16), UNMAP, GET LBA STATUS and
//! SANITIZE, with the Block Limits and Logical Block Provisioning VPD fields and the READ
//! CAPACITY (16) bits that describe them.

use ftss_proto::cdb::{allocation_length, be, op};
use ftss_proto::sense::{common, Sense};

use super::atomic_io::{atomic_blocks_max, CAW_BLOCKS_MAX};
use super::block_io::writable;
use super::command::{field, in_range, media, reply_out, CmdResult, Ctx, Reply};
use super::lun::Lun;
use super::spc::ready;
use crate::media::Provisioning;

/// Bytes one WRITE SAME may cover on a thin store (MAXIMUM WRITE SAME LENGTH is this over
/// the block size): it bounds how long one command keeps a worker writing its pattern.
/// Other stores (the write cache) take no more per command than a WRITE may carry, and
/// UNMAP there, which writes zeros, has the same bound.
const WRITE_SAME_BYTES_MAX: u64 = 1 << 30;

/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT: as many as a parameter list can carry (its
/// length field is 16 bits, the header 8 bytes).
const UNMAP_DESCRIPTORS_MAX: u32 = (0xffff - 8) / 16;

/// GET LBA STATUS returns at most this many descriptors, however large the allocation
/// length: each may need a pair of `lseek` calls.
const LBA_STATUS_DESCRIPTORS_MAX: usize = 256;

/// MAXIMUM WRITE SAME LENGTH for this LUN, in blocks.
fn write_same_blocks_max(l: &Lun) -> u64 {
    if l.store.thin_provisioned() {
        WRITE_SAME_BYTES_MAX / u64::from(l.block_size())
    } else {
        u64::from(l.transfer_blocks_max())
    }
}

/// MAXIMUM UNMAP LBA COUNT: unbounded (FFFF_FFFFh) where unmapping deallocates, which
/// costs the same for any length; bounded like WRITE SAME where it writes zeros.
fn unmap_blocks_max(l: &Lun) -> u32 {
    if l.store.thin_provisioned() {
        u32::MAX
    } else {
        u32::try_from(write_same_blocks_max(l)).unwrap_or(u32::MAX - 1)
    }
}

/// READ CAPACITY (16) byte 14: LBPME where the store deallocates (thin provisioning),
/// and LBPRZ always, because an unmapped block reads back as zeros on every store (a
/// store without thin provisioning writes zeros to unmap).
pub(crate) fn provisioning_bits(l: &Lun) -> u8 {
    let lbpme = if l.store.thin_provisioned() { 0x80 } else { 0 };
    lbpme | 0x40
}

/// The Block Limits VPD fields these commands define. `p` is the page from byte 4 on.
pub(crate) fn block_limits(l: &Lun, p: &mut [u8; 60]) {
    let mut put = |page_byte: usize, v: &[u8]| {
        p[page_byte - 4..page_byte - 4 + v.len()].copy_from_slice(v);
    };
    // Byte 4: WSNZ clear: a WRITE SAME of zero blocks writes to the end of the medium.
    put(5, &[CAW_BLOCKS_MAX]);
    put(20, &unmap_blocks_max(l).to_be_bytes());
    put(24, &UNMAP_DESCRIPTORS_MAX.to_be_bytes());
    if l.store.thin_provisioned() {
        // OPTIMAL UNMAP GRANULARITY: one physical block, the unit the medium frees;
        // UNMAP GRANULARITY ALIGNMENT 0 with UGAVALID: LBA 0 starts one. A part of one is
        // zeroed where it lies.
        put(28, &(1u32 << l.physical_exponent()).to_be_bytes());
        put(32, &0x8000_0000u32.to_be_bytes());
    }
    put(36, &write_same_blocks_max(l).to_be_bytes());
    // Atomic writes: no alignment or granularity rule, no atomic boundaries.
    put(44, &atomic_blocks_max(l).to_be_bytes());
}

/// Logical Block Provisioning VPD page (B2h) after its 4-byte header. UNMAP and WRITE
/// SAME with UNMAP work on every store (LBPU, LBPWS, LBPWS10); unmapped blocks read as
/// zeros (LBPRZ); anchoring is not supported (ANC_SUP clear). The provisioning type says
/// thin only for stores that deallocate.
pub(crate) fn provisioning_vpd(l: &Lun) -> [u8; 4] {
    let ptype = if l.store.thin_provisioned() { 0x02 } else { 0 };
    [0, 0x80 | 0x40 | 0x20 | 0x04, ptype, 0]
}

/// WRITE SAME (10) and (16) (SBC-3 5.41, 5.42): one block of data-out (or zeros, with
/// NDOB) written to every block of the range; with UNMAP the range is unmapped instead
/// where the store deallocates, or where the block is zeros (which is what an unmapped
/// block reads as), and written elsewhere.
pub(crate) fn write_same(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let sixteen = cdb[0] == op::WRITE_SAME_16;
    let flags = cdb[1];
    if flags >> 5 != 0 {
        return Err(field(1, Some(7))); // WRPROTECT
    }
    if flags & 0x10 != 0 {
        return Err(field(1, Some(4))); // ANCHOR, and ANC_SUP is clear
    }
    if flags & 0x04 != 0 {
        return Err(field(1, Some(2))); // PBDATA: no physical sector addresses
    }
    if flags & 0x02 != 0 {
        return Err(field(1, Some(1))); // LBDATA: no LBA stamping
    }
    let unmap = flags & 0x08 != 0;
    let ndob = sixteen && flags & 0x01 != 0;
    let (lba, n, len_field) = if sixteen {
        (be(cdb, 2, 8), be(cdb, 10, 4), 10)
    } else {
        (be(cdb, 2, 4), be(cdb, 7, 2), 7)
    };
    let (lba, n) = (lba.unwrap_or(0), n.unwrap_or(0));
    let cap = c.lun.blocks();
    // WSNZ is clear: zero blocks means from LBA to the end of the medium, so LBA itself
    // must be on the medium.
    let blocks = if n == 0 {
        if lba >= cap {
            return Err(common::LBA_OUT_OF_RANGE);
        }
        cap - lba
    } else {
        in_range(c.lun, lba, n)?;
        n
    };
    if blocks > write_same_blocks_max(c.lun) {
        return Err(field(len_field, None));
    }
    writable(c)?;
    let bs = c.lun.block_size() as usize;
    let pattern: Vec<u8> = if ndob {
        vec![0u8; bs]
    } else {
        // Exactly one block: with more or less, which bytes make the block is a guess.
        if c.cmd.expected_len as usize != bs || c.cmd.data_out.len() < bs {
            return Err(common::INVALID_FIELD_IN_COMMAND_IU);
        }
        c.cmd.data_out[..bs].to_vec()
    };
    let reply = reply_out(if ndob { 0 } else { bs });
    let _media = c.lun.media_shared();
    let store = &c.lun.store;
    if unmap && (store.thin_provisioned() || pattern.iter().all(|&b| b == 0)) {
        store.unmap(lba, blocks).map_err(|e| media(e, true))?;
        return Ok(reply);
    }
    let chunk_blocks = ((1u64 << 20) / bs as u64).clamp(1, blocks);
    let buf = pattern.repeat(chunk_blocks as usize);
    let mut done = 0u64;
    while done < blocks {
        let k = (blocks - done).min(chunk_blocks);
        store
            .write_blocks(lba + done, &buf[..k as usize * bs], false)
            .map_err(|e| media(e, true))?;
        done += k;
    }
    Ok(reply)
}

/// UNMAP (SBC-3 5.28): every block descriptor is checked (capacity, the Block Limits
/// counts) before any block is unmapped.
pub(crate) fn unmap(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if cdb[1] & 0x01 != 0 {
        return Err(field(1, Some(0))); // ANCHOR, and ANC_SUP is clear
    }
    let len = be(cdb, 7, 2).unwrap_or(0) as usize;
    writable(c)?;
    if len == 0 {
        return Ok(reply_out(0)); // SBC-3: no parameter data is not an error
    }
    if len < 8 {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let data = c
        .cmd
        .data_out
        .get(..len)
        .ok_or(common::PARAM_LIST_LENGTH_ERROR)?;
    // Only whole descriptors that both the header and the parameter list hold count; a
    // parameter list cannot carry more than UNMAP_DESCRIPTORS_MAX of them.
    let bd_len = be(data, 2, 2).unwrap_or(0) as usize;
    let count = bd_len.min(len - 8) / 16;
    let max_total = u64::from(unmap_blocks_max(c.lun));
    let mut total = 0u64;
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let d = 8 + 16 * i;
        let lba = be(data, d, 8).unwrap_or(0);
        let n = be(data, d + 8, 4).unwrap_or(0);
        in_range(c.lun, lba, n)?;
        total += n;
        if max_total != u64::from(u32::MAX) && total > max_total {
            return Err(common::INVALID_FIELD_IN_PARAM_LIST.param_field((d + 8) as u16, None));
        }
        if n > 0 {
            ranges.push((lba, n));
        }
    }
    let _media = c.lun.media_shared();
    for (lba, n) in ranges {
        c.lun.store.unmap(lba, n).map_err(|e| media(e, true))?;
    }
    Ok(reply_out(len))
}

/// GET LBA STATUS (SBC-3 5.6): descriptors of mapped and deallocated extents from the
/// starting LBA, as many as the allocation length holds.
pub(crate) fn get_lba_status(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let mut lba = be(cdb, 2, 8).unwrap_or(0);
    let alloc = allocation_length(cdb).unwrap_or(0) as usize;
    ready(c.lun)?;
    let cap = c.lun.blocks();
    if lba >= cap {
        return Err(common::LBA_OUT_OF_RANGE);
    }
    let fit = (alloc.saturating_sub(8) / 16).clamp(1, LBA_STATUS_DESCRIPTORS_MAX);
    let mut d = vec![0u8; 8];
    let _media = c.lun.media_shared();
    while d.len() < 8 + 16 * fit && lba < cap {
        // One descriptor counts at most u32::MAX blocks.
        let max = (cap - lba).min(u64::from(u32::MAX));
        let (state, n) = c
            .lun
            .store
            .provisioning(lba, max)
            .map_err(|e| media(e, false))?;
        let n = n.clamp(1, max);
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&(n as u32).to_be_bytes());
        d.push(match state {
            Provisioning::Mapped => 0,
            Provisioning::Deallocated => 1,
        });
        d.extend_from_slice(&[0, 0, 0]);
        lba += n;
    }
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    d.truncate(alloc);
    Ok(Reply::good(d))
}

/// SANITIZE operation code (SBC-3 5.30).
pub(crate) const SANITIZE: u8 = 0x48;
/// SANITIZE service action BLOCK ERASE.
pub(crate) const SANITIZE_BLOCK_ERASE: u8 = 0x02;
/// SANITIZE service action EXIT FAILURE MODE.
pub(crate) const SANITIZE_EXIT_FAILURE_MODE: u8 = 0x1f;

/// SANITIZE (48h), BLOCK ERASE: every block is deallocated, so all of it reads back as
/// zeros (LBPRZ) and no earlier data can be read again. Where the store cannot
/// deallocate it writes zeros, which has the same effect. OVERWRITE and CRYPTOGRAPHIC
/// ERASE are not offered; an unlisted service action is INVALID FIELD IN CDB. The
/// operation completes before the status, with or without IMMED, so there is never a
/// sanitize in progress to report.
pub(crate) fn sanitize(c: &Ctx<'_>) -> CmdResult {
    check_sanitize_cdb(c)?;
    let _g = c.lun.media_exclusive();
    let blocks = c.lun.blocks();
    c.lun.store.unmap(0, blocks).map_err(|e| media(e, true))?;
    c.lun.store.flush().map_err(|e| media(e, true))?;
    Ok(Reply::none())
}

/// The checks both service actions make: reserved CDB fields zero, no parameter list
/// (neither BLOCK ERASE nor EXIT FAILURE MODE takes one), a writable medium.
fn check_sanitize_cdb(c: &Ctx<'_>) -> Result<(), Sense> {
    let cdb = c.cmd.cdb;
    // Byte 1 bit 6 is reserved in SBC-3 (ZNR, later, is for zoned devices only).
    if cdb[1] & 0x40 != 0 {
        return Err(field(1, Some(6)));
    }
    if cdb[2..7].iter().any(|&b| b != 0) {
        return Err(field(2, None));
    }
    if be(cdb, 7, 2).unwrap_or(0) != 0 {
        return Err(field(7, None));
    }
    writable(c)
}

/// SANITIZE (48h), EXIT FAILURE MODE (SBC-3 5.30): ends the failure mode a failed
/// sanitize leaves a device in. BLOCK ERASE here never leaves one: it either completes or
/// fails like any write (the LUN keeps serving, and the erase can be repeated), so there
/// is no failure mode to exit and the command completes at once. Like BLOCK ERASE it takes
/// no parameter list.
pub(crate) fn sanitize_exit_failure_mode(c: &Ctx<'_>) -> CmdResult {
    check_sanitize_cdb(c)?;
    Ok(Reply::none())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::media::file::FileStore;
    use crate::media::mem::MemStore;
    use crate::media::{BlockStore, CacheMode};
    use crate::scsi::TargetIdentity;
    use crate::scsi::{ItNexus, LunSpec, ScsiCommand, ScsiOutcome, ScsiTarget, TaskAttr};

    fn target(store: Arc<dyn BlockStore>) -> (ScsiTarget, ItNexus) {
        let t = ScsiTarget::new(
            TargetIdentity {
                iqn: "iqn.2026-11.org.ftss:sbc-ext".into(),
            },
            vec![LunSpec {
                lun: 0,
                store,
                read_only: false,
                removable: false,
                initiators: None,
                // As a 512-byte LUN on 4 KiB pages is configured.
                physical_block_size: Some(4096),
            }],
        )
        .expect("target");
        let n = ItNexus {
            id: 1,
            initiator_name: Arc::from("iqn.2026-11.org.ftss:init"),
            isid: [0x40, 0, 0, 0, 0, 1],
            tpgt: 1,
        };
        t.nexus_added(&n);
        let _ = run(&t, &n, &[0; 6], &[]); // the power-on unit attention
        (t, n)
    }

    fn run(t: &ScsiTarget, n: &ItNexus, cdb: &[u8], out: &[u8]) -> ScsiOutcome {
        t.execute(
            n,
            &ScsiCommand {
                lun: 0,
                cdb,
                data_out: out,
                expected_len: out.len() as u32,
                attr: TaskAttr::Simple,
                resume_until: None,
            },
        )
    }

    fn sense(o: &ScsiOutcome) -> Option<(u8, u8, u8, u16)> {
        let s = o.sense.as_deref()?;
        Some((
            s[2] & 0x0f,
            s[12],
            s[13],
            u16::from_be_bytes([s[16], s[17]]),
        ))
    }

    fn ws16(lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
        let mut cdb = vec![op::WRITE_SAME_16, flags];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&blocks.to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        cdb
    }

    #[test]
    fn write_same_is_bounded_by_its_maximum_length_even_to_the_end() {
        let dir = std::env::temp_dir().join(format!("ftss-sbc-ext-ws-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // 2^22 blocks, sparse: twice MAXIMUM WRITE SAME LENGTH.
        let store = FileStore::open(&dir.join("big.img"), 1 << 31, 512).expect("store");
        let (t, n) = target(Arc::new(store));
        let max = (WRITE_SAME_BYTES_MAX / 512) as u32;
        let block = [0u8; 512];
        let o = run(&t, &n, &ws16(0, max + 1, 0x08), &block);
        assert_eq!(sense(&o), Some((5, 0x24, 0, 10)), "over the maximum");
        // Zero blocks means "to the end": 2^22 blocks from LBA 0 is over the maximum too.
        let o = run(&t, &n, &ws16(0, 0, 0x08), &block);
        assert_eq!(sense(&o), Some((5, 0x24, 0, 10)), "to the end from LBA 0");
        let o = run(&t, &n, &ws16((1 << 22) - 8, 0, 0x08), &block);
        assert_eq!(
            (o.status, o.sense),
            (0, None),
            "to the end from 8 blocks before it"
        );
        let o = run(&t, &n, &ws16(0, max, 0x08), &block);
        assert_eq!((o.status, o.sense), (0, None), "unmapping the maximum");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// GET LBA STATUS from `lba` with room for 8 descriptors: (lba, blocks, status) each.
    fn lba_status(t: &ScsiTarget, n: &ItNexus, lba: u64) -> Vec<(u64, u32, u8)> {
        let mut cdb = vec![0x9e, 0x12];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&(8 + 8 * 16u32).to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        let o = run(t, n, &cdb, &[]);
        assert_eq!((o.status, o.sense.as_deref()), (0, None), "GET LBA STATUS");
        o.data_in[8..]
            .chunks_exact(16)
            .map(|d| {
                let lba = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
                let n = u32::from_be_bytes(d[8..12].try_into().expect("4 bytes"));
                (lba, n, d[12])
            })
            .collect()
    }

    #[test]
    fn a_mirrored_lun_behind_the_write_cache_is_thin_provisioned() {
        use crate::media::cache::{CachedVolume, WriteCache};
        use crate::media::mirror::MirrorSet;
        use std::collections::HashMap;
        use std::time::Duration;
        let dir = std::env::temp_dir().join(format!("ftss-sbc-ext-thin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let set = Arc::new(
            MirrorSet::open(&[dir.join("a.mirror"), dir.join("b.mirror")], 1024, 512)
                .expect("mirrors"),
        );
        let cache = WriteCache::open(
            &dir.join("wc"),
            2 << 20,
            HashMap::from([(0u32, Arc::clone(&set))]),
        )
        .expect("cache");
        let vol = CachedVolume::new(
            Arc::clone(&cache),
            Arc::clone(&set),
            0,
            CacheMode::Nonvolatile,
        );
        let (t, n) = target(Arc::new(vol));
        // READ CAPACITY(16): LBPME and LBPRZ.
        let mut rc16 = vec![0x9e, 0x10];
        rc16.resize(16, 0);
        rc16[13] = 32;
        let o = run(&t, &n, &rc16, &[]);
        assert_eq!(o.data_in[14], 0xc0, "LBPME, LBPRZ");
        assert_eq!(o.data_in[13], 3, "8 logical blocks per physical block");
        // Logical Block Provisioning VPD: LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned.
        let o = run(&t, &n, &[0x12, 0x01, 0xb2, 0, 0x40, 0], &[]);
        assert_eq!(&o.data_in[..8], &[0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);
        // Block Limits: unmapping deallocates, so its count is unbounded.
        let o = run(&t, &n, &[0x12, 0x01, 0xb0, 0, 0x40, 0], &[]);
        assert_eq!(&o.data_in[20..24], &u32::MAX.to_be_bytes());
        // Transfers and unmaps are best in whole physical blocks, aligned to LBA 0.
        assert_eq!(
            &o.data_in[6..8],
            &8u16.to_be_bytes(),
            "transfer granularity"
        );
        assert_eq!(&o.data_in[28..32], &8u32.to_be_bytes(), "unmap granularity");
        assert_eq!(
            &o.data_in[32..36],
            &0x8000_0000u32.to_be_bytes(),
            "UGAVALID, 0"
        );
        assert_eq!(
            lba_status(&t, &n, 0),
            vec![(0, 1024, 1)],
            "nothing mapped yet"
        );
        // WRITE (10) of blocks 0-15, then UNMAP of 4-7 and WRITE SAME (16) UNMAP of 12-13.
        let mut w10 = vec![0x2a, 0, 0, 0, 0, 0, 0, 0, 16, 0];
        let o = run(&t, &n, &w10, &[0x5a; 16 * 512]);
        assert_eq!((o.status, o.sense), (0, None));
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&4u64.to_be_bytes());
        list.extend_from_slice(&4u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let o = run(&t, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list);
        assert_eq!((o.status, o.sense), (0, None));
        let o = run(&t, &n, &ws16(12, 2, 0x08), &[0; 512]);
        assert_eq!((o.status, o.sense), (0, None));
        let want = vec![
            (0, 4, 0),
            (4, 4, 1),
            (8, 4, 0),
            (12, 2, 1),
            (14, 2, 0),
            (16, 1008, 1),
        ];
        let read16 = |t: &ScsiTarget| {
            let o = run(t, &n, &[0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0], &[]);
            assert_eq!((o.status, o.sense.as_deref()), (0, None));
            o.data_in
        };
        let expect_data = |d: &[u8]| {
            for (k, b) in d.chunks(512).enumerate() {
                let zero = (4..8).contains(&k) || (12..14).contains(&k);
                assert!(
                    b.iter().all(|&x| x == if zero { 0 } else { 0x5a }),
                    "lba {k}"
                );
            }
        };
        assert_eq!(lba_status(&t, &n, 0), want, "in the write cache");
        expect_data(&read16(&t));
        assert!(cache.drain(Duration::from_secs(10)), "destaged");
        assert_eq!(lba_status(&t, &n, 0), want, "on the mirrors");
        expect_data(&read16(&t));
        assert_eq!(set.scrub().expect("scrub").mismatches, 0);
        // Writing a deallocated block maps it again.
        w10[5] = 5;
        w10[8] = 1;
        let o = run(&t, &n, &w10, &[0x11; 512]);
        assert_eq!((o.status, o.sense), (0, None));
        assert_eq!(lba_status(&t, &n, 4)[..2], [(4, 1, 1), (5, 1, 0)]);
        // SANITIZE EXIT FAILURE MODE: no failure mode to leave; no parameter list.
        let o = run(&t, &n, &[0x48, 0x1f, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8]);
        assert_eq!(sense(&o), Some((5, 0x24, 0, 7)), "a parameter list");
        let o = run(&t, &n, &[0x48, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((o.status, o.sense), (0, None));
        assert_eq!(
            lba_status(&t, &n, 4)[..2],
            [(4, 1, 1), (5, 1, 0)],
            "changes nothing"
        );
        cache.shutdown();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_fully_provisioned_store_unmaps_by_writing_zeros_and_says_so() {
        let store = Arc::new(MemStore::new(vec![0xaa; 64 * 512]));
        let (t, n) = target(store.clone());
        // READ CAPACITY(16): no LBPME, LBPRZ still set.
        let mut rc16 = vec![0x9e, 0x10];
        rc16.resize(16, 0);
        rc16[13] = 32;
        let o = run(&t, &n, &rc16, &[]);
        assert_eq!(o.data_in[14], 0x40);
        // Logical Block Provisioning VPD: provisioning type 0 (not thin).
        let o = run(&t, &n, &[0x12, 0x01, 0xb2, 0, 0x40, 0], &[]);
        assert_eq!(&o.data_in[..8], &[0, 0xb2, 0, 4, 0, 0xe4, 0, 0]);
        // Block Limits: unmapping and WRITE SAME write, so they get a WRITE's bound.
        let o = run(&t, &n, &[0x12, 0x01, 0xb0, 0, 0x40, 0], &[]);
        assert_eq!(&o.data_in[20..24], &65536u32.to_be_bytes());
        assert_eq!(
            &o.data_in[28..36],
            &[0; 8],
            "no unmap granularity: nothing is freed"
        );
        assert_eq!(&o.data_in[36..44], &65536u64.to_be_bytes());
        // UNMAP blocks 4-7.
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&4u64.to_be_bytes());
        list.extend_from_slice(&4u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let o = run(&t, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list);
        assert_eq!((o.status, o.sense), (0, None));
        let v = store.0.lock().expect("lock").clone();
        assert!(v[..4 * 512].iter().all(|&b| b == 0xaa));
        assert!(v[4 * 512..8 * 512].iter().all(|&b| b == 0));
        assert!(v[8 * 512..].iter().all(|&b| b == 0xaa));
        // WRITE SAME with UNMAP and non-zero data writes the data: nothing is unmapped.
        let o = run(&t, &n, &ws16(10, 2, 0x08), &[0x5b; 512]);
        assert_eq!((o.status, o.sense), (0, None));
        let v = store.0.lock().expect("lock").clone();
        assert!(v[10 * 512..12 * 512].iter().all(|&b| b == 0x5b));
        // GET LBA STATUS: everything mapped, in one descriptor.
        let mut gls = vec![0x9e, 0x12];
        gls.extend_from_slice(&0u64.to_be_bytes());
        gls.extend_from_slice(&64u32.to_be_bytes());
        gls.extend_from_slice(&[0, 0]);
        let o = run(&t, &n, &gls, &[]);
        assert_eq!(o.data_in.len(), 24);
        assert_eq!(&o.data_in[16..21], &[0, 0, 0, 64, 0]);
    }
}
