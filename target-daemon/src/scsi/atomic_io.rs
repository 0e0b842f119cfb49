//! SBC-3 read-modify-writes: COMPARE AND WRITE, ORWRITE (16) and WRITE ATOMIC (16).
//!
//! Atomicity: these hold the LUN's media lock exclusively across their read and write,
//! and every other media access holds it shared, so no command on the LUN sees or changes
//! the blocks between the two steps.

use ftss_proto::cdb::be;
use ftss_proto::sense::common;

use super::block_io::{checked_range, writable};
use super::command::{field, in_range, media, reply_out, CmdResult, Ctx};
use super::lun::Lun;

/// MAXIMUM COMPARE AND WRITE LENGTH (Block Limits VPD): the most blocks one COMPARE AND
/// WRITE may compare and write. It holds every other command on the LUN off while it
/// runs, so it is kept well under the one-byte field's 255.
pub(crate) const CAW_BLOCKS_MAX: u8 = 128;

/// Bytes one WRITE ATOMIC may write (MAXIMUM ATOMIC TRANSFER LENGTH is this over the
/// block size).
const ATOMIC_BYTES_MAX: u64 = 1 << 20;

/// MAXIMUM ATOMIC TRANSFER LENGTH for this LUN, in blocks.
pub(crate) fn atomic_blocks_max(l: &Lun) -> u32 {
    let n = ATOMIC_BYTES_MAX / u64::from(l.block_size());
    u32::try_from(n)
        .unwrap_or(u32::MAX)
        .min(l.transfer_blocks_max())
}

/// COMPARE AND WRITE (SBC-3 5.2): the first half of the data-out is compared with the
/// blocks; only if every byte matches is the second half written. MISCOMPARE carries the
/// offset of the first differing byte in INFORMATION.
pub(crate) fn compare_and_write(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if cdb[1] >> 5 != 0 {
        return Err(field(1, Some(7))); // WRPROTECT: no protection information here
    }
    let fua = cdb[1] & 0x08 != 0;
    let lba = be(cdb, 2, 8).unwrap_or(0);
    let n = cdb[13];
    if u32::from(n) > u32::from(CAW_BLOCKS_MAX) {
        return Err(field(13, None));
    }
    in_range(c.lun, lba, u64::from(n))?;
    writable(c)?;
    let len = usize::from(n) * c.lun.block_size() as usize;
    // The data-out splits into a verify half and a write half at `len`: when the transfer
    // the initiator sent disagrees with NUMBER OF LOGICAL BLOCKS, where it meant the split
    // is unknown, so nothing is compared or written.
    if c.cmd.expected_len as usize != 2 * len || c.cmd.data_out.len() < 2 * len {
        return Err(field(13, None));
    }
    if n == 0 {
        return Ok(reply_out(0)); // SBC-3: zero blocks is not an error
    }
    let (verify, write) = c.cmd.data_out[..2 * len].split_at(len);
    let _media = c.lun.media_exclusive();
    let mut cur = vec![0u8; len];
    c.lun
        .store
        .read_blocks(lba, &mut cur)
        .map_err(|e| media(e, false))?;
    if let Some(i) = cur.iter().zip(verify).position(|(a, b)| a != b) {
        return Err(common::MISCOMPARE_DURING_VERIFY.with_info(i as u64));
    }
    c.lun
        .store
        .write_blocks(lba, write, fua)
        .map_err(|e| media(e, true))?;
    Ok(reply_out(2 * len))
}

/// ORWRITE (16) (SBC-3 5.8): each block becomes itself ORed with the data-out, as one
/// step against other commands on the LUN.
pub(crate) fn orwrite(c: &Ctx<'_>) -> CmdResult {
    let r = checked_range(c)?;
    writable(c)?;
    let bs = c.lun.block_size() as usize;
    let len = r.blocks as usize * bs;
    // As for WRITE (FCP-4 9.4.2 (a)): the whole blocks that arrived are processed.
    let have = c.cmd.data_out.len().min(len) / bs * bs;
    let data = &c.cmd.data_out[..have];
    if !data.is_empty() {
        let _media = c.lun.media_exclusive();
        let mut cur = vec![0u8; data.len()];
        c.lun
            .store
            .read_blocks(r.lba, &mut cur)
            .map_err(|e| media(e, false))?;
        for (a, b) in cur.iter_mut().zip(data) {
            *a |= b;
        }
        c.lun
            .store
            .write_blocks(r.lba, &cur, r.fua())
            .map_err(|e| media(e, true))?;
    }
    Ok(reply_out(len))
}

/// WRITE ATOMIC (16) (SBC-4 5.48): all of the blocks or none, as one step against other
/// commands on the LUN. No atomic boundaries are supported, so ATOMIC BOUNDARY must be 0.
pub(crate) fn write_atomic(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if cdb[1] >> 5 != 0 {
        return Err(field(1, Some(7))); // WRPROTECT
    }
    let fua = cdb[1] & 0x08 != 0;
    let lba = be(cdb, 2, 8).unwrap_or(0);
    if be(cdb, 10, 2).unwrap_or(0) != 0 {
        return Err(field(10, None));
    }
    let n = be(cdb, 12, 2).unwrap_or(0);
    if n > u64::from(atomic_blocks_max(c.lun)) {
        return Err(field(12, None));
    }
    in_range(c.lun, lba, n)?;
    writable(c)?;
    let len = n as usize * c.lun.block_size() as usize;
    // Part of an atomic write is not the write that was asked for.
    let data = c
        .cmd
        .data_out
        .get(..len)
        .ok_or(common::INVALID_FIELD_IN_COMMAND_IU)?;
    if !data.is_empty() {
        let _media = c.lun.media_exclusive();
        c.lun
            .store
            .write_blocks(lba, data, fua)
            .map_err(|e| media(e, true))?;
    }
    Ok(reply_out(len))
}
