//! The SCSI PDUs: Command, Response, Data-Out, Data-In and R2T (RFC 7143 11.3-11.4,
//! 11.7-11.8).

use bytes::{BufMut, Bytes, BytesMut};

use super::bhs::{imm, put32, put64, seq_trailer, Bhs};
use super::{Ahs, DecodeError, Itt, Lun, Ttt, BHS_LEN};
use crate::digest;
use crate::serial::{CmdSn, DataSn, R2tSn, StatSn};

/// SCSI Command (0x01).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommand {
    /// Immediate delivery bit.
    pub immediate: bool,
    /// F: no unsolicited Data-Out PDUs follow.
    pub final_: bool,
    /// R: data-in expected.
    pub read: bool,
    /// W: data-out expected.
    pub write: bool,
    /// Task attribute (0 untagged/simple, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// Expected Data Transfer Length.
    pub edtl: u32,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// The whole CDB: 16 bytes from the BHS plus any Extended CDB AHS.
    pub cdb: Bytes,
    /// Expected bidirectional read length from the AHS, if present.
    pub bidi_read_length: Option<u32>,
    /// Immediate data.
    pub data: Bytes,
}

/// Residual flags and count shared by SCSI Response and Data-In.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Residual {
    /// O: overflow.
    pub overflow: bool,
    /// U: underflow.
    pub underflow: bool,
    /// Residual count.
    pub count: u32,
}

impl Residual {
    /// Residual of a transfer of `actual` bytes against an expected `expected`.
    #[must_use]
    pub fn of(expected: u32, actual: u32) -> Self {
        use core::cmp::Ordering;
        match actual.cmp(&expected) {
            Ordering::Equal => Residual::default(),
            Ordering::Less => Residual {
                overflow: false,
                underflow: true,
                count: expected - actual,
            },
            Ordering::Greater => Residual {
                overflow: true,
                underflow: false,
                count: actual - expected,
            },
        }
    }
    fn bits(self) -> u8 {
        (if self.overflow { 0x04 } else { 0 }) | (if self.underflow { 0x02 } else { 0 })
    }
}

/// SCSI Response (0x21).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    /// Bidirectional read residual (o/u bits and count).
    pub bidi_residual: Residual,
    /// Residual.
    pub residual: Residual,
    /// iSCSI response code (0 command completed at target, 1 target failure).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// ITT.
    pub itt: Itt,
    /// SNACK tag.
    pub snack_tag: u32,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// ExpDataSN: number of Data-In PDUs sent for the task.
    pub exp_data_sn: DataSn,
    /// Sense data (without the 2-byte SenseLength prefix; encode adds it).
    pub sense: Bytes,
}

/// SCSI Data-Out (0x05).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOut {
    /// F: last PDU of the sequence.
    pub final_: bool,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT (0xffffffff for unsolicited data).
    pub ttt: Ttt,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// DataSN.
    pub data_sn: DataSn,
    /// Buffer offset.
    pub buffer_offset: u32,
    /// Data.
    pub data: Bytes,
}

/// SCSI Data-In (0x25).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataIn {
    /// F: last PDU of the sequence.
    pub final_: bool,
    /// A: acknowledge requested.
    pub ack: bool,
    /// Residual (valid with `status`).
    pub residual: Residual,
    /// Phase-collapsed status: present when S is set (requires F).
    pub status: Option<u8>,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT.
    pub ttt: Ttt,
    /// StatSN (valid with `status`).
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// DataSN.
    pub data_sn: DataSn,
    /// Buffer offset.
    pub buffer_offset: u32,
    /// Data.
    pub data: Bytes,
}

/// Ready To Transfer (0x31).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct R2t {
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT the Data-Out PDUs must carry.
    pub ttt: Ttt,
    /// StatSN (next StatSN, not advanced).
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// R2TSN.
    pub r2t_sn: R2tSn,
    /// Buffer offset.
    pub buffer_offset: u32,
    /// Desired Data Transfer Length.
    pub desired_len: u32,
}

impl ScsiCommand {
    pub(super) fn from_bhs(h: &Bhs<'_>, ahs: &[Ahs], data: Bytes) -> Self {
        let mut cdb = BytesMut::from(&h.0[32..48]);
        let mut bidi_read_length = None;
        for a in ahs {
            match a {
                Ahs::ExtendedCdb(ext) => cdb.extend_from_slice(ext),
                Ahs::BidiReadLength(l) => bidi_read_length = Some(*l),
                Ahs::Other { .. } => {}
            }
        }
        ScsiCommand {
            immediate: h.immediate(),
            final_: h.final_(),
            read: h.flag(1, 0x40),
            write: h.flag(1, 0x20),
            attr: h.u8(1) & 0x07,
            lun: h.lun(),
            itt: h.itt(),
            edtl: h.u32(20),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            cdb: cdb.freeze(),
            bidi_read_length,
            data,
        }
    }

    /// The BHS, and the CDB beyond 16 bytes and the bidirectional read length as AHS.
    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN], ahs: &mut BytesMut) {
        let p = self;
        b[0] = imm(p.immediate);
        b[1] = (if p.final_ { 0x80 } else { 0 })
            | (if p.read { 0x40 } else { 0 })
            | (if p.write { 0x20 } else { 0 })
            | (p.attr & 7);
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.edtl);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
        let n = p.cdb.len().min(16);
        b[32..32 + n].copy_from_slice(&p.cdb[..n]);
        if p.cdb.len() > 16 {
            let ext = &p.cdb[16..];
            let len = (ext.len() + 1) as u16;
            ahs.put_u16(len);
            ahs.put_u8(1);
            ahs.put_u8(0);
            ahs.put_slice(ext);
            ahs.put_bytes(0, digest::pad_len(ext.len()));
        }
        if let Some(l) = p.bidi_read_length {
            ahs.put_u16(5);
            ahs.put_u8(2);
            ahs.put_u8(0);
            ahs.put_u32(l);
        }
    }
}

impl ScsiResponse {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Result<Self, DecodeError> {
        let fl = h.u8(1);
        // The data segment of a SCSI Response is SenseLength + sense (+ response data).
        let sense = if data.len() >= 2 {
            let sl = usize::from(u16::from_be_bytes([data[0], data[1]]));
            if 2 + sl > data.len() {
                return Err(DecodeError::InvalidField("SenseLength beyond data segment"));
            }
            data.slice(2..2 + sl)
        } else {
            Bytes::new()
        };
        Ok(ScsiResponse {
            bidi_residual: Residual {
                overflow: fl & 0x10 != 0,
                underflow: fl & 0x08 != 0,
                count: h.u32(40),
            },
            residual: Residual {
                overflow: fl & 0x04 != 0,
                underflow: fl & 0x02 != 0,
                count: h.u32(44),
            },
            response: h.u8(2),
            status: h.u8(3),
            itt: h.itt(),
            snack_tag: h.u32(20),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            exp_data_sn: DataSn(h.u32(36)),
            sense,
        })
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80
            | (if p.bidi_residual.overflow { 0x10 } else { 0 })
            | (if p.bidi_residual.underflow { 0x08 } else { 0 })
            | p.residual.bits();
        b[2] = p.response;
        b[3] = p.status;
        put32(b, 16, p.itt.0);
        put32(b, 20, p.snack_tag);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        put32(b, 36, p.exp_data_sn.0);
        put32(b, 40, p.bidi_residual.count);
        put32(b, 44, p.residual.count);
    }
}

impl DataOut {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        DataOut {
            final_: h.final_(),
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            exp_stat_sn: StatSn(h.u32(28)),
            data_sn: DataSn(h.u32(36)),
            buffer_offset: h.u32(40),
            data,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = if p.final_ { 0x80 } else { 0 };
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        put32(b, 28, p.exp_stat_sn.0);
        put32(b, 36, p.data_sn.0);
        put32(b, 40, p.buffer_offset);
    }
}

impl DataIn {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        let fl = h.u8(1);
        let s = fl & 0x01 != 0;
        DataIn {
            final_: h.final_(),
            ack: fl & 0x40 != 0,
            // Residual and StatSN are only defined when S carries status.
            residual: if s {
                Residual {
                    overflow: fl & 0x04 != 0,
                    underflow: fl & 0x02 != 0,
                    count: h.u32(44),
                }
            } else {
                Residual::default()
            },
            status: s.then(|| h.u8(3)),
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(if s { h.u32(24) } else { 0 }),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data_sn: DataSn(h.u32(36)),
            buffer_offset: h.u32(40),
            data,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        let s = p.status.is_some();
        b[1] = (if p.final_ { 0x80 } else { 0 })
            | (if p.ack { 0x40 } else { 0 })
            | (if s { p.residual.bits() | 0x01 } else { 0 });
        b[3] = p.status.unwrap_or(0);
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        // StatSN is only meaningful with status; the RFC says reserved otherwise.
        put32(b, 24, if s { p.stat_sn.0 } else { 0 });
        put32(b, 28, p.exp_cmd_sn.0);
        put32(b, 32, p.max_cmd_sn.0);
        put32(b, 36, p.data_sn.0);
        put32(b, 40, p.buffer_offset);
        put32(b, 44, if s { p.residual.count } else { 0 });
    }
}

impl R2t {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        R2t {
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            r2t_sn: R2tSn(h.u32(36)),
            buffer_offset: h.u32(40),
            desired_len: h.u32(44),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80;
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        put32(b, 36, p.r2t_sn.0);
        put32(b, 40, p.buffer_offset);
        put32(b, 44, p.desired_len);
    }
}
