//! Login and Text requests and responses (RFC 7143 11.10-11.13): text keys in the data
//! segment, and for the login the stages and session identifiers.

use bytes::Bytes;

use super::bhs::{imm, put16, put32, put64, seq_trailer, Bhs};
use super::{DecodeError, Itt, Lun, Ttt, BHS_LEN};
use crate::serial::{CmdSn, StatSn};

/// Login stages (CSG / NSG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Security negotiation (0).
    Security,
    /// Login operational negotiation (1).
    Operational,
    /// Full feature phase (3).
    FullFeature,
}

impl Stage {
    fn from_bits(b: u8) -> Result<Self, DecodeError> {
        match b & 3 {
            0 => Ok(Stage::Security),
            1 => Ok(Stage::Operational),
            3 => Ok(Stage::FullFeature),
            _ => Err(DecodeError::InvalidField("login stage 2 is reserved")),
        }
    }
    fn bits(self) -> u8 {
        match self {
            Stage::Security => 0,
            Stage::Operational => 1,
            Stage::FullFeature => 3,
        }
    }
}

/// Login Request (0x03).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRequest {
    /// T: transit to `nsg`.
    pub transit: bool,
    /// C: text continues in the next PDU.
    pub continue_: bool,
    /// Current stage.
    pub csg: Stage,
    /// Next stage (meaningful when `transit`).
    pub nsg: Stage,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Initiator session ID.
    pub isid: [u8; 6],
    /// Target session identifying handle (0 for a new session).
    pub tsih: u16,
    /// ITT.
    pub itt: Itt,
    /// Connection ID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// Text keys.
    pub data: Bytes,
}

/// Login Response (0x23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    /// T bit.
    pub transit: bool,
    /// C bit.
    pub continue_: bool,
    /// Current stage.
    pub csg: Stage,
    /// Next stage.
    pub nsg: Stage,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// ISID.
    pub isid: [u8; 6],
    /// TSIH.
    pub tsih: u16,
    /// ITT.
    pub itt: Itt,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// Status-Class.
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
    /// Text keys.
    pub data: Bytes,
}

/// Text Request (0x04).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRequest {
    /// Immediate delivery bit.
    pub immediate: bool,
    /// F bit.
    pub final_: bool,
    /// C bit.
    pub continue_: bool,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT (0xffffffff for a new negotiation).
    pub ttt: Ttt,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// Text keys.
    pub data: Bytes,
}

/// Text Response (0x24).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    /// F bit.
    pub final_: bool,
    /// C bit.
    pub continue_: bool,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT (0xffffffff when the negotiation is complete).
    pub ttt: Ttt,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// Text keys.
    pub data: Bytes,
}

impl LoginRequest {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Result<Self, DecodeError> {
        let flags = h.u8(1);
        Ok(LoginRequest {
            transit: flags & 0x80 != 0,
            continue_: flags & 0x40 != 0,
            csg: Stage::from_bits((flags >> 2) & 3)?,
            nsg: if flags & 0x80 != 0 {
                Stage::from_bits(flags & 3)?
            } else {
                Stage::from_bits((flags >> 2) & 3)?
            },
            version_max: h.u8(2),
            version_min: h.u8(3),
            isid: h.isid(),
            tsih: h.u16(14),
            itt: h.itt(),
            cid: h.u16(20),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            data,
        })
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[0] = 0x40;
        b[1] = (if p.transit { 0x80 } else { 0 })
            | (if p.continue_ { 0x40 } else { 0 })
            | (p.csg.bits() << 2)
            | if p.transit { p.nsg.bits() } else { 0 };
        b[2] = p.version_max;
        b[3] = p.version_min;
        b[8..14].copy_from_slice(&p.isid);
        put16(b, 14, p.tsih);
        put32(b, 16, p.itt.0);
        put16(b, 20, p.cid);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
    }
}

impl LoginResponse {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Result<Self, DecodeError> {
        let flags = h.u8(1);
        Ok(LoginResponse {
            transit: flags & 0x80 != 0,
            continue_: flags & 0x40 != 0,
            csg: Stage::from_bits((flags >> 2) & 3)?,
            nsg: Stage::from_bits(if flags & 0x80 != 0 {
                flags & 3
            } else {
                (flags >> 2) & 3
            })?,
            version_max: h.u8(2),
            version_active: h.u8(3),
            isid: h.isid(),
            tsih: h.u16(14),
            itt: h.itt(),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            status_class: h.u8(36),
            status_detail: h.u8(37),
            data,
        })
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = (if p.transit { 0x80 } else { 0 })
            | (if p.continue_ { 0x40 } else { 0 })
            | (p.csg.bits() << 2)
            | if p.transit { p.nsg.bits() } else { 0 };
        b[2] = p.version_max;
        b[3] = p.version_active;
        b[8..14].copy_from_slice(&p.isid);
        put16(b, 14, p.tsih);
        put32(b, 16, p.itt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        b[36] = p.status_class;
        b[37] = p.status_detail;
    }
}

impl TextRequest {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        TextRequest {
            immediate: h.immediate(),
            final_: h.final_(),
            continue_: h.flag(1, 0x40),
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            data,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[0] = imm(p.immediate);
        b[1] = (if p.final_ { 0x80 } else { 0 }) | (if p.continue_ { 0x40 } else { 0 });
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
    }
}

impl TextResponse {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        TextResponse {
            final_: h.final_(),
            continue_: h.flag(1, 0x40),
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = (if p.final_ { 0x80 } else { 0 }) | (if p.continue_ { 0x40 } else { 0 });
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
    }
}
