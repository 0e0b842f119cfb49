//! iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, Additional Header
//! Segments, header and data digests, and the data segment.
//!
//! A connection reader uses [`Framing::frame_len`] on the first 48 bytes to learn how many
//! bytes the whole PDU occupies (after checking the lengths against its limits), then
//! [`Pdu::decode`] on the complete frame. [`Pdu::encode`] writes a frame with digests as
//! negotiated.
//!
//! This file holds what every PDU shares: the [`Pdu`] enum, tags and LUN, framing and
//! digests, AHS, and the dispatch on the opcode. Each family has its own file with its
//! structs and their BHS layout (`from_bhs` / `put_bhs`): `scsi.rs` (Command, Response,
//! Data-Out, Data-In, R2T), `task.rs` (task management), `login.rs` (Login and Text),
//! `control.rs` (NOP, Logout, SNACK, Asynchronous Message, Reject). `bhs.rs` reads and
//! writes BHS fields for them.

use bytes::{BufMut, Bytes, BytesMut};

use crate::digest;

mod bhs;
mod control;
mod login;
mod scsi;
mod task;
#[cfg(test)]
mod tests;

use bhs::Bhs;
pub use control::{
    AsyncMessage, LogoutRequest, LogoutResponse, NopIn, NopOut, Reject, SnackRequest,
};
pub use login::{LoginRequest, LoginResponse, Stage, TextRequest, TextResponse};
pub use scsi::{DataIn, DataOut, R2t, Residual, ScsiCommand, ScsiResponse};
pub use task::{TaskMgmtRequest, TaskMgmtResponse, TmfFunction};

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
        let dsl = self.encode_header(out, framing, data.len());
        let data = &data[..dsl];
        if !data.is_empty() {
            out.reserve(data.len() + 7);
            out.put_slice(data);
            encode_data_tail(data, framing, out);
        }
    }

    /// [`encode`](Self::encode) for a Data-In PDU without copying its data: the header
    /// (BHS, AHS, header digest) goes onto `out` and the data segment comes back, to be
    /// sent after it and followed by what [`encode_data_tail`] appends (padding, data
    /// digest). The three in that order are the bytes `encode` writes. `None` (and
    /// nothing written) for any other PDU or an empty segment.
    pub fn encode_split(&self, out: &mut BytesMut, framing: &Framing) -> Option<Bytes> {
        let Pdu::DataIn(p) = self else {
            return None;
        };
        if p.data.is_empty() {
            return None;
        }
        let dsl = self.encode_header(out, framing, p.data.len());
        Some(p.data.slice(..dsl))
    }

    /// Writes the header of a PDU whose data segment has `data_len` bytes; returns the
    /// segment's length as encoded (capped at the field's maximum).
    fn encode_header(&self, out: &mut BytesMut, framing: &Framing, data_len: usize) -> usize {
        let start = out.len();
        let mut bhs = [0u8; BHS_LEN];
        let mut ahs = BytesMut::new();
        encode_bhs(self, &mut bhs, &mut ahs);
        bhs[0] |= self.opcode();
        debug_assert!(ahs.len().is_multiple_of(4) && ahs.len() / 4 <= 255);
        bhs[4] = (ahs.len() / 4) as u8;
        let dsl = data_len.min(DATA_SEGMENT_LEN_MAX as usize) as u32;
        bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        out.reserve(BHS_LEN + ahs.len() + 4);
        out.put_slice(&bhs);
        out.put_slice(&ahs);
        if framing.header_digest {
            let c = digest::crc32c(&out[start..]);
            out.put_u32_le(c);
        }
        dsl as usize
    }
}

/// What follows a data segment on the wire: its padding to a multiple of 4 bytes and,
/// when negotiated, its data digest (over the segment without the padding).
pub fn encode_data_tail(data: &[u8], framing: &Framing, out: &mut BytesMut) {
    out.put_bytes(0, digest::pad_len(data.len()));
    if framing.data_digest {
        out.put_u32_le(digest::data_digest(data));
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
    use opcode::*;
    Ok(match h.u8(0) & 0x3f {
        NOP_OUT => Pdu::NopOut(NopOut::from_bhs(&h, data)),
        SCSI_COMMAND => Pdu::ScsiCommand(ScsiCommand::from_bhs(&h, ahs, data)),
        TASK_MGMT_REQUEST => Pdu::TaskMgmtRequest(TaskMgmtRequest::from_bhs(&h)),
        LOGIN_REQUEST => Pdu::LoginRequest(LoginRequest::from_bhs(&h, data)?),
        TEXT_REQUEST => Pdu::TextRequest(TextRequest::from_bhs(&h, data)),
        DATA_OUT => Pdu::DataOut(DataOut::from_bhs(&h, data)),
        LOGOUT_REQUEST => Pdu::LogoutRequest(LogoutRequest::from_bhs(&h)),
        SNACK_REQUEST => Pdu::SnackRequest(SnackRequest::from_bhs(&h)),
        NOP_IN => Pdu::NopIn(NopIn::from_bhs(&h, data)),
        SCSI_RESPONSE => Pdu::ScsiResponse(ScsiResponse::from_bhs(&h, data)?),
        TASK_MGMT_RESPONSE => Pdu::TaskMgmtResponse(TaskMgmtResponse::from_bhs(&h)),
        LOGIN_RESPONSE => Pdu::LoginResponse(LoginResponse::from_bhs(&h, data)?),
        TEXT_RESPONSE => Pdu::TextResponse(TextResponse::from_bhs(&h, data)),
        DATA_IN => Pdu::DataIn(DataIn::from_bhs(&h, data)),
        LOGOUT_RESPONSE => Pdu::LogoutResponse(LogoutResponse::from_bhs(&h)),
        R2T => Pdu::R2t(R2t::from_bhs(&h)),
        ASYNC_MESSAGE => Pdu::AsyncMessage(AsyncMessage::from_bhs(&h, data)),
        REJECT => Pdu::Reject(Reject::from_bhs(&h, data)),
        other => return Err(DecodeError::UnsupportedOpcode(other)),
    })
}

/// The BHS of `pdu` but for what [`Pdu::encode`] fills in for all (opcode, lengths), and
/// its AHS.
fn encode_bhs(pdu: &Pdu, b: &mut [u8; BHS_LEN], ahs: &mut BytesMut) {
    match pdu {
        Pdu::NopOut(p) => p.put_bhs(b),
        Pdu::ScsiCommand(p) => p.put_bhs(b, ahs),
        Pdu::TaskMgmtRequest(p) => p.put_bhs(b),
        Pdu::LoginRequest(p) => p.put_bhs(b),
        Pdu::TextRequest(p) => p.put_bhs(b),
        Pdu::DataOut(p) => p.put_bhs(b),
        Pdu::LogoutRequest(p) => p.put_bhs(b),
        Pdu::SnackRequest(p) => p.put_bhs(b),
        Pdu::NopIn(p) => p.put_bhs(b),
        Pdu::ScsiResponse(p) => p.put_bhs(b),
        Pdu::TaskMgmtResponse(p) => p.put_bhs(b),
        Pdu::LoginResponse(p) => p.put_bhs(b),
        Pdu::TextResponse(p) => p.put_bhs(b),
        Pdu::DataIn(p) => p.put_bhs(b),
        Pdu::LogoutResponse(p) => p.put_bhs(b),
        Pdu::R2t(p) => p.put_bhs(b),
        Pdu::AsyncMessage(p) => p.put_bhs(b),
        Pdu::Reject(p) => p.put_bhs(b),
    }
}
