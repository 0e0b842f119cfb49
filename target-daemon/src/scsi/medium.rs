//! The medium as a whole: READ CAPACITY (10) and (16), START STOP UNIT and PREVENT ALLOW
//! MEDIUM REMOVAL (the last two matter on a removable LUN only).

use ftss_proto::cdb::allocation_length;
use ftss_proto::sense::common;

use super::command::{field, CmdResult, Ctx, Reply};
use super::spc::ready;

pub(crate) fn read_capacity_10(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let pmi = cdb[8] & 0x01 != 0;
    let lba = u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]]);
    if !pmi && lba != 0 {
        return Err(field(2, None));
    }
    ready(c.lun)?;
    let last = c.lun.blocks() - 1;
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
    d.extend_from_slice(&c.lun.block_size().to_be_bytes());
    Ok(Reply::good(d))
}

pub(crate) fn read_capacity_16(c: &Ctx<'_>) -> CmdResult {
    ready(c.lun)?;
    let alloc = allocation_length(c.cmd.cdb).unwrap_or(0);
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&(c.lun.blocks() - 1).to_be_bytes());
    d[8..12].copy_from_slice(&c.lun.block_size().to_be_bytes());
    d[13] = c.lun.physical_exponent();
    // LOWEST ALIGNED LOGICAL BLOCK ADDRESS stays 0: LBA 0 starts a physical block.
    d[14] = super::provisioning::provisioning_bits(c.lun);
    d.truncate(alloc as usize);
    Ok(Reply::good(d))
}

pub(crate) fn start_stop_unit(c: &Ctx<'_>) -> CmdResult {
    let b4 = c.cmd.cdb[4];
    let power_condition = b4 >> 4;
    let loej = b4 & 0x02 != 0;
    let start = b4 & 0x01 != 0;
    if power_condition != 0 {
        // Power conditions change nothing on this device; LOEJ and START are ignored.
        return Ok(Reply::none());
    }
    if !loej {
        return Ok(Reply::none());
    }
    if !c.lun.removable {
        return Err(field(4, Some(1)));
    }
    let mut s = c.lun.state();
    // SBC-3 5.25: with removal prevented, LOEJ is refused whether it loads or ejects.
    if !s.prevent.is_empty() {
        return Err(common::MEDIUM_REMOVAL_PREVENTED);
    }
    s.ejected = !start;
    Ok(Reply::none())
}

pub(crate) fn prevent_allow(c: &Ctx<'_>) -> CmdResult {
    let prevent = c.cmd.cdb[4] & 0x03;
    if !c.lun.removable {
        // Nothing can be removed; SBC-3 lets the command succeed without effect.
        return Ok(Reply::none());
    }
    let mut s = c.lun.state();
    match prevent {
        0 => {
            s.prevent.remove(&c.nexus.id);
        }
        1 => {
            s.prevent.insert(c.nexus.id);
        }
        _ => return Err(field(4, Some(0))),
    }
    Ok(Reply::none())
}
