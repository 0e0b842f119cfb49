//! iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, Additional Header
//! Segments, header and data digests, and the data segment.
//!
//! A connection reader uses [`Framing::frame_len`] on the first 48 bytes to learn how many
//! bytes the whole PDU occupies (after checking the lengths against its limits), then
//! [`Pdu::decode`] on the complete frame. [`Pdu::encode`] writes a frame with digests as
//! negotiated.

use bytes::{BufMut, Bytes, BytesMut};
use nom::number::complete::{be_u16, be_u32, be_u8};

use crate::digest;
use crate::serial::{CmdSn, DataSn, R2tSn, StatSn};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The reserved ITT / TTT value 0xffffffff.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Upper bound on MaxRecvDataSegmentLength the protocol allows (2^24 - 1).
pub const DATA_SEGMENT_LEN_MAX: u32 = (1 << 24) - 1;

/// Initiator Task Tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Itt(pub u32);

/// Target Transfer Tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ttt(pub u32);

/// A logical unit number as the 8-byte SAM LUN field carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub u64);

impl Lun {
    /// The LUN field for LUN number `n`: peripheral device addressing below 256, flat
    /// space addressing up to 16383 (SAM-5 4.7).
    #[must_use]
    pub fn from_number(n: u16) -> Self {
        let n = n & 0x3fff;
        let first_level: u16 = if n < 256 { n } else { 0x4000 | n };
        Lun(u64::from(first_level) << 48)
    }

    /// The LUN number, or `None` for an addressing method this target does not serve
    /// (a LUN that then does not exist).
    #[must_use]
    pub fn number(self) -> Option<u64> {
        let b = self.0.to_be_bytes();
        if b[2..].iter().any(|&x| x != 0) {
            return None;
        }
        match b[0] >> 6 {
            0b00 if b[0] & 0x3f == 0 => Some(u64::from(b[1])),
            0b01 => Some((u64::from(b[0] & 0x3f) << 8) | u64::from(b[1])),
            _ => None,
        }
    }
}

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

/// Reasons a frame could not be decoded; each maps to the answer RFC 7143 requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the frame needs; the count is the total frame length if known.
    #[error("incomplete PDU: need {0} bytes")]
    Incomplete(usize),
    /// Header digest mismatch: the lengths cannot be trusted, so the connection must close.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch: the PDU is rejected (reason 0x02) and its data discarded.
    #[error("data digest mismatch")]
    DataDigest,
    /// An opcode this role never receives.
    #[error("unsupported opcode {0:#04x}")]
    UnsupportedOpcode(u8),
    /// DataSegmentLength above what we declared we can receive.
    #[error("data segment of {len} bytes exceeds our limit of {max}")]
    DataSegmentTooLong {
        /// Length in the header.
        len: u32,
        /// Our MaxRecvDataSegmentLength.
        max: u32,
    },
    /// A field has a value the RFC forbids.
    #[error("invalid PDU field: {0}")]
    InvalidField(&'static str),
}

impl DecodeError {
    /// The Reject reason code for this error (RFC 7143 11.17.1), or `None` when the
    /// connection must be closed instead.
    #[must_use]
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            DecodeError::Incomplete(_) | DecodeError::HeaderDigest => None,
            DecodeError::DataSegmentTooLong { .. } => Some(RejectReason::ProtocolError),
            DecodeError::DataDigest => Some(RejectReason::DataDigestError),
            DecodeError::UnsupportedOpcode(_) => Some(RejectReason::CommandNotSupported),
            DecodeError::InvalidField(_) => Some(RejectReason::InvalidPduField),
        }
    }
}

/// Reject reason codes (RFC 7143 11.17.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    /// 0x02
    DataDigestError = 0x02,
    /// 0x03
    SnackReject = 0x03,
    /// 0x04
    ProtocolError = 0x04,
    /// 0x05
    CommandNotSupported = 0x05,
    /// 0x06
    ImmediateCommandReject = 0x06,
    /// 0x07
    TaskInProgress = 0x07,
    /// 0x08
    InvalidDataAck = 0x08,
    /// 0x09
    InvalidPduField = 0x09,
    /// 0x0a
    OutOfResources = 0x0a,
    /// 0x0c
    WaitingForLogout = 0x0c,
}

/// Digest settings and receive limit for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// CRC32C header digest in use.
    pub header_digest: bool,
    /// CRC32C data digest in use.
    pub data_digest: bool,
    /// Largest data segment we accept (our declared MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
}

impl Default for Framing {
    /// Login-phase framing: no digests, 8 KiB segments (RFC 7143 default).
    fn default() -> Self {
        Framing {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
        }
    }
}

impl Framing {
    /// Total bytes of the frame whose BHS starts `bhs`, after checking its lengths against
    /// our limits. Needs at least [`BHS_LEN`] bytes.
    pub fn frame_len(&self, bhs: &[u8]) -> Result<usize, DecodeError> {
        if bhs.len() < BHS_LEN {
            return Err(DecodeError::Incomplete(BHS_LEN));
        }
        let ahs_len = usize::from(bhs[4]) * 4;
        let dsl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
        if dsl > self.max_recv_data_segment {
            return Err(DecodeError::DataSegmentTooLong {
                len: dsl,
                max: self.max_recv_data_segment,
            });
        }
        let dsl = dsl as usize;
        let mut len = BHS_LEN + ahs_len;
        if self.header_digest {
            len += 4;
        }
        if dsl > 0 {
            len += dsl + digest::pad_len(dsl);
            if self.data_digest {
                len += 4;
            }
        }
        Ok(len)
    }
}

/// An Additional Header Segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ahs {
    /// Extended CDB: CDB bytes beyond the first 16 (type 1).
    ExtendedCdb(Bytes),
    /// Expected bidirectional read data length (type 2).
    BidiReadLength(u32),
    /// Any other type, kept verbatim.
    Other {
        /// AHSType.
        ahs_type: u8,
        /// AHS-specific bytes.
        data: Bytes,
    },
}

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

/// Any iSCSI PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Pdu {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// Opcode values.
pub mod opcode {
    #![allow(missing_docs)]
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Field reader over a complete BHS; the caller has checked the length, so the nom
/// parsers cannot run short, but they still return errors rather than panic.
struct Bhs<'a>(&'a [u8]);

type NomErr<'a> = nom::Err<nom::error::Error<&'a [u8]>>;

impl<'a> Bhs<'a> {
    fn at(&self, off: usize) -> &'a [u8] {
        self.0.get(off..).unwrap_or(&[])
    }
    fn u8(&self, off: usize) -> u8 {
        be_u8::<_, nom::error::Error<&[u8]>>(self.at(off)).map_or(0, |(_, v)| v)
    }
    fn u16(&self, off: usize) -> u16 {
        be_u16::<_, nom::error::Error<&[u8]>>(self.at(off)).map_or(0, |(_, v)| v)
    }
    fn u32(&self, off: usize) -> u32 {
        let r: Result<(&[u8], u32), NomErr<'_>> = be_u32(self.at(off));
        r.map_or(0, |(_, v)| v)
    }
    fn u64(&self, off: usize) -> u64 {
        (u64::from(self.u32(off)) << 32) | u64::from(self.u32(off + 4))
    }
    fn flag(&self, off: usize, mask: u8) -> bool {
        self.u8(off) & mask != 0
    }
    fn isid(&self) -> [u8; 6] {
        let mut v = [0u8; 6];
        v.copy_from_slice(&self.0[8..14]);
        v
    }
}

impl Pdu {
    /// Decodes one complete frame from the start of `buf` under `framing`. Returns the PDU
    /// and the number of bytes it occupied.
    pub fn decode(buf: &[u8], framing: &Framing) -> Result<(Pdu, usize), DecodeError> {
        let total = framing.frame_len(buf)?;
        if buf.len() < total {
            return Err(DecodeError::Incomplete(total));
        }
        let ahs_len = usize::from(buf[4]) * 4;
        let dsl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        let mut pos = BHS_LEN + ahs_len;
        if framing.header_digest {
            let want = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]);
            if digest::crc32c(&buf[..pos]) != want {
                return Err(DecodeError::HeaderDigest);
            }
            pos += 4;
        }
        let data_start = pos;
        let data = &buf[data_start..data_start + dsl];
        if dsl > 0 && framing.data_digest {
            let padded = dsl + digest::pad_len(dsl);
            let d = data_start + padded;
            let want = u32::from_le_bytes([buf[d], buf[d + 1], buf[d + 2], buf[d + 3]]);
            if digest::crc32c(&buf[data_start..data_start + padded]) != want {
                return Err(DecodeError::DataDigest);
            }
        }
        let ahs = parse_ahs(&buf[BHS_LEN..BHS_LEN + ahs_len])?;
        let pdu = decode_bhs(&buf[..BHS_LEN], &ahs, Bytes::copy_from_slice(data))?;
        Ok((pdu, total))
    }

    /// The opcode byte value (without the I bit).
    #[must_use]
    pub fn opcode(&self) -> u8 {
        use opcode::*;
        match self {
            Pdu::NopOut(_) => NOP_OUT,
            Pdu::ScsiCommand(_) => SCSI_COMMAND,
            Pdu::TaskMgmtRequest(_) => TASK_MGMT_REQUEST,
            Pdu::LoginRequest(_) => LOGIN_REQUEST,
            Pdu::TextRequest(_) => TEXT_REQUEST,
            Pdu::DataOut(_) => DATA_OUT,
            Pdu::LogoutRequest(_) => LOGOUT_REQUEST,
            Pdu::SnackRequest(_) => SNACK_REQUEST,
            Pdu::NopIn(_) => NOP_IN,
            Pdu::ScsiResponse(_) => SCSI_RESPONSE,
            Pdu::TaskMgmtResponse(_) => TASK_MGMT_RESPONSE,
            Pdu::LoginResponse(_) => LOGIN_RESPONSE,
            Pdu::TextResponse(_) => TEXT_RESPONSE,
            Pdu::DataIn(_) => DATA_IN,
            Pdu::LogoutResponse(_) => LOGOUT_RESPONSE,
            Pdu::R2t(_) => R2T,
            Pdu::AsyncMessage(_) => ASYNC_MESSAGE,
            Pdu::Reject(_) => REJECT,
        }
    }

    /// The data segment.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        match self {
            Pdu::NopOut(p) => &p.data,
            Pdu::ScsiCommand(p) => &p.data,
            Pdu::LoginRequest(p) => &p.data,
            Pdu::TextRequest(p) => &p.data,
            Pdu::DataOut(p) => &p.data,
            Pdu::NopIn(p) => &p.data,
            Pdu::LoginResponse(p) => &p.data,
            Pdu::TextResponse(p) => &p.data,
            Pdu::DataIn(p) => &p.data,
            Pdu::AsyncMessage(p) => &p.data,
            Pdu::Reject(p) => &p.header,
            Pdu::ScsiResponse(p) => &p.sense,
            Pdu::TaskMgmtRequest(_)
            | Pdu::LogoutRequest(_)
            | Pdu::SnackRequest(_)
            | Pdu::TaskMgmtResponse(_)
            | Pdu::LogoutResponse(_)
            | Pdu::R2t(_) => &[],
        }
    }

    /// Encodes the PDU as one frame (BHS, AHS, digests, data, padding) onto `out`.
    pub fn encode(&self, out: &mut BytesMut, framing: &Framing) {
        let start = out.len();
        let mut bhs = [0u8; BHS_LEN];
        let mut ahs = BytesMut::new();
        let scsi_sense;
        let data: &[u8] = match self {
            Pdu::ScsiResponse(p) if !p.sense.is_empty() => {
                let mut v = Vec::with_capacity(p.sense.len() + 2);
                v.extend_from_slice(
                    &u16::try_from(p.sense.len())
                        .unwrap_or(u16::MAX)
                        .to_be_bytes(),
                );
                v.extend_from_slice(&p.sense[..p.sense.len().min(usize::from(u16::MAX))]);
                scsi_sense = v;
                &scsi_sense
            }
            other => other.data(),
        };
        encode_bhs(self, &mut bhs, &mut ahs);
        bhs[0] |= self.opcode();
        debug_assert!(ahs.len().is_multiple_of(4) && ahs.len() / 4 <= 255);
        bhs[4] = (ahs.len() / 4) as u8;
        let dsl = data.len().min(DATA_SEGMENT_LEN_MAX as usize) as u32;
        bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        out.reserve(BHS_LEN + ahs.len() + 8 + data.len() + 3);
        out.put_slice(&bhs);
        out.put_slice(&ahs);
        if framing.header_digest {
            let c = digest::crc32c(&out[start..]);
            out.put_u32_le(c);
        }
        if !data.is_empty() {
            let data = &data[..dsl as usize];
            let pad = digest::pad_len(data.len());
            out.put_slice(data);
            out.put_bytes(0, pad);
            if framing.data_digest {
                out.put_u32_le(digest::data_digest(data));
            }
        }
    }
}

fn parse_ahs(mut buf: &[u8]) -> Result<Vec<Ahs>, DecodeError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err(DecodeError::InvalidField("truncated AHS"));
        }
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        let ahs_type = buf[2];
        // AHSLength counts the bytes after the reserved byte; the segment pads to 4.
        let body_end = 3 + len;
        let padded = body_end + digest::pad_len(body_end);
        if len == 0 || padded > buf.len() {
            return Err(DecodeError::InvalidField("AHS length"));
        }
        let body = &buf[4..body_end.max(4)];
        out.push(match ahs_type {
            1 => Ahs::ExtendedCdb(Bytes::copy_from_slice(body)),
            2 if body.len() >= 4 => {
                Ahs::BidiReadLength(u32::from_be_bytes([body[0], body[1], body[2], body[3]]))
            }
            _ => Ahs::Other {
                ahs_type,
                data: Bytes::copy_from_slice(body),
            },
        });
        buf = &buf[padded..];
    }
    Ok(out)
}

fn decode_bhs(b: &[u8], ahs: &[Ahs], data: Bytes) -> Result<Pdu, DecodeError> {
    let h = Bhs(b);
    let immediate = h.flag(0, 0x40);
    let op = h.u8(0) & 0x3f;
    let f = h.flag(1, 0x80);
    let lun = Lun(h.u64(8));
    let itt = Itt(h.u32(16));
    use opcode::*;
    Ok(match op {
        NOP_OUT => Pdu::NopOut(NopOut {
            immediate,
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            data,
        }),
        SCSI_COMMAND => {
            let mut cdb = BytesMut::from(&b[32..48]);
            let mut bidi_read_length = None;
            for a in ahs {
                match a {
                    Ahs::ExtendedCdb(ext) => cdb.extend_from_slice(ext),
                    Ahs::BidiReadLength(l) => bidi_read_length = Some(*l),
                    Ahs::Other { .. } => {}
                }
            }
            Pdu::ScsiCommand(ScsiCommand {
                immediate,
                final_: f,
                read: h.flag(1, 0x40),
                write: h.flag(1, 0x20),
                attr: h.u8(1) & 0x07,
                lun,
                itt,
                edtl: h.u32(20),
                cmd_sn: CmdSn(h.u32(24)),
                exp_stat_sn: StatSn(h.u32(28)),
                cdb: cdb.freeze(),
                bidi_read_length,
                data,
            })
        }
        TASK_MGMT_REQUEST => Pdu::TaskMgmtRequest(TaskMgmtRequest {
            immediate,
            function: TmfFunction::from_u8(h.u8(1) & 0x7f),
            lun,
            itt,
            rtt: Itt(h.u32(20)),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            ref_cmd_sn: CmdSn(h.u32(32)),
            exp_data_sn: DataSn(h.u32(36)),
        }),
        LOGIN_REQUEST => {
            let flags = h.u8(1);
            Pdu::LoginRequest(LoginRequest {
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
                itt,
                cid: h.u16(20),
                cmd_sn: CmdSn(h.u32(24)),
                exp_stat_sn: StatSn(h.u32(28)),
                data,
            })
        }
        TEXT_REQUEST => Pdu::TextRequest(TextRequest {
            immediate,
            final_: f,
            continue_: h.flag(1, 0x40),
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
            data,
        }),
        DATA_OUT => Pdu::DataOut(DataOut {
            final_: f,
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            exp_stat_sn: StatSn(h.u32(28)),
            data_sn: DataSn(h.u32(36)),
            buffer_offset: h.u32(40),
            data,
        }),
        LOGOUT_REQUEST => Pdu::LogoutRequest(LogoutRequest {
            immediate,
            reason: h.u8(1) & 0x7f,
            itt,
            cid: h.u16(20),
            cmd_sn: CmdSn(h.u32(24)),
            exp_stat_sn: StatSn(h.u32(28)),
        }),
        SNACK_REQUEST => Pdu::SnackRequest(SnackRequest {
            snack_type: h.u8(1) & 0x0f,
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            exp_stat_sn: StatSn(h.u32(28)),
            beg_run: h.u32(40),
            run_length: h.u32(44),
        }),
        NOP_IN => Pdu::NopIn(NopIn {
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data,
        }),
        SCSI_RESPONSE => {
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
            Pdu::ScsiResponse(ScsiResponse {
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
                itt,
                snack_tag: h.u32(20),
                stat_sn: StatSn(h.u32(24)),
                exp_cmd_sn: CmdSn(h.u32(28)),
                max_cmd_sn: CmdSn(h.u32(32)),
                exp_data_sn: DataSn(h.u32(36)),
                sense,
            })
        }
        TASK_MGMT_RESPONSE => Pdu::TaskMgmtResponse(TaskMgmtResponse {
            response: h.u8(2),
            itt,
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
        }),
        LOGIN_RESPONSE => {
            let flags = h.u8(1);
            Pdu::LoginResponse(LoginResponse {
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
                itt,
                stat_sn: StatSn(h.u32(24)),
                exp_cmd_sn: CmdSn(h.u32(28)),
                max_cmd_sn: CmdSn(h.u32(32)),
                status_class: h.u8(36),
                status_detail: h.u8(37),
                data,
            })
        }
        TEXT_RESPONSE => Pdu::TextResponse(TextResponse {
            final_: f,
            continue_: h.flag(1, 0x40),
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data,
        }),
        DATA_IN => {
            let fl = h.u8(1);
            let s = fl & 0x01 != 0;
            Pdu::DataIn(DataIn {
                final_: f,
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
                lun,
                itt,
                ttt: Ttt(h.u32(20)),
                stat_sn: StatSn(if s { h.u32(24) } else { 0 }),
                exp_cmd_sn: CmdSn(h.u32(28)),
                max_cmd_sn: CmdSn(h.u32(32)),
                data_sn: DataSn(h.u32(36)),
                buffer_offset: h.u32(40),
                data,
            })
        }
        LOGOUT_RESPONSE => Pdu::LogoutResponse(LogoutResponse {
            response: h.u8(2),
            itt,
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            time2wait: h.u16(40),
            time2retain: h.u16(42),
        }),
        R2T => Pdu::R2t(R2t {
            lun,
            itt,
            ttt: Ttt(h.u32(20)),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            r2t_sn: R2tSn(h.u32(36)),
            buffer_offset: h.u32(40),
            desired_len: h.u32(44),
        }),
        ASYNC_MESSAGE => Pdu::AsyncMessage(AsyncMessage {
            lun,
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            event: h.u8(36),
            vcode: h.u8(37),
            params: [h.u16(38), h.u16(40), h.u16(42)],
            data,
        }),
        REJECT => Pdu::Reject(Reject {
            reason: h.u8(2),
            stat_sn: StatSn(h.u32(24)),
            exp_cmd_sn: CmdSn(h.u32(28)),
            max_cmd_sn: CmdSn(h.u32(32)),
            data_sn: DataSn(h.u32(36)),
            header: data,
        }),
        other => return Err(DecodeError::UnsupportedOpcode(other)),
    })
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
fn seq_trailer(b: &mut [u8], stat_sn: StatSn, exp: CmdSn, max: CmdSn) {
    put32(b, 24, stat_sn.0);
    put32(b, 28, exp.0);
    put32(b, 32, max.0);
}

fn encode_bhs(pdu: &Pdu, b: &mut [u8; BHS_LEN], ahs: &mut BytesMut) {
    let imm = |i: bool| if i { 0x40 } else { 0 };
    match pdu {
        Pdu::NopOut(p) => {
            b[0] = imm(p.immediate);
            b[1] = 0x80;
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            put32(b, 24, p.cmd_sn.0);
            put32(b, 28, p.exp_stat_sn.0);
        }
        Pdu::ScsiCommand(p) => {
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
        Pdu::TaskMgmtRequest(p) => {
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
        Pdu::LoginRequest(p) => {
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
        Pdu::TextRequest(p) => {
            b[0] = imm(p.immediate);
            b[1] = (if p.final_ { 0x80 } else { 0 }) | (if p.continue_ { 0x40 } else { 0 });
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            put32(b, 24, p.cmd_sn.0);
            put32(b, 28, p.exp_stat_sn.0);
        }
        Pdu::DataOut(p) => {
            b[1] = if p.final_ { 0x80 } else { 0 };
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            put32(b, 28, p.exp_stat_sn.0);
            put32(b, 36, p.data_sn.0);
            put32(b, 40, p.buffer_offset);
        }
        Pdu::LogoutRequest(p) => {
            b[0] = imm(p.immediate);
            b[1] = 0x80 | (p.reason & 0x7f);
            put32(b, 16, p.itt.0);
            put16(b, 20, p.cid);
            put32(b, 24, p.cmd_sn.0);
            put32(b, 28, p.exp_stat_sn.0);
        }
        Pdu::SnackRequest(p) => {
            b[1] = 0x80 | (p.snack_type & 0x0f);
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            put32(b, 28, p.exp_stat_sn.0);
            put32(b, 40, p.beg_run);
            put32(b, 44, p.run_length);
        }
        Pdu::NopIn(p) => {
            b[1] = 0x80;
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        }
        Pdu::ScsiResponse(p) => {
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
        Pdu::TaskMgmtResponse(p) => {
            b[1] = 0x80;
            b[2] = p.response;
            put32(b, 16, p.itt.0);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        }
        Pdu::LoginResponse(p) => {
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
        Pdu::TextResponse(p) => {
            b[1] = (if p.final_ { 0x80 } else { 0 }) | (if p.continue_ { 0x40 } else { 0 });
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
        }
        Pdu::DataIn(p) => {
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
        Pdu::LogoutResponse(p) => {
            b[1] = 0x80;
            b[2] = p.response;
            put32(b, 16, p.itt.0);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            put16(b, 40, p.time2wait);
            put16(b, 42, p.time2retain);
        }
        Pdu::R2t(p) => {
            b[1] = 0x80;
            put64(b, 8, p.lun.0);
            put32(b, 16, p.itt.0);
            put32(b, 20, p.ttt.0);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            put32(b, 36, p.r2t_sn.0);
            put32(b, 40, p.buffer_offset);
            put32(b, 44, p.desired_len);
        }
        Pdu::AsyncMessage(p) => {
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
        Pdu::Reject(p) => {
            b[1] = 0x80;
            b[2] = p.reason;
            put32(b, 16, RESERVED_TAG);
            seq_trailer(b, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn);
            put32(b, 36, p.data_sn.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(p: &Pdu, framing: &Framing) {
        let mut out = BytesMut::new();
        p.encode(&mut out, framing);
        let (q, n) = Pdu::decode(&out, framing).expect("own encoding decodes");
        assert_eq!(n, out.len());
        assert_eq!(&q, p);
    }

    fn cmd() -> ScsiCommand {
        ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: 1,
            lun: Lun::from_number(3),
            itt: Itt(7),
            edtl: 4096,
            cmd_sn: CmdSn(u32::MAX),
            exp_stat_sn: StatSn(9),
            cdb: Bytes::from_static(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]),
            bidi_read_length: None,
            data: Bytes::new(),
        }
    }

    #[test]
    fn scsi_command_with_ahs_and_digests() {
        let mut c = cmd();
        c.cdb = Bytes::from((0u8..32).collect::<Vec<_>>());
        c.bidi_read_length = Some(512);
        c.data = Bytes::from_static(b"abcde");
        for hd in [false, true] {
            for dd in [false, true] {
                let f = Framing {
                    header_digest: hd,
                    data_digest: dd,
                    max_recv_data_segment: 8192,
                };
                roundtrip(&Pdu::ScsiCommand(c.clone()), &f);
            }
        }
    }

    #[test]
    fn digest_errors_are_detected() {
        let f = Framing {
            header_digest: true,
            data_digest: true,
            max_recv_data_segment: 8192,
        };
        let mut c = cmd();
        c.data = Bytes::from_static(b"payload");
        let mut out = BytesMut::new();
        Pdu::ScsiCommand(c).encode(&mut out, &f);
        let mut bad = out.clone();
        bad[20] ^= 1;
        assert_eq!(Pdu::decode(&bad, &f), Err(DecodeError::HeaderDigest));
        let mut bad = out.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert_eq!(Pdu::decode(&bad, &f), Err(DecodeError::DataDigest));
        assert_eq!(
            DecodeError::DataDigest.reject_reason(),
            Some(RejectReason::DataDigestError)
        );
    }

    #[test]
    fn oversized_segment_refused_before_buffering() {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode::SCSI_COMMAND;
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        let f = Framing::default();
        assert!(matches!(
            f.frame_len(&bhs),
            Err(DecodeError::DataSegmentTooLong {
                len: 0xff_ffff,
                max: 8192
            })
        ));
    }

    #[test]
    fn incomplete_frames_ask_for_more() {
        let mut c = cmd();
        c.data = Bytes::from_static(&[1; 100]);
        let mut out = BytesMut::new();
        Pdu::ScsiCommand(c).encode(&mut out, &Framing::default());
        for cut in [0, 10, 47, 48, 100, out.len() - 1] {
            assert!(matches!(
                Pdu::decode(&out[..cut], &Framing::default()),
                Err(DecodeError::Incomplete(_))
            ));
        }
    }

    #[test]
    fn every_pdu_roundtrips() {
        let f = Framing::default();
        let d = Bytes::from_static(b"key=value\0");
        let pdus = vec![
            Pdu::NopOut(NopOut {
                immediate: true,
                lun: Lun(0),
                itt: Itt(1),
                ttt: Ttt(RESERVED_TAG),
                cmd_sn: CmdSn(5),
                exp_stat_sn: StatSn(6),
                data: d.clone(),
            }),
            Pdu::ScsiCommand(cmd()),
            Pdu::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: TmfFunction::AbortTask,
                lun: Lun::from_number(1),
                itt: Itt(2),
                rtt: Itt(3),
                cmd_sn: CmdSn(4),
                exp_stat_sn: StatSn(5),
                ref_cmd_sn: CmdSn(6),
                exp_data_sn: DataSn(7),
            }),
            Pdu::LoginRequest(LoginRequest {
                transit: true,
                continue_: false,
                csg: Stage::Security,
                nsg: Stage::Operational,
                version_max: 0,
                version_min: 0,
                isid: [0x40, 1, 2, 3, 4, 5],
                tsih: 0,
                itt: Itt(0),
                cid: 1,
                cmd_sn: CmdSn(1),
                exp_stat_sn: StatSn(0),
                data: d.clone(),
            }),
            Pdu::TextRequest(TextRequest {
                immediate: false,
                final_: true,
                continue_: false,
                lun: Lun(0),
                itt: Itt(9),
                ttt: Ttt(RESERVED_TAG),
                cmd_sn: CmdSn(1),
                exp_stat_sn: StatSn(1),
                data: d.clone(),
            }),
            Pdu::DataOut(DataOut {
                final_: true,
                lun: Lun(0),
                itt: Itt(1),
                ttt: Ttt(77),
                exp_stat_sn: StatSn(3),
                data_sn: DataSn(2),
                buffer_offset: 8192,
                data: Bytes::from_static(&[7; 13]),
            }),
            Pdu::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: Itt(1),
                cid: 1,
                cmd_sn: CmdSn(1),
                exp_stat_sn: StatSn(2),
            }),
            Pdu::SnackRequest(SnackRequest {
                snack_type: 1,
                lun: Lun(0),
                itt: Itt(1),
                ttt: Ttt(0),
                exp_stat_sn: StatSn(2),
                beg_run: 3,
                run_length: 4,
            }),
            Pdu::NopIn(NopIn {
                lun: Lun(0),
                itt: Itt(RESERVED_TAG),
                ttt: Ttt(5),
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(2),
                max_cmd_sn: CmdSn(3),
                data: Bytes::new(),
            }),
            Pdu::ScsiResponse(ScsiResponse {
                bidi_residual: Residual::default(),
                residual: Residual::of(512, 0),
                response: 0,
                status: 2,
                itt: Itt(4),
                snack_tag: 0,
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(2),
                max_cmd_sn: CmdSn(3),
                exp_data_sn: DataSn(0),
                sense: Bytes::from_static(&[
                    0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
                ]),
            }),
            Pdu::TaskMgmtResponse(TaskMgmtResponse {
                response: 0,
                itt: Itt(1),
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(1),
            }),
            Pdu::LoginResponse(LoginResponse {
                transit: true,
                continue_: false,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_active: 0,
                isid: [0x40, 1, 2, 3, 4, 5],
                tsih: 9,
                itt: Itt(0),
                stat_sn: StatSn(0),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(32),
                status_class: 0,
                status_detail: 0,
                data: d.clone(),
            }),
            Pdu::TextResponse(TextResponse {
                final_: false,
                continue_: true,
                lun: Lun(0),
                itt: Itt(9),
                ttt: Ttt(1),
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(1),
                data: d.clone(),
            }),
            Pdu::DataIn(DataIn {
                final_: true,
                ack: false,
                residual: Residual::of(4096, 512),
                status: Some(0),
                lun: Lun(0),
                itt: Itt(1),
                ttt: Ttt(RESERVED_TAG),
                stat_sn: StatSn(4),
                exp_cmd_sn: CmdSn(5),
                max_cmd_sn: CmdSn(6),
                data_sn: DataSn(0),
                buffer_offset: 0,
                data: Bytes::from_static(&[1; 512]),
            }),
            Pdu::LogoutResponse(LogoutResponse {
                response: 0,
                itt: Itt(1),
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(1),
                time2wait: 2,
                time2retain: 20,
            }),
            Pdu::R2t(R2t {
                lun: Lun(0),
                itt: Itt(1),
                ttt: Ttt(2),
                stat_sn: StatSn(3),
                exp_cmd_sn: CmdSn(4),
                max_cmd_sn: CmdSn(5),
                r2t_sn: R2tSn(6),
                buffer_offset: 7,
                desired_len: 8,
            }),
            Pdu::AsyncMessage(AsyncMessage {
                lun: Lun(0),
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(1),
                event: 1,
                vcode: 0,
                params: [0, 2, 20],
                data: Bytes::new(),
            }),
            Pdu::Reject(Reject {
                reason: 9,
                stat_sn: StatSn(1),
                exp_cmd_sn: CmdSn(1),
                max_cmd_sn: CmdSn(1),
                data_sn: DataSn(0),
                header: Bytes::from_static(&[0; BHS_LEN]),
            }),
        ];
        for p in &pdus {
            roundtrip(p, &f);
        }
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(Lun::from_number(0).number(), Some(0));
        assert_eq!(Lun::from_number(255).number(), Some(255));
        assert_eq!(Lun::from_number(300).number(), Some(300));
        assert_eq!(Lun::from_number(300).0 >> 56, 0x41);
        assert_eq!(Lun(0x0001_0000_0000_0000).number(), Some(1));
        assert_eq!(Lun(0x0000_0000_0000_0001).number(), None);
        assert_eq!(Lun(0xc000_0000_0000_0000).number(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Random headers with plausible lengths, so most cases reach the field decoders
        /// rather than stopping at "incomplete".
        #[test]
        fn hostile_input_never_panics_and_renormalizes(
            mut bhs in proptest::collection::vec(any::<u8>(), BHS_LEN),
            ahs_words in 0u8..4,
            dsl in 0u32..64,
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            hd in any::<bool>(),
            dd in any::<bool>(),
        ) {
            bhs[4] = ahs_words;
            bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
            let mut bytes = bhs;
            bytes.extend_from_slice(&tail);
            let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: 256 };
            if let Ok((p, n)) = Pdu::decode(&bytes, &f) {
                prop_assert!(n <= bytes.len());
                let mut out = BytesMut::new();
                p.encode(&mut out, &f);
                let (q, m) = Pdu::decode(&out, &f).expect("re-encoded PDU decodes");
                prop_assert_eq!(m, out.len());
                prop_assert_eq!(q, p);
            }
        }
    }
}
