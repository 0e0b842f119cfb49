//! SCSI CDB decoding (SPC-4, SBC-3): opcodes, CDB lengths, and typed views of the block
//! commands. Decoders never panic on short or hostile CDBs; errors carry the field pointer
//! for INVALID FIELD IN CDB sense.

use crate::sense::{common, Sense};

/// Operation codes.
pub mod op {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const SEND_DIAGNOSTIC: u8 = 0x1d;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    // SBC-3 commands beyond plain reads and writes.
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const WRITE_ATOMIC_16: u8 = 0x9c;
    /// SERVICE ACTION IN(16) service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    pub const SA_REPORT_SUPPORTED_TMFS: u8 = 0x0d;
    /// First vendor-specific opcode.
    pub const VENDOR_FIRST: u8 = 0xc0;
}

/// CDB length implied by the opcode's group code (SPC-4 4.2.5.1), when fixed.
#[must_use]
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Reads a big-endian integer of `n` bytes at `off`, or `None` past the end.
#[must_use]
pub fn be(cdb: &[u8], off: usize, n: usize) -> Option<u64> {
    let s = cdb.get(off..off + n)?;
    Some(s.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)))
}

/// The block-addressing fields of READ, WRITE, VERIFY, WRITE AND VERIFY, PRE-FETCH and
/// SYNCHRONIZE CACHE CDBs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// First logical block.
    pub lba: u64,
    /// Number of blocks (READ/WRITE(6) length 0 already turned into 256).
    pub blocks: u32,
    /// Byte 1 of the CDB (FUA, DPO, BYTCHK, protection fields), 0 for 6-byte CDBs.
    pub flags: u8,
    /// Offset of the transfer length field, for field pointers.
    pub len_field: u16,
}

impl BlockRange {
    /// FUA bit.
    #[must_use]
    pub fn fua(&self) -> bool {
        self.flags & 0x08 != 0
    }

    /// RDPROTECT / WRPROTECT / VRPROTECT field.
    #[must_use]
    pub fn protect(&self) -> u8 {
        self.flags >> 5
    }

    /// BYTCHK field (SBC-4: two bits).
    #[must_use]
    pub fn bytchk(&self) -> u8 {
        (self.flags >> 1) & 3
    }
}

/// Decodes the LBA and transfer length of a block command by its CDB size.
pub fn block_range(cdb: &[u8]) -> Result<BlockRange, Sense> {
    let short = || common::INVALID_FIELD_IN_CDB.cdb_field(0, None);
    let opcode = *cdb.first().ok_or_else(short)?;
    let len = cdb_len(opcode).ok_or_else(short)?;
    if cdb.len() < len {
        return Err(short());
    }
    Ok(match len {
        6 => {
            let lba = be(cdb, 1, 3).ok_or_else(short)? & 0x1f_ffff;
            let n = u32::from(cdb[4]);
            BlockRange {
                lba,
                blocks: if n == 0 && matches!(opcode, op::READ_6 | op::WRITE_6) {
                    256
                } else {
                    n
                },
                flags: 0,
                len_field: 4,
            }
        }
        10 => BlockRange {
            lba: be(cdb, 2, 4).ok_or_else(short)?,
            blocks: be(cdb, 7, 2).ok_or_else(short)? as u32,
            flags: cdb[1],
            len_field: 7,
        },
        12 => BlockRange {
            lba: be(cdb, 2, 4).ok_or_else(short)?,
            blocks: be(cdb, 6, 4).ok_or_else(short)? as u32,
            flags: cdb[1],
            len_field: 6,
        },
        _ => BlockRange {
            lba: be(cdb, 2, 8).ok_or_else(short)?,
            blocks: be(cdb, 10, 4).ok_or_else(short)? as u32,
            flags: cdb[1],
            len_field: 10,
        },
    })
}

/// Allocation length of a data-in command, by where its field sits.
#[must_use]
pub fn allocation_length(cdb: &[u8]) -> Option<u32> {
    let v = match (cdb.first()?, cdb.len()) {
        (&op::INQUIRY, _) => be(cdb, 3, 2)?,
        (&op::REQUEST_SENSE | &op::MODE_SENSE_6, _) => be(cdb, 4, 1)?,
        (&op::MODE_SENSE_10, _) => be(cdb, 7, 2)?,
        (&op::REPORT_LUNS, _) => be(cdb, 6, 4)?,
        (&op::MAINTENANCE_IN, _) => be(cdb, 6, 4)?,
        (&op::SERVICE_ACTION_IN_16, _) => be(cdb, 10, 4)?,
        _ => return None,
    };
    u32::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_write_fields() {
        let r = block_range(&[op::READ_6, 0x1f, 0xff, 0xff, 0, 0]).expect("read6");
        assert_eq!((r.lba, r.blocks), (0x1f_ffff, 256));
        let r = block_range(&[op::READ_10, 0x08, 0, 0, 1, 0, 0, 0, 8, 0]).expect("read10");
        assert_eq!((r.lba, r.blocks, r.fua()), (256, 8, true));
        let r = block_range(&[op::WRITE_16, 0x60, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0])
            .expect("write16");
        assert_eq!((r.lba, r.blocks, r.protect()), (1 << 32, 2, 3));
        let r =
            block_range(&[op::VERIFY_12, 0x02, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0]).expect("verify12");
        assert_eq!((r.lba, r.blocks, r.bytchk()), (9, 1, 1));
        assert!(block_range(&[op::READ_16, 0, 0]).is_err());
        assert!(block_range(&[]).is_err());
    }

    #[test]
    fn group_codes() {
        assert_eq!(cdb_len(op::INQUIRY), Some(6));
        assert_eq!(cdb_len(op::MODE_SENSE_10), Some(10));
        assert_eq!(cdb_len(op::READ_16), Some(16));
        assert_eq!(cdb_len(op::READ_12), Some(12));
        assert_eq!(cdb_len(0x7f), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(cdb in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = block_range(&cdb);
            let _ = allocation_length(&cdb);
        }
    }
}
