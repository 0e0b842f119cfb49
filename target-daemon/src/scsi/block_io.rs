//! SBC-3 reads and writes: READ, WRITE, WRITE AND VERIFY, VERIFY, PRE-FETCH and
//! SYNCHRONIZE CACHE, with the range checks every block command makes.

use ftss_proto::cdb::{be, block_range, op, BlockRange};
use ftss_proto::sense::{common, Sense};

use super::command::{field, media, CmdResult, Ctx, Reply};
use super::lun::Lun;
use super::spc::ready;
use super::target::status;
use crate::media::MediaError;

/// Bytes of data-out the CDB calls for, for commands that carry data-out.
pub(crate) fn data_out_len(lun: &Lun, cdb: &[u8]) -> Option<u32> {
    let opcode = *cdb.first()?;
    let bs = lun.block_size();
    match opcode {
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_12
        | op::WRITE_VERIFY_16 => {
            let r = block_range(cdb).ok()?;
            r.blocks.checked_mul(bs)
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            let r = block_range(cdb).ok()?;
            match r.bytchk() {
                1 => r.blocks.checked_mul(bs),
                3 => Some(bs),
                _ => Some(0),
            }
        }
        _ => extended_data_out_len(lun, cdb),
    }
}

/// Bytes of data-out the CDB of one of these commands calls for.
fn extended_data_out_len(l: &Lun, cdb: &[u8]) -> Option<u32> {
    let bs = u64::from(l.block_size());
    let n = match *cdb.first()? {
        op::COMPARE_AND_WRITE => 2 * u64::from(*cdb.get(13)?) * bs,
        op::WRITE_SAME_10 => bs,
        op::WRITE_SAME_16 if cdb.get(1)? & 0x01 != 0 => 0,
        op::WRITE_SAME_16 => bs,
        op::UNMAP => be(cdb, 7, 2)?,
        op::ORWRITE_16 => be(cdb, 10, 4)? * bs,
        op::WRITE_ATOMIC_16 => be(cdb, 12, 2)? * bs,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// The checks every block command makes: protection fields, capacity, transfer limit.
pub(crate) fn checked_range(c: &Ctx<'_>) -> Result<BlockRange, Sense> {
    let r = block_range(c.cmd.cdb)?;
    if r.protect() != 0 {
        // No protection information on these LUNs (SBC-3 4.22).
        return Err(field(1, Some(7)));
    }
    let end = r.lba.checked_add(u64::from(r.blocks));
    if end.is_none_or(|e| e > c.lun.blocks()) {
        return Err(common::LBA_OUT_OF_RANGE);
    }
    if r.blocks > c.lun.transfer_blocks_max() {
        return Err(field(r.len_field, None));
    }
    Ok(r)
}

pub(crate) fn read(c: &Ctx<'_>) -> CmdResult {
    let r = checked_range(c)?;
    ready(c.lun)?;
    let bs = c.lun.block_size() as usize;
    let mut buf = vec![0u8; r.blocks as usize * bs];
    if !buf.is_empty() {
        let Some(_media) = c.lun.media_shared_or_refuse() else {
            return Err(media(MediaError::WouldBlock, false));
        };
        c.lun
            .store
            .read_blocks(r.lba, &mut buf)
            .map_err(|e| media(e, false))?;
    }
    Ok(Reply::good(buf))
}

/// Data-out for a verify: exactly what the CDB asks for, or INVALID FIELD IN COMMAND
/// INFORMATION UNIT when the initiator sent less (there is nothing to compare against).
fn data_for<'a>(c: &Ctx<'a>, len: usize) -> Result<&'a [u8], Sense> {
    c.cmd
        .data_out
        .get(..len)
        .ok_or(common::INVALID_FIELD_IN_COMMAND_IU)
}

/// Data-out for a write: the whole blocks the initiator sent, up to what the CDB asks for.
/// When the Expected Data Transfer Length is short, FCP-4 9.4.2 (a), which iSCSI targets
/// follow too, says to process the command normally without the missing data: we write the
/// blocks that arrived and the transport reports the overflow residual.
fn write_data<'a>(c: &Ctx<'a>, len: usize) -> &'a [u8] {
    let bs = c.lun.block_size() as usize;
    let have = c.cmd.data_out.len().min(len) / bs * bs;
    &c.cmd.data_out[..have]
}

pub(crate) fn writable(c: &Ctx<'_>) -> Result<(), Sense> {
    if c.lun.write_protected() {
        return Err(common::WRITE_PROTECTED);
    }
    ready(c.lun)
}

pub(crate) fn write(c: &Ctx<'_>) -> CmdResult {
    let r = checked_range(c)?;
    writable(c)?;
    let len = r.blocks as usize * c.lun.block_size() as usize;
    let data = write_data(c, len);
    if !data.is_empty() {
        let Some(_media) = c.lun.media_shared_or_refuse() else {
            return Err(media(MediaError::WouldBlock, true));
        };
        c.lun
            .store
            .write_blocks(r.lba, data, r.fua())
            .map_err(|e| media(e, true))?;
    }
    Ok(Reply {
        status: status::GOOD,
        data: Vec::new(),
        data_out_len: Some(len as u32),
    })
}

pub(crate) fn write_verify(c: &Ctx<'_>) -> CmdResult {
    let r = checked_range(c)?;
    if r.bytchk() > 1 {
        return Err(field(1, Some(2)));
    }
    writable(c)?;
    let len = r.blocks as usize * c.lun.block_size() as usize;
    let data = write_data(c, len);
    if !data.is_empty() {
        let _media = c.lun.media_shared();
        // Verification reads back from the medium, so the write must reach it first.
        c.lun
            .store
            .write_blocks(r.lba, data, true)
            .map_err(|e| media(e, true))?;
        let mut back = vec![0u8; data.len()];
        c.lun
            .store
            .read_blocks(r.lba, &mut back)
            .map_err(|e| media(e, false))?;
        if let Some(i) = back.iter().zip(data).position(|(a, b)| a != b) {
            return Err(common::MISCOMPARE_DURING_VERIFY.with_info(i as u64));
        }
    }
    Ok(Reply {
        status: status::GOOD,
        data: Vec::new(),
        data_out_len: Some(len as u32),
    })
}

pub(crate) fn verify(c: &Ctx<'_>) -> CmdResult {
    let r = checked_range(c)?;
    let bytchk = r.bytchk();
    if bytchk == 2 {
        return Err(field(1, Some(2)));
    }
    ready(c.lun)?;
    let bs = c.lun.block_size() as usize;
    let want = data_out_len(c.lun, c.cmd.cdb).unwrap_or(0) as usize;
    let data = data_for(c, want)?;
    let mut reply = Reply::none();
    reply.data_out_len = Some(want as u32);
    if r.blocks == 0 {
        return Ok(reply);
    }
    let _media = c.lun.media_shared();
    // Read in bounded chunks: a large VERIFY must not allocate its whole range.
    let chunk_blocks = ((1usize << 20) / bs).max(1);
    let mut done = 0usize;
    let mut buf = vec![0u8; chunk_blocks.min(r.blocks as usize) * bs];
    while done < r.blocks as usize {
        let n = (r.blocks as usize - done).min(chunk_blocks);
        let b = &mut buf[..n * bs];
        c.lun
            .store
            .read_blocks(r.lba + done as u64, b)
            .map_err(|e| media(e, false))?;
        let base = done * bs;
        let mismatch = match bytchk {
            1 => b
                .iter()
                .zip(&data[base..base + b.len()])
                .position(|(x, y)| x != y),
            // BYTCHK 3: one block of data-out is compared with every block.
            3 => (0..b.len()).find(|&i| b[i] != data[i % bs]),
            _ => None,
        };
        if let Some(i) = mismatch {
            return Err(common::MISCOMPARE_DURING_VERIFY.with_info((base + i) as u64));
        }
        done += n;
    }
    Ok(reply)
}

pub(crate) fn pre_fetch(c: &Ctx<'_>) -> CmdResult {
    checked_range(c)?;
    ready(c.lun)?;
    // Nothing to stage: the blocks are as close as they get. SBC-3: GOOD when the cache
    // could not hold them all, CONDITION MET when it could; we have no such cache.
    Ok(Reply::none())
}

pub(crate) fn synchronize_cache(c: &Ctx<'_>) -> CmdResult {
    let r = block_range(c.cmd.cdb)?;
    let end = r.lba.checked_add(u64::from(r.blocks));
    if end.is_none_or(|e| e > c.lun.blocks()) {
        return Err(common::LBA_OUT_OF_RANGE);
    }
    ready(c.lun)?;
    c.lun.store.flush().map_err(|e| media(e, true))?;
    Ok(Reply::none())
}
