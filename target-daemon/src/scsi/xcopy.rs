//! The copy manager (SPC-4 5.16, 6.4, 6.24): EXTENDED COPY (LID1) of block ranges between
//! LUNs of this target named by identification CSCD descriptors, RECEIVE COPY RESULTS, and
//! the Third-party Copy VPD page that announces both.
//!
//! A copy runs to completion inside the EXTENDED COPY command (there is no background copy
//! to poll), so COPY STATUS always reports a finished operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ftss_proto::cdb::be;
use ftss_proto::sense::{common, key, Sense};

use super::command::{CmdResult, Ctx, Reply};
use super::lun::Lun;
use super::pr;
use super::spc::ready;
use super::target::status;

/// Opcodes and service actions.
pub(crate) mod op {
    pub(crate) const EXTENDED_COPY: u8 = 0x83;
    pub(crate) const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub(crate) const SA_EXTENDED_COPY_LID1: u8 = 0x00;
    pub(crate) const SA_COPY_STATUS: u8 = 0x00;
    pub(crate) const SA_OPERATING_PARAMETERS: u8 = 0x03;
}

/// CSCD descriptors one command may carry.
const CSCD_MAX: u16 = 8;
/// Segment descriptors one command may carry.
const SEGMENTS_MAX: u16 = 16;
/// Longest CSCD plus segment descriptor list.
const DESC_LIST_MAX: u32 = 1024;
/// Bytes read and written at a time.
const CHUNK: usize = 1 << 20;

/// Identification CSCD descriptor (SPC-4 6.4.6.2).
const CSCD_IDENTIFICATION: u8 = 0xe4;
/// Block device to block device segment descriptor (SPC-4 6.4.7.5).
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
const CSCD_LEN: usize = 32;
const SEGMENT_B2B_LEN: usize = 28;

const TOO_MANY_CSCDS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
const UNSUPPORTED_CSCD_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
const TOO_MANY_SEGMENTS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
const UNSUPPORTED_SEGMENT_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
const COPY_ABORTED: u8 = 0x0a;
/// The CSCD names no logical unit this copy manager can reach.
const COPY_TARGET_NOT_REACHABLE: Sense = Sense::new(COPY_ABORTED, 0x0d, 0x02);
/// The copy failed on a copy target device; details in the field pointer.
const COPY_FAILED: Sense = Sense::new(COPY_ABORTED, 0x00, 0x00);

/// What COPY STATUS reports about one finished copy.
#[derive(Clone, Copy, Debug)]
struct CopyStatus {
    ok: bool,
    segments: u16,
    bytes: u64,
}

/// Results held per (I_T nexus, list identifier) for RECEIVE COPY RESULTS.
#[derive(Default)]
pub(crate) struct CopyResults(Mutex<HashMap<(u64, u8), CopyStatus>>);

impl CopyResults {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u8), CopyStatus>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Results are kept per I_T nexus; a gone nexus can no longer ask.
    pub(crate) fn nexus_removed(&self, nexus: u64) {
        self.map().retain(|(n, _), _| *n != nexus);
    }
}

fn param(byte: usize, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_PARAM_LIST.param_field(byte as u16, bit)
}

fn field(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
}

/// One validated block-to-block segment.
struct Segment {
    /// Offset of the descriptor in the parameter list, for pointers.
    at: usize,
    src: u16,
    dst: u16,
    blocks: u16,
    src_lba: u64,
    dst_lba: u64,
}

/// EXTENDED COPY (LID1).
pub(crate) fn extended_copy(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let len = be(cdb, 10, 4).unwrap_or(0) as usize;
    let mut reply = Reply::none();
    reply.data_out_len = Some(len as u32);
    // SPC-4 6.4.1: a zero-length parameter list is not an error; nothing is copied.
    if len == 0 {
        return Ok(reply);
    }
    let data = c.cmd.data_out.get(..len).unwrap_or(c.cmd.data_out);
    if data.len() < 16 {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let list_id = data[0];
    let usage = (data[1] >> 3) & 0x03;
    if usage == 0x01 {
        return Err(param(1, Some(4))); // reserved LIST ID USAGE
    }
    if usage == 0x03 && list_id != 0 {
        return Err(param(0, None));
    }
    let cscd_len = usize::from(u16::from_be_bytes([data[2], data[3]]));
    let seg_len = u32::from_be_bytes([data[8], data[9], data[10], data[11]]) as usize;
    let inline_len = u32::from_be_bytes([data[12], data[13], data[14], data[15]]) as usize;
    let total = 16usize
        .saturating_add(cscd_len)
        .saturating_add(seg_len)
        .saturating_add(inline_len);
    if total > data.len() {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    if cscd_len + seg_len > DESC_LIST_MAX as usize {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    if inline_len != 0 {
        // No segment descriptor type we support uses inline data.
        return Err(param(12, None));
    }
    // CSCD descriptors: every supported type is 32 bytes long.
    if !cscd_len.is_multiple_of(CSCD_LEN) {
        return Err(param(2, None));
    }
    if cscd_len / CSCD_LEN > usize::from(CSCD_MAX) {
        return Err(TOO_MANY_CSCDS);
    }
    let cscds: Vec<&[u8]> = data[16..16 + cscd_len].chunks(CSCD_LEN).collect();
    for (i, d) in cscds.iter().enumerate() {
        let at = 16 + i * CSCD_LEN;
        if d[0] != CSCD_IDENTIFICATION {
            return Err(UNSUPPORTED_CSCD_TYPE.param_field(at as u16, None));
        }
        // Byte 1 bits 7-6 (LU ID TYPE) and the LU IDENTIFIER are not looked at: SPC-4
        // identifies the logical unit by the designator alone (the field went with
        // proxy tokens), and this target reports SPC-4 in INQUIRY.
    }
    // Segment descriptors.
    let mut segs = Vec::new();
    let mut pos = 16 + cscd_len;
    let end = pos + seg_len;
    while pos < end {
        if segs.len() == usize::from(SEGMENTS_MAX) {
            return Err(TOO_MANY_SEGMENTS);
        }
        let Some(h) = data.get(pos..pos + 4).filter(|_| pos + 4 <= end) else {
            return Err(common::PARAM_LIST_LENGTH_ERROR);
        };
        if h[0] != SEGMENT_BLOCK_TO_BLOCK {
            return Err(UNSUPPORTED_SEGMENT_TYPE.param_field(pos as u16, None));
        }
        let dlen = usize::from(u16::from_be_bytes([h[2], h[3]])) + 4;
        if dlen != SEGMENT_B2B_LEN {
            return Err(param(pos + 2, None));
        }
        let Some(d) = data.get(pos..pos + dlen).filter(|_| pos + dlen <= end) else {
            return Err(common::PARAM_LIST_LENGTH_ERROR);
        };
        let rd = |o: usize, n: usize| be(d, o, n).unwrap_or(0);
        segs.push(Segment {
            at: pos,
            src: rd(4, 2) as u16,
            dst: rd(6, 2) as u16,
            blocks: rd(10, 2) as u16,
            src_lba: rd(12, 8),
            dst_lba: rd(20, 8),
        });
        pos += dlen;
    }
    // The descriptors are well formed: the copy starts, and what it did is held for
    // RECEIVE COPY RESULTS (LIST ID USAGE 00b) whether or not it completes.
    let mut done = CopyStatus {
        ok: false,
        segments: 0,
        bytes: 0,
    };
    let result = run_segments(c, &cscds, &segs, &mut done);
    done.ok = matches!(result, Ok(None));
    if usage == 0x00 {
        c.lun.copies.map().insert((c.nexus.id, list_id), done);
    }
    match result {
        Ok(None) => Ok(reply),
        Ok(Some(st)) => {
            reply.status = st;
            Ok(reply)
        }
        Err(s) => Err(s),
    }
}

/// Resolves CSCD descriptor `index` to a LUN of this target by its NAA designator.
fn resolve(c: &Ctx<'_>, cscds: &[&[u8]], index: u16, at: usize) -> Result<Arc<Lun>, Sense> {
    let unreachable = COPY_TARGET_NOT_REACHABLE.param_field(at as u16, None);
    let d = cscds.get(usize::from(index)).ok_or(unreachable)?;
    let cscd_at = 16 + usize::from(index) * CSCD_LEN;
    if d[1] & 0x20 != 0 {
        // NUL: a null device, which this copy manager does not provide.
        return Err(COPY_TARGET_NOT_REACHABLE.param_field(cscd_at as u16 + 1, Some(5)));
    }
    if d[1] & 0x1f != 0 {
        // Peripheral device type: only block devices are copy targets here.
        return Err(Sense::new(COPY_ABORTED, 0x0d, 0x03).param_field(cscd_at as u16 + 1, None));
    }
    // Designation descriptor at byte 4: code set, association/type, length, designator.
    let assoc_type = d[5];
    let dlen = usize::from(d[7]);
    let naa = d.get(8..8 + dlen).unwrap_or_default();
    let lun = if assoc_type & 0x3f == 0x03 && dlen == 8 {
        c.target.lun_where(|l| l.naa[..] == *naa)
    } else {
        None
    };
    let lun = lun.ok_or(COPY_TARGET_NOT_REACHABLE.param_field(cscd_at as u16 + 4, None))?;
    let block = be(d, 29, 3).unwrap_or(0) as u32;
    if block != lun.block_size() {
        return Err(param(cscd_at + 29, None));
    }
    Ok(lun)
}

/// Runs the segments in order. `Ok(Some(status))`: stopped with that status (RESERVATION
/// CONFLICT) and no sense.
fn run_segments(
    c: &Ctx<'_>,
    cscds: &[&[u8]],
    segs: &[Segment],
    done: &mut CopyStatus,
) -> Result<Option<u8>, Sense> {
    for s in segs {
        let src = resolve(c, cscds, s.src, s.at + 4)?;
        let dst = resolve(c, cscds, s.dst, s.at + 6)?;
        // The copy manager reads and writes on behalf of the nexus that sent the command,
        // so that nexus's reservation rights apply to both sides.
        let (src, dst): (&Lun, &Lun) = (&src, &dst);
        if !pr::admits_copy(src, c.nexus, false) || !pr::admits_copy(dst, c.nexus, true) {
            return Ok(Some(status::RESERVATION_CONFLICT));
        }
        ready(src)?;
        ready(dst)?;
        if dst.write_protected() {
            return Err(common::WRITE_PROTECTED);
        }
        let blocks = u64::from(s.blocks);
        let in_range = |l: &Lun, lba: u64| lba.checked_add(blocks).is_some_and(|e| e <= l.blocks());
        if !in_range(src, s.src_lba) {
            return Err(COPY_FAILED.param_field(s.at as u16 + 12, None));
        }
        if !in_range(dst, s.dst_lba) {
            return Err(COPY_FAILED.param_field(s.at as u16 + 20, None));
        }
        copy_blocks(src, dst, s.src_lba, s.dst_lba, blocks)
            .map_err(|_| COPY_FAILED.param_field(s.at as u16, None))?;
        done.segments += 1;
        done.bytes += blocks * u64::from(src.block_size());
    }
    Ok(None)
}

/// Copies in bounded chunks; backwards when the ranges overlap on one LUN with the
/// destination after the source, so no block is overwritten before it is read.
fn copy_blocks(
    src: &Lun,
    dst: &Lun,
    src_lba: u64,
    dst_lba: u64,
    blocks: u64,
) -> Result<(), crate::media::MediaError> {
    let bs = u64::from(src.block_size());
    let per = (CHUNK as u64 / bs).max(1);
    let backwards = std::ptr::eq(src, dst) && dst_lba > src_lba && dst_lba < src_lba + blocks;
    let mut buf = vec![0u8; (per.min(blocks) * bs) as usize];
    let mut left = blocks;
    while left > 0 {
        let n = left.min(per);
        let off = if backwards { left - n } else { blocks - left };
        let b = &mut buf[..(n * bs) as usize];
        src.store.read_blocks(src_lba + off, b)?;
        dst.store.write_blocks(dst_lba + off, b, false)?;
        left -= n;
    }
    Ok(())
}

/// RECEIVE COPY RESULTS: COPY STATUS and OPERATING PARAMETERS.
pub(crate) fn receive_copy_results(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let alloc = be(cdb, 10, 4).unwrap_or(0) as usize;
    let mut d = match cdb[1] & 0x1f {
        op::SA_COPY_STATUS => {
            let list_id = cdb[2];
            let st = c
                .lun
                .copies
                .map()
                .get(&(c.nexus.id, list_id))
                .copied()
                .ok_or(field(2, None))?;
            let mut d = vec![0u8; 12];
            d[3] = 8;
            // HDD clear; copy manager status 1: completed without errors, 2: with errors.
            d[4] = if st.ok { 0x01 } else { 0x02 };
            d[5..7].copy_from_slice(&st.segments.to_be_bytes());
            // Transfer count units: bytes (00h) when it fits, else kibibytes (F1h).
            match u32::try_from(st.bytes) {
                Ok(b) => d[8..12].copy_from_slice(&b.to_be_bytes()),
                Err(_) => {
                    d[7] = 0xf1;
                    let k = u32::try_from(st.bytes >> 10).unwrap_or(u32::MAX);
                    d[8..12].copy_from_slice(&k.to_be_bytes());
                }
            }
            d
        }
        op::SA_OPERATING_PARAMETERS => {
            let mut d = vec![0u8; 44];
            d[8..10].copy_from_slice(&CSCD_MAX.to_be_bytes());
            d[10..12].copy_from_slice(&SEGMENTS_MAX.to_be_bytes());
            d[12..16].copy_from_slice(&DESC_LIST_MAX.to_be_bytes());
            d[16..20].copy_from_slice(&max_segment_bytes(c.lun).to_be_bytes());
            // Maximum inline data length and held data limit: none.
            // Total and maximum concurrent copies: one at a time per command.
            d[34..36].copy_from_slice(&1u16.to_be_bytes());
            d[36] = 1;
            // Data segment granularity: one block (log2).
            d[37] = c.lun.block_size().trailing_zeros() as u8;
            let codes = [SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION];
            d[43] = codes.len() as u8;
            d.extend_from_slice(&codes);
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            d
        }
        _ => return Err(field(1, Some(4))),
    };
    d.truncate(alloc);
    Ok(Reply::good(d))
}

/// A segment descriptor carries at most 65535 blocks.
fn max_segment_bytes(l: &Lun) -> u32 {
    u32::try_from(0xffff * u64::from(l.block_size())).unwrap_or(u32::MAX)
}

/// Third-party Copy VPD page (0x8F) descriptors, after the 4-byte page header.
pub(crate) fn third_party_copy_vpd(l: &Lun) -> Vec<u8> {
    fn descriptor(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
        let mut b = body.to_vec();
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend(b);
    }
    let mut d = Vec::new();
    // Supported commands: EXTENDED COPY (LID1), RECEIVE COPY RESULTS (COPY STATUS,
    // OPERATING PARAMETERS).
    let cmds = [
        op::EXTENDED_COPY,
        1,
        op::SA_EXTENDED_COPY_LID1,
        op::RECEIVE_COPY_RESULTS,
        2,
        op::SA_COPY_STATUS,
        op::SA_OPERATING_PARAMETERS,
    ];
    let mut body = vec![cmds.len() as u8];
    body.extend_from_slice(&cmds);
    descriptor(&mut d, 0x0001, &body);
    // Parameter data: CSCD and segment descriptor counts, descriptor list length.
    let mut p = vec![0u8; 28];
    p[4..6].copy_from_slice(&CSCD_MAX.to_be_bytes());
    p[6..8].copy_from_slice(&SEGMENTS_MAX.to_be_bytes());
    p[8..12].copy_from_slice(&DESC_LIST_MAX.to_be_bytes());
    descriptor(&mut d, 0x0004, &p);
    // Supported descriptors.
    descriptor(
        &mut d,
        0x0008,
        &[2, SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION],
    );
    // Supported CSCD descriptor IDs: none (no ROD or proxy CSCDs).
    descriptor(&mut d, 0x000c, &[0, 0]);
    // General copy operations: one copy at a time, segment limit, block granularity.
    let mut g = vec![0u8; 32];
    g[0..4].copy_from_slice(&1u32.to_be_bytes());
    g[4..8].copy_from_slice(&1u32.to_be_bytes());
    g[8..12].copy_from_slice(&max_segment_bytes(l).to_be_bytes());
    g[12] = l.block_size().trailing_zeros() as u8;
    descriptor(&mut d, 0x8001, &g);
    d
}
