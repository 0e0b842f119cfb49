//! The ftss vendor command set (opcodes 0xC0-0xC5): CDBs and parameter data that carry
//! network packets between the nodes logged in to the target. The byte-by-byte layout is
//! in `docs/vendor-commands.md`; `testdata/vendor/vectors.toml` holds its examples.
//!
//! Every CDB is 16 bytes with CONTROL (byte 15) zero, and every integer is big-endian.
//! Parameter data (data-out) and data-in lists start with a two-letter ASCII magic and a
//! version byte so a stray WRITE or a wrong buffer is caught at byte 0, not deep inside.
//!
//! Decoders check every reserved field and limit, and report the byte offset of the bad
//! field so the daemon can answer INVALID FIELD IN CDB / PARAMETER LIST with a field
//! pointer ([`VendorError::sense`]). They never allocate more than the input they are
//! handed. Encoders are infallible: a value past a limit is written as-is (counts
//! saturate) and the decoder on the other side rejects it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::digest::{crc32c, pad_len};
use crate::sense::{common, key, Sense};

/// Vendor operation codes.
pub mod op {
    /// Hand packets to the target (data-out).
    pub const SEND: u8 = 0xc0;
    /// Take delivered packets (data-in).
    pub const RECEIVE: u8 = 0xc1;
    /// Release delivered packets (data-out when LIST is set).
    pub const ACK: u8 = 0xc2;
    /// Read stored packets again (data-in).
    pub const REPLAY: u8 = 0xc3;
    /// Node management, by service action (see [`super::sa`]).
    pub const NODE: u8 = 0xc4;
    /// Per-packet outcomes of this nexus's last SEND (data-in).
    pub const SEND_RESULTS: u8 = 0xc5;
}

/// NODE service actions (CDB byte 1, bits 0-4).
pub mod sa {
    /// Replace this nexus's addresses (data-out: address list).
    pub const REGISTER: u8 = 0x00;
    /// Available or maintenance (CDB byte 2).
    pub const SET_STATE: u8 = 0x01;
    /// This nexus's addresses and state (data-in).
    pub const QUERY: u8 = 0x02;
    /// Every routable address (data-in).
    pub const ROUTING_TABLE: u8 = 0x03;
    /// This node's queue counters (data-in).
    pub const QUEUE_STATS: u8 = 0x04;
}

/// SCSI status codes a vendor command completes with (GOOD, CHECK CONDITION, BUSY, TASK
/// SET FULL among them).
pub use crate::sense::status;

/// ASC and ASCQ values of the vendor sense reports (ASC 0x80 is vendor specific in SPC-4).
pub mod asc {
    /// The vendor ASC every packet outcome uses.
    pub const PACKET: u8 = 0x80;
    /// ASCQ: accepted, delivery not guaranteed.
    pub const ACCEPTED: u8 = 0x01;
    /// ASCQ: no node has the destination address.
    pub const UNKNOWN_DESTINATION: u8 = 0x02;
    /// ASCQ: the destination node is not logged in.
    pub const DESTINATION_DOWN: u8 = 0x03;
    /// ASCQ: the destination node is in maintenance.
    pub const DESTINATION_MAINTENANCE: u8 = 0x04;
    /// ASCQ: the destination node holds its quota of unacknowledged packets (bytes or
    /// records); nothing was stored for it. Retry once it has acknowledged some.
    pub const DESTINATION_QUEUE_FULL: u8 = 0x05;
    /// ASCQ: the packets of the batch had different outcomes; read SEND RESULTS.
    pub const MIXED: u8 = 0x10;
    /// ASCQ, with ILLEGAL REQUEST: the session belongs to no node (no `[[node]]` for its
    /// initiator name and no NODE REGISTER yet), so it has no address to send from or
    /// receive at.
    pub const NODE_NOT_REGISTERED: u8 = 0x20;
    /// DATA PHASE CRC ERROR DETECTED (SPC-4), for a payload whose CRC32C does not match.
    pub const DATA_PHASE_CRC: (u8, u8) = (0x47, 0x01);
}

/// Every vendor CDB is this long.
pub const CDB_LEN: usize = 16;
/// Version byte of every list this module defines.
pub const VERSION: u8 = 1;
/// Largest payload of one packet.
pub const PAYLOAD_MAX: usize = 65535;
/// Most packet records in one SEND.
pub const SEND_RECORDS_MAX: usize = 1024;
/// Largest SEND parameter list (16 MiB).
pub const PARAM_LIST_MAX: u32 = 16 << 20;
/// Most sequence numbers in one ACK list.
pub const ACK_LIST_MAX: usize = 1024;
/// Most addresses one node registers.
pub const ADDRESSES_MAX: usize = 64;

/// Length of the SEND list header ("FP").
pub const SEND_HEADER_LEN: usize = 8;
/// Length of a SEND packet record before its payload.
pub const SEND_RECORD_HEADER_LEN: usize = 36;
/// Length of the RECEIVE / REPLAY list header ("FR").
pub const RECORD_LIST_HEADER_LEN: usize = 12;
/// Length of a delivered record before its payload.
pub const DELIVERED_HEADER_LEN: usize = 52;
/// Length of the address list, node info and routing table headers.
pub const LIST_HEADER_LEN: usize = 8;
/// Length of one routing table entry.
pub const ROUTE_ENTRY_LEN: usize = 24;
/// Length of the SEND RESULTS header ("FS").
pub const RESULTS_HEADER_LEN: usize = 16;
/// Length of one SEND RESULTS entry.
pub const RESULT_ENTRY_LEN: usize = 16;
/// Length of the QUEUE STATS data ("FQ").
pub const QUEUE_STATS_LEN: usize = 56;
/// Largest REGISTER parameter list: header and [`ADDRESSES_MAX`] addresses.
pub const REGISTER_LIST_MAX: u32 = (LIST_HEADER_LEN + ADDRESSES_MAX * 16) as u32;

/// Why vendor CDB or parameter data was refused; [`VendorError::sense`] gives the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VendorError {
    /// The CDB is not exactly 16 bytes.
    #[error("vendor CDB is {0} bytes, not 16")]
    CdbLength(usize),
    /// An opcode outside the vendor command set.
    #[error("opcode {0:#04x} is not an ftss vendor command")]
    UnsupportedOpcode(u8),
    /// A CDB field with a value this format forbids.
    #[error("invalid CDB field at byte {byte}: {what}")]
    CdbField {
        /// CDB byte.
        byte: u8,
        /// Bit, when one bit is at fault.
        bit: Option<u8>,
        /// What is wrong.
        what: &'static str,
    },
    /// The data ends inside a field.
    #[error("{what} at byte {offset} needs {need} bytes, data has {len}")]
    Truncated {
        /// Offset of the field that does not fit.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Length of the data.
        len: usize,
        /// The field.
        what: &'static str,
    },
    /// A parameter (or data-in) field with a value this format forbids.
    #[error("invalid field at byte {offset}: {what}")]
    ParamField {
        /// Offset of the field.
        offset: usize,
        /// Bit, when one bit is at fault.
        bit: Option<u8>,
        /// What is wrong.
        what: &'static str,
    },
    /// A payload does not match its CRC32C.
    #[error("payload CRC32C mismatch, field at byte {offset}: {expected:#010x} != {actual:#010x}")]
    Crc {
        /// Offset of the CRC field.
        offset: usize,
        /// The CRC the record carries.
        expected: u32,
        /// The CRC of the payload received.
        actual: u32,
    },
}

impl VendorError {
    /// The sense the daemon answers with. Parameter list errors carry the offset in the
    /// INFORMATION field always, and in the field pointer when it fits its 16 bits.
    #[must_use]
    pub fn sense(&self) -> Sense {
        let param = |s: Sense, offset: usize, bit: Option<u8>| {
            let s = s.with_info(offset as u64);
            match u16::try_from(offset) {
                Ok(b) => s.param_field(b, bit),
                Err(_) => s,
            }
        };
        match *self {
            VendorError::CdbLength(_) => common::INVALID_FIELD_IN_CDB.cdb_field(0, None),
            VendorError::UnsupportedOpcode(_) => common::INVALID_OPCODE.cdb_field(0, None),
            VendorError::CdbField { byte, bit, .. } => {
                common::INVALID_FIELD_IN_CDB.cdb_field(u16::from(byte), bit)
            }
            VendorError::Truncated { offset, .. } => {
                param(common::PARAM_LIST_LENGTH_ERROR, offset, None)
            }
            VendorError::ParamField { offset, bit, .. } => {
                param(common::INVALID_FIELD_IN_PARAM_LIST, offset, bit)
            }
            // ABORTED COMMAND tells the initiator to retry; packet ids make that safe.
            // SPC-4 defines no field pointer for this sense key, so only INFORMATION.
            VendorError::Crc { offset, .. } => Sense::new(
                key::ABORTED_COMMAND,
                asc::DATA_PHASE_CRC.0,
                asc::DATA_PHASE_CRC.1,
            )
            .with_info(offset as u64),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Node addresses

/// A node address: 16 bytes holding an IPv6 address, IPv4 as IPv4-mapped (::ffff:a.b.c.d).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeAddr(pub [u8; 16]);

impl NodeAddr {
    /// The unspecified address `::`, the destination field of a broadcast.
    pub const UNSPECIFIED: NodeAddr = NodeAddr([0; 16]);

    /// As an IP address: IPv4-mapped addresses come back as IPv4.
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        Ipv6Addr::from(self.0).to_canonical()
    }

    /// True for `::`.
    #[must_use]
    pub fn is_unspecified(&self) -> bool {
        self.0 == [0; 16]
    }

    /// True for an address one host can own: not unspecified (`::`, `0.0.0.0`), not
    /// multicast (`ff00::/8`, `224.0.0.0/4`; `ff..ff`, the external port's queue key, is
    /// one), not the IPv4 limited broadcast.
    #[must_use]
    pub fn is_unicast(&self) -> bool {
        match self.ip() {
            IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        }
    }
}

impl From<IpAddr> for NodeAddr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => v4.into(),
            IpAddr::V6(v6) => v6.into(),
        }
    }
}

impl From<Ipv4Addr> for NodeAddr {
    fn from(ip: Ipv4Addr) -> Self {
        NodeAddr(ip.to_ipv6_mapped().octets())
    }
}

impl From<Ipv6Addr> for NodeAddr {
    fn from(ip: Ipv6Addr) -> Self {
        NodeAddr(ip.octets())
    }
}

impl From<NodeAddr> for IpAddr {
    fn from(a: NodeAddr) -> Self {
        a.ip()
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip().fmt(f)
    }
}

// Debug shows the address, not 16 numbers, so test vectors can name it.
impl fmt::Debug for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeAddr({})", self.ip())
    }
}

// ---------------------------------------------------------------------------------------
// Outcomes

/// What became of one packet of a SEND.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Stored on fault-tolerant media for every destination: delivery is guaranteed.
    Delivered,
    /// Accepted, but delivery is not guaranteed (e.g. handed to the external port).
    Accepted,
    /// No node has registered the destination address.
    UnknownDestination,
    /// The destination node is not logged in.
    DestinationDown,
    /// The destination node is in maintenance.
    DestinationMaintenance,
    /// The destination node's queue is at its quota: not stored, retry later.
    DestinationQueueFull,
}

impl Outcome {
    /// Every outcome, in code order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Delivered,
        Outcome::Accepted,
        Outcome::UnknownDestination,
        Outcome::DestinationDown,
        Outcome::DestinationMaintenance,
        Outcome::DestinationQueueFull,
    ];

    /// The code SEND RESULTS carries; equal to the ASCQ for every outcome but GOOD.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Outcome::Delivered => 0x00,
            Outcome::Accepted => asc::ACCEPTED,
            Outcome::UnknownDestination => asc::UNKNOWN_DESTINATION,
            Outcome::DestinationDown => asc::DESTINATION_DOWN,
            Outcome::DestinationMaintenance => asc::DESTINATION_MAINTENANCE,
            Outcome::DestinationQueueFull => asc::DESTINATION_QUEUE_FULL,
        }
    }

    /// The outcome of a code, if defined.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.code() == code)
    }

    /// True when the packet is stored (delivered or at least accepted).
    #[must_use]
    pub const fn accepted(self) -> bool {
        matches!(self, Outcome::Delivered | Outcome::Accepted)
    }

    /// Sense key, ASC and ASCQ of a batch whose packets all had this outcome, or `None`
    /// for [`Outcome::Delivered`], which completes with GOOD.
    #[must_use]
    pub const fn sense_code(self) -> Option<(u8, u8, u8)> {
        match self {
            Outcome::Delivered => None,
            Outcome::Accepted => Some((key::RECOVERED_ERROR, asc::PACKET, asc::ACCEPTED)),
            o => Some((key::ABORTED_COMMAND, asc::PACKET, o.code())),
        }
    }

    /// The outcome a sense key, ASC and ASCQ report, if they report one.
    #[must_use]
    pub fn from_sense_code(key: u8, asc: u8, ascq: u8) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.sense_code() == Some((key, asc, ascq)))
    }
}

/// How a SEND completed, readable from status and sense alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Every packet had this outcome.
    All(Outcome),
    /// Packets had different outcomes; SEND RESULTS lists them.
    Mixed,
    /// The media is full: nothing was stored (status BUSY or TASK SET FULL, no sense).
    MediaFull,
}

impl SendStatus {
    /// The status of a batch with these outcomes (a batch of none is GOOD).
    pub fn of(outcomes: impl IntoIterator<Item = Outcome>) -> Self {
        let mut it = outcomes.into_iter();
        let Some(first) = it.next() else {
            return SendStatus::All(Outcome::Delivered);
        };
        if it.all(|o| o == first) {
            SendStatus::All(first)
        } else {
            SendStatus::Mixed
        }
    }

    /// The SCSI status the target completes the SEND with (media full: TASK SET FULL).
    #[must_use]
    pub const fn status(self) -> u8 {
        match self {
            SendStatus::All(Outcome::Delivered) => status::GOOD,
            SendStatus::MediaFull => status::TASK_SET_FULL,
            _ => status::CHECK_CONDITION,
        }
    }

    /// Sense key, ASC and ASCQ, when the status is CHECK CONDITION.
    #[must_use]
    pub const fn sense_code(self) -> Option<(u8, u8, u8)> {
        match self {
            SendStatus::All(o) => o.sense_code(),
            SendStatus::Mixed => Some((key::RECOVERED_ERROR, asc::PACKET, asc::MIXED)),
            SendStatus::MediaFull => None,
        }
    }

    /// The sense report, when the status is CHECK CONDITION.
    #[must_use]
    pub fn sense(self) -> Option<Sense> {
        self.sense_code().map(|(k, a, q)| Sense::new(k, a, q))
    }

    /// Reads a SEND's completion back from its status and sense data (either format).
    /// `None` when it is not a packet outcome (e.g. ILLEGAL REQUEST: nothing stored).
    #[must_use]
    pub fn from_reply(status_byte: u8, sense: &[u8]) -> Option<Self> {
        match status_byte {
            status::GOOD => Some(SendStatus::All(Outcome::Delivered)),
            status::BUSY | status::TASK_SET_FULL => Some(SendStatus::MediaFull),
            status::CHECK_CONDITION => {
                let (k, a, q) = Sense::parse(sense)?;
                if (k, a, q) == (key::RECOVERED_ERROR, asc::PACKET, asc::MIXED) {
                    Some(SendStatus::Mixed)
                } else {
                    Outcome::from_sense_code(k, a, q).map(SendStatus::All)
                }
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Byte readers and writers

/// Reads fields in order, naming the offset of any that fails.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], VendorError> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(VendorError::Truncated {
                offset: self.pos,
                need: n,
                len: self.buf.len(),
                what,
            })?;
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], VendorError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, VendorError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, VendorError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, VendorError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, VendorError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn addr(&mut self, what: &'static str) -> Result<NodeAddr, VendorError> {
        self.array(what).map(NodeAddr)
    }

    /// Reserved bytes must be zero, so a later version can give them a meaning.
    fn reserved(&mut self, n: usize) -> Result<(), VendorError> {
        let at = self.pos;
        let s = self.take(n, "reserved")?;
        match s.iter().position(|&b| b != 0) {
            None => Ok(()),
            Some(i) => Err(VendorError::ParamField {
                offset: at + i,
                bit: None,
                what: "reserved byte not zero",
            }),
        }
    }

    /// The two-byte magic and the version byte that open every list.
    fn magic(&mut self, magic: &[u8; 2]) -> Result<(), VendorError> {
        if self.array::<2>("magic")? != *magic {
            return Err(field(self.pos - 2, None, "wrong magic"));
        }
        if self.u8("version")? != VERSION {
            return Err(field(self.pos - 1, None, "unsupported version"));
        }
        Ok(())
    }

    /// Flags field of `len` bytes at the current position, with only `known` bits allowed.
    fn flags(&mut self, len: usize, known: u16) -> Result<u16, VendorError> {
        let at = self.pos;
        let v = if len == 1 {
            u16::from(self.u8("flags")?)
        } else {
            self.u16("flags")?
        };
        check_flags(
            v,
            known,
            |byte, bit| VendorError::ParamField {
                offset: at + byte,
                bit: Some(bit),
                what: "reserved flag set",
            },
            len,
        )?;
        Ok(v)
    }

    /// Zero padding after a payload of `len` bytes.
    fn pad(&mut self, len: usize) -> Result<(), VendorError> {
        self.reserved(pad_len(len))
    }

    fn end(&self) -> Result<(), VendorError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(field(self.pos, None, "bytes after the last record"))
        }
    }
}

fn field(offset: usize, bit: Option<u8>, what: &'static str) -> VendorError {
    VendorError::ParamField { offset, bit, what }
}

/// Fails on the highest bit of `v` outside `known`, naming its byte (within a big-endian
/// field of `len` bytes) and bit.
fn check_flags(
    v: u16,
    known: u16,
    err: impl Fn(usize, u8) -> VendorError,
    len: usize,
) -> Result<(), VendorError> {
    let bad = v & !known;
    if bad == 0 {
        return Ok(());
    }
    let b = 15 - bad.leading_zeros() as usize;
    Err(err(len - 1 - b / 8, (b % 8) as u8))
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn count16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
fn put_payload(out: &mut Vec<u8>, p: &[u8]) {
    out.extend_from_slice(p);
    out.resize(out.len() + pad_len(p.len()), 0);
}
/// Opens a list: magic, version, then `b3` (flags or state, else reserved).
fn put_magic(out: &mut Vec<u8>, magic: &[u8; 2], b3: u8) {
    out.extend_from_slice(magic);
    out.push(VERSION);
    out.push(b3);
}

mod cdb;
mod records;

pub use cdb::*;
pub use records::*;

#[cfg(test)]
mod tests;
