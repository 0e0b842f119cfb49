//! SCSI sense data (SPC-4 4.5): sense key, ASC/ASCQ, information and the sense-key
//! specific field pointer, in fixed (0x70) or descriptor (0x72) format.

/// Sense keys.
pub mod key {
    #![allow(missing_docs)]
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Where in the CDB or parameter list the bad field is (SPC-4 4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True when the field is in the CDB, false when in the parameter list.
    pub in_cdb: bool,
    /// Byte offset.
    pub byte: u16,
    /// Bit (0-7), when one bit is at fault.
    pub bit: Option<u8>,
}

/// SCSI status codes (SAM-5 5.3): the one definition the target, the vendor commands and
/// the initiator use.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET (PRE-FETCH).
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// TASK ABORTED: a task another I_T nexus aborted, with TAS=1 (SAM-5 5.6).
    pub const TASK_ABORTED: u8 = 0x40;
}

/// One sense report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (e.g. the miscompare offset).
    pub info: Option<u64>,
    /// Sense-key specific field pointer.
    pub field: Option<FieldPointer>,
}

impl Sense {
    /// Sense without information or field pointer.
    #[must_use]
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    /// With a field pointer into the CDB.
    #[must_use]
    pub const fn cdb_field(mut self, byte: u16, bit: Option<u8>) -> Self {
        self.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        self
    }

    /// With a field pointer into the parameter list.
    #[must_use]
    pub const fn param_field(mut self, byte: u16, bit: Option<u8>) -> Self {
        self.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        self
    }

    /// With the INFORMATION field.
    #[must_use]
    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    fn sks(&self) -> Option<[u8; 3]> {
        self.field.map(|f| {
            let mut b0 = 0x80u8; // SKSV
            if f.in_cdb {
                b0 |= 0x40;
            }
            if let Some(bit) = f.bit {
                b0 |= 0x08 | (bit & 7);
            }
            let [hi, lo] = f.byte.to_be_bytes();
            [b0, hi, lo]
        })
    }

    /// Fixed-format sense data (18 bytes).
    #[must_use]
    pub fn fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        if let Some(i) = self.info {
            s[0] |= 0x80; // VALID
            s[3..7].copy_from_slice(&(i.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(sks) = self.sks() {
            s[15..18].copy_from_slice(&sks);
        }
        s
    }

    /// Descriptor-format sense data.
    #[must_use]
    pub fn descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(i) = self.info {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&i.to_be_bytes());
        }
        if let Some(sks) = self.sks() {
            s.extend_from_slice(&[0x02, 0x06, 0, 0]);
            s.extend_from_slice(&sks);
            s.push(0);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    /// Either format.
    #[must_use]
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.descriptor()
        } else {
            self.fixed()
        }
    }

    /// Reads back key, ASC and ASCQ from sense data in either format.
    #[must_use]
    pub fn parse(data: &[u8]) -> Option<(u8, u8, u8)> {
        match data.first()? & 0x7f {
            0x70 | 0x71 if data.len() >= 14 => Some((data[2] & 0x0f, data[12], data[13])),
            0x72 | 0x73 if data.len() >= 4 => Some((data[1] & 0x0f, data[2], data[3])),
            _ => None,
        }
    }
}

/// Frequently used sense reports.
pub mod common {
    #![allow(missing_docs)]
    use super::{key::*, Sense};
    pub const NO_SENSE: Sense = Sense::new(super::key::NO_SENSE, 0, 0);
    pub const INVALID_OPCODE: Sense = Sense::new(ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAM_LIST: Sense = Sense::new(ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const SAVING_PARAMS_UNSUPPORTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x39, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(ILLEGAL_REQUEST, 0x53, 0x02);
    pub const INVALID_FIELD_IN_COMMAND_IU: Sense = Sense::new(ILLEGAL_REQUEST, 0x0e, 0x03);
    pub const POWER_ON_RESET: Sense = Sense::new(UNIT_ATTENTION, 0x29, 0x00);
    pub const MODE_PARAMS_CHANGED: Sense = Sense::new(UNIT_ATTENTION, 0x2a, 0x01);
    pub const WRITE_PROTECTED: Sense = Sense::new(DATA_PROTECT, 0x27, 0x00);
    pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(NOT_READY, 0x3a, 0x00);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(MEDIUM_ERROR, 0x0c, 0x00);
    pub const LOGICAL_UNIT_FAILURE: Sense = Sense::new(HARDWARE_ERROR, 0x3e, 0x01);
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(MISCOMPARE, 0x1d, 0x00);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_with_field_pointer() {
        let s = common::INVALID_FIELD_IN_CDB.cdb_field(2, Some(5)).fixed();
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x24, 0));
        assert_eq!(&s[15..18], &[0x80 | 0x40 | 0x08 | 5, 0, 2]);
        assert_eq!(Sense::parse(&s), Some((5, 0x24, 0)));
    }

    #[test]
    fn descriptor_with_info_and_field() {
        let s = common::MISCOMPARE_DURING_VERIFY.with_info(513).descriptor();
        assert_eq!((s[0], s[1], s[2], s[3]), (0x72, 0xe, 0x1d, 0));
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0, 0x0a, 0x80, 0]);
        assert_eq!(
            u64::from_be_bytes(s[12..20].try_into().expect("8 bytes")),
            513
        );
        assert_eq!(Sense::parse(&s), Some((0xe, 0x1d, 0)));
        let f = common::MISCOMPARE_DURING_VERIFY.with_info(513).fixed();
        assert_eq!(f[0], 0xf0);
        assert_eq!(&f[3..7], &513u32.to_be_bytes());
    }
}
