//! Reading and writing fields of the 48-byte Basic Header Segment, for the PDU files.

use nom::number::complete::{be_u16, be_u32, be_u8};

use super::{Itt, Lun};
use crate::serial::{CmdSn, StatSn};

/// Field reader over a complete BHS; the caller has checked the length, so the nom
/// parsers cannot run short, but they still return errors rather than panic.
pub(super) struct Bhs<'a>(pub(super) &'a [u8]);

type NomErr<'a> = nom::Err<nom::error::Error<&'a [u8]>>;

impl<'a> Bhs<'a> {
    fn at(&self, off: usize) -> &'a [u8] {
        self.0.get(off..).unwrap_or(&[])
    }
    pub(super) fn u8(&self, off: usize) -> u8 {
        be_u8::<_, nom::error::Error<&[u8]>>(self.at(off)).map_or(0, |(_, v)| v)
    }
    pub(super) fn u16(&self, off: usize) -> u16 {
        be_u16::<_, nom::error::Error<&[u8]>>(self.at(off)).map_or(0, |(_, v)| v)
    }
    pub(super) fn u32(&self, off: usize) -> u32 {
        let r: Result<(&[u8], u32), NomErr<'_>> = be_u32(self.at(off));
        r.map_or(0, |(_, v)| v)
    }
    pub(super) fn u64(&self, off: usize) -> u64 {
        (u64::from(self.u32(off)) << 32) | u64::from(self.u32(off + 4))
    }
    pub(super) fn flag(&self, off: usize, mask: u8) -> bool {
        self.u8(off) & mask != 0
    }
    pub(super) fn isid(&self) -> [u8; 6] {
        let mut v = [0u8; 6];
        v.copy_from_slice(&self.0[8..14]);
        v
    }

    // The fields below sit at the same place in every PDU that has them.

    /// I: immediate delivery.
    pub(super) fn immediate(&self) -> bool {
        self.flag(0, 0x40)
    }
    /// F: final.
    pub(super) fn final_(&self) -> bool {
        self.flag(1, 0x80)
    }
    pub(super) fn lun(&self) -> Lun {
        Lun(self.u64(8))
    }
    pub(super) fn itt(&self) -> Itt {
        Itt(self.u32(16))
    }
}

/// Byte 0 of a request with the I bit as given.
pub(super) fn imm(immediate: bool) -> u8 {
    if immediate {
        0x40
    } else {
        0
    }
}

pub(super) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
pub(super) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub(super) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
/// StatSN, ExpCmdSN and MaxCmdSN where every target PDU but Data-In keeps them.
pub(super) fn seq_trailer(b: &mut [u8], stat_sn: StatSn, exp: CmdSn, max: CmdSn) {
    put32(b, 24, stat_sn.0);
    put32(b, 28, exp.0);
    put32(b, 32, max.0);
}
