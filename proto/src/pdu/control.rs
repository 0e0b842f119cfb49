//! The session-keeping PDUs: NOP-Out/NOP-In pings, Logout, SNACK, Asynchronous Message
//! and Reject (RFC 7143 11.9, 11.14-11.19).

use bytes::Bytes;

use super::bhs::{imm, put16, put32, put64, seq_trailer, Bhs};
use super::{Itt, Lun, Ttt, BHS_LEN, RESERVED_TAG};
use crate::serial::{CmdSn, DataSn, StatSn};

/// NOP-Out (0x00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOut {
    /// Immediate delivery bit.
    pub immediate: bool,
    /// LUN field.
    pub lun: Lun,
    /// ITT; 0xffffffff when this answers a NOP-In and wants no reply.
    pub itt: Itt,
    /// TTT of the NOP-In this answers, else 0xffffffff.
    pub ttt: Ttt,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// Ping data.
    pub data: Bytes,
}

/// NOP-In (0x20).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopIn {
    /// LUN field.
    pub lun: Lun,
    /// ITT (0xffffffff for a target-initiated ping).
    pub itt: Itt,
    /// TTT (0xffffffff when no answer is wanted).
    pub ttt: Ttt,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// Ping data.
    pub data: Bytes,
}

/// Logout Request (0x06).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutRequest {
    /// Immediate delivery bit.
    pub immediate: bool,
    /// Reason code (0 close session, 1 close connection, 2 remove connection for recovery).
    pub reason: u8,
    /// ITT.
    pub itt: Itt,
    /// CID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
}

/// Logout Response (0x26).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutResponse {
    /// Response (0 ok, 1 CID not found, 2 recovery not supported, 3 cleanup failed).
    pub response: u8,
    /// ITT.
    pub itt: Itt,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

/// SNACK Request (0x10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnackRequest {
    /// SNACK type (0 data/R2T, 1 status, 2 DataACK, 3 R-Data).
    pub snack_type: u8,
    /// LUN field.
    pub lun: Lun,
    /// ITT.
    pub itt: Itt,
    /// TTT.
    pub ttt: Ttt,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// BegRun.
    pub beg_run: u32,
    /// RunLength.
    pub run_length: u32,
}

/// Asynchronous Message (0x32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsyncMessage {
    /// LUN field.
    pub lun: Lun,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// AsyncEvent.
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1..3.
    pub params: [u16; 3],
    /// Sense data / iSCSI event data.
    pub data: Bytes,
}

/// Reject (0x3f).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Reason code.
    pub reason: u8,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
    /// DataSN/R2TSN.
    pub data_sn: DataSn,
    /// The rejected PDU's header (BHS).
    pub header: Bytes,
}

impl NopOut {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        NopOut {
            immediate: h.immediate(),
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
        b[1] = 0x80;
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
    }
}

impl NopIn {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        NopIn {
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
        b[1] = 0x80;
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
    }
}

impl LogoutRequest {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        LogoutRequest {
            immediate: h.immediate(),
            reason: h.u8(1) & 0x7f,
            itt: h.itt(),
            cid: h.u16(20),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[0] = imm(p.immediate);
        b[1] = 0x80 | (p.reason & 0x7f);
        put32(b, 16, p.itt.0);
        put16(b, 20, p.cid);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
    }
}

impl LogoutResponse {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        LogoutResponse {
            response: h.u8(2),
            itt: h.itt(),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            time2wait: h.u16(40),
            time2retain: h.u16(42),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80;
        b[2] = p.response;
        put32(b, 16, p.itt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        put16(b, 40, p.time2wait);
        put16(b, 42, p.time2retain);
    }
}

impl SnackRequest {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        SnackRequest {
            snack_type: h.u8(1) & 0x0f,
            lun: h.lun(),
            itt: h.itt(),
            ttt: Ttt(h.u32(20)),
            exp_stat_sn: StatSn(h.u32(28)),
            beg_run: h.u32(40),
            run_length: h.u32(44),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80 | (p.snack_type & 0x0f);
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.ttt.0);
        put32(b, 28, p.exp_stat_sn.0);
        put32(b, 40, p.beg_run);
        put32(b, 44, p.run_length);
    }
}

impl AsyncMessage {
    pub(super) fn from_bhs(h: &Bhs<'_>, data: Bytes) -> Self {
        AsyncMessage {
            lun: h.lun(),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            event: h.u8(36),
            vcode: h.u8(37),
            params: [h.u16(38), h.u16(40), h.u16(42)],
            data,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80;
        put64(b, 8, p.lun.0);
        put32(b, 16, RESERVED_TAG);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        b[36] = p.event;
        b[37] = p.vcode;
        put16(b, 38, p.params[0]);
        put16(b, 40, p.params[1]);
        put16(b, 42, p.params[2]);
    }
}

impl Reject {
    pub(super) fn from_bhs(h: &Bhs<'_>, header: Bytes) -> Self {
        Reject {
            reason: h.u8(2),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data_sn: DataSn(h.u32(36)),
            header,
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80;
        b[2] = p.reason;
        put32(b, 16, RESERVED_TAG);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        put32(b, 36, p.data_sn.0);
    }
}
