//! READ DEFECT DATA(10) and (12) (SBC-3 5.14, 5.15): a LUN over a file or mirror set has
//! no grown or primary defects of its own, so both lists are valid and empty.

use ftss_proto::cdb::be;
use ftss_proto::sense::{common, Sense};

use super::command::{CmdResult, Ctx, Reply};

pub(crate) const READ_DEFECT_DATA_10: u8 = 0x37;
pub(crate) const READ_DEFECT_DATA_12: u8 = 0xb7;

fn field(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
}

pub(crate) fn read_defect_data(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let twelve = cdb[0] == READ_DEFECT_DATA_12;
    // REQ_PLIST, REQ_GLIST and the format sit in byte 2 of the 10-byte CDB, byte 1 of
    // the 12-byte one.
    let fb: u16 = if twelve { 1 } else { 2 };
    let flags = cdb[usize::from(fb)];
    let format = flags & 0x07;
    // Address descriptor formats: short block (000b), long block (011b), bytes from
    // index (100b), physical sector (101b), vendor specific (110b). An empty list is
    // the same in all of them, so the requested one is returned.
    if matches!(format, 0b001 | 0b010 | 0b111) {
        return Err(field(fb, Some(2)));
    }
    // PLISTV and GLISTV: each list that was asked for is valid (and empty).
    let b1 = flags & 0x18 | format;
    let (d, alloc) = if twelve {
        (vec![0, b1, 0, 0, 0, 0, 0, 0], be(cdb, 6, 4).unwrap_or(0))
    } else {
        (vec![0, b1, 0, 0], be(cdb, 7, 2).unwrap_or(0))
    };
    let mut d = d;
    d.truncate(alloc as usize);
    Ok(Reply::good(d))
}
