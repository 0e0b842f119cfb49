//! Task management: the function request and its response (RFC 7143 11.5-11.6).

use super::bhs::{imm, put32, put64, seq_trailer, Bhs};
use super::{Itt, Lun, BHS_LEN};
use crate::serial::{CmdSn, DataSn, StatSn};

/// Task management functions (RFC 7143 11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmfFunction {
    /// 1
    AbortTask,
    /// 2
    AbortTaskSet,
    /// 3
    ClearAca,
    /// 4
    ClearTaskSet,
    /// 5
    LogicalUnitReset,
    /// 6
    TargetWarmReset,
    /// 7
    TargetColdReset,
    /// 8
    TaskReassign,
    /// Any other value (answered "function not supported" / rejected).
    Other(u8),
}

impl TmfFunction {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::AbortTask,
            2 => Self::AbortTaskSet,
            3 => Self::ClearAca,
            4 => Self::ClearTaskSet,
            5 => Self::LogicalUnitReset,
            6 => Self::TargetWarmReset,
            7 => Self::TargetColdReset,
            8 => Self::TaskReassign,
            o => Self::Other(o),
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            Self::AbortTask => 1,
            Self::AbortTaskSet => 2,
            Self::ClearAca => 3,
            Self::ClearTaskSet => 4,
            Self::LogicalUnitReset => 5,
            Self::TargetWarmReset => 6,
            Self::TargetColdReset => 7,
            Self::TaskReassign => 8,
            Self::Other(o) => o,
        }
    }
}

/// Task Management Function Request (0x02).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    /// Immediate delivery bit.
    pub immediate: bool,
    /// The function.
    pub function: TmfFunction,
    /// LUN field.
    pub lun: Lun,
    /// ITT of this request.
    pub itt: Itt,
    /// Referenced Task Tag (ABORT TASK).
    pub rtt: Itt,
    /// CmdSN.
    pub cmd_sn: CmdSn,
    /// ExpStatSN.
    pub exp_stat_sn: StatSn,
    /// RefCmdSN (ABORT TASK).
    pub ref_cmd_sn: CmdSn,
    /// ExpDataSN.
    pub exp_data_sn: DataSn,
}

/// Task Management Function Response (0x22).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// Response code (0 complete, 1 task does not exist, 2 LUN does not exist, 3 task
    /// still allegiant, 4 reassignment not supported, 5 function not supported, 6 function
    /// authorization failed, 255 rejected).
    pub response: u8,
    /// ITT.
    pub itt: Itt,
    /// StatSN.
    pub stat_sn: StatSn,
    /// ExpCmdSN.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN.
    pub max_cmd_sn: CmdSn,
}

impl TaskMgmtRequest {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        TaskMgmtRequest {
            immediate: h.immediate(),
            function: TmfFunction::from_u8(h.u8(1) & 0x7f),
            lun: h.lun(),
            itt: h.itt(),
            rtt: Itt(h.u32(20)),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            ref_cmd_sn: CmdSn(h.u32(32)),
            exp_data_sn: DataSn(h.u32(36)),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[0] = imm(p.immediate);
        b[1] = 0x80 | (p.function.to_u8() & 0x7f);
        put64(b, 8, p.lun.0);
        put32(b, 16, p.itt.0);
        put32(b, 20, p.rtt.0);
        put32(b, 24, p.cmd_sn.0);
        put32(b, 28, p.exp_stat_sn.0);
        put32(b, 32, p.ref_cmd_sn.0);
        put32(b, 36, p.exp_data_sn.0);
    }
}

impl TaskMgmtResponse {
    pub(super) fn from_bhs(h: &Bhs<'_>) -> Self {
        TaskMgmtResponse {
            response: h.u8(2),
            itt: h.itt(),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
        }
    }

    pub(super) fn put_bhs(&self, b: &mut [u8; BHS_LEN]) {
        let p = self;
        b[1] = 0x80;
        b[2] = p.response;
        put32(b, 16, p.itt.0);
        seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
    }
}
