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

// ---------------------------------------------------------------------------------------
// CDBs

/// SEND (0xC0): hand a batch of packets to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendCdb {
    /// Chosen by the client, echoed by SEND RESULTS.
    pub batch_tag: u64,
    /// Bytes of data-out (the packet list), at most [`PARAM_LIST_MAX`]; 0 sends nothing.
    pub param_len: u32,
}

/// RECEIVE (0xC1): take packets delivered to this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveCdb {
    /// Long poll: wait up to `timeout` for a first record when none is queued.
    pub wait: bool,
    /// Most records to return; 0 = as many as fit.
    pub max_records: u32,
    /// Bytes of data-in the initiator has room for; 0 or at least 12.
    pub alloc_len: u32,
    /// Wait limit in 100 ms units; only with `wait`, 0 = do not wait.
    pub timeout: u16,
}

/// ACK (0xC2): release delivered packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCdb {
    /// Every record up to and including this sequence number.
    UpTo(u64),
    /// The sequence numbers in the data-out list of `param_len` bytes.
    List {
        /// Multiple of 8, at most 8 * [`ACK_LIST_MAX`].
        param_len: u32,
    },
}

/// Where REPLAY starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// At this sequence number.
    Seq(u64),
    /// At the first record stored at or after this time (ms since the Unix epoch).
    Time(u64),
}

/// REPLAY (0xC3): read stored packets again, without moving the RECEIVE position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayCdb {
    /// Start.
    pub from: ReplayFrom,
    /// Bytes of data-in the initiator has room for; 0 or at least 12.
    pub alloc_len: u32,
}

/// A node's own state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Takes packets (0).
    Available,
    /// Packets to it are refused with DESTINATION IN MAINTENANCE (1).
    Maintenance,
}

impl NodeState {
    /// Wire code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            NodeState::Available => 0,
            NodeState::Maintenance => 1,
        }
    }

    /// State of a wire code.
    #[must_use]
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(NodeState::Available),
            1 => Some(NodeState::Maintenance),
            _ => None,
        }
    }
}

/// NODE (0xC4), by service action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeCdb {
    /// REGISTER: data-out is an [`AddressList`] of `param_len` bytes.
    Register {
        /// At most [`REGISTER_LIST_MAX`].
        param_len: u32,
    },
    /// SET STATE.
    SetState(NodeState),
    /// QUERY: data-in is [`NodeInfo`].
    Query {
        /// Allocation length.
        alloc_len: u32,
    },
    /// ROUTING TABLE: data-in is [`RouteList`].
    RoutingTable {
        /// Allocation length.
        alloc_len: u32,
    },
    /// QUEUE STATS: data-in is [`QueueStats`].
    QueueStats {
        /// Allocation length.
        alloc_len: u32,
    },
}

/// SEND RESULTS (0xC5): per-packet outcomes of this nexus's last SEND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendResultsCdb {
    /// Tag of the SEND asked about; another tag is INVALID FIELD IN CDB (byte 2).
    pub batch_tag: u64,
    /// Allocation length.
    pub alloc_len: u32,
}

/// Any vendor CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VendorCdb {
    /// SEND.
    Send(SendCdb),
    /// RECEIVE.
    Receive(ReceiveCdb),
    /// ACK.
    Ack(AckCdb),
    /// REPLAY.
    Replay(ReplayCdb),
    /// NODE.
    Node(NodeCdb),
    /// SEND RESULTS.
    SendResults(SendResultsCdb),
}

/// A 16-byte CDB under decode: fields by offset, errors as field pointers.
struct CdbIn<'a>(&'a [u8; CDB_LEN]);

impl CdbIn<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }
    fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_be_bytes(b)
    }
    fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_be_bytes(b)
    }
    /// Bytes in `from..to` must be zero.
    fn reserved(&self, from: usize, to: usize) -> Result<(), VendorError> {
        match (from..to).find(|&i| self.0[i] != 0) {
            None => Ok(()),
            Some(i) => Err(cdb_field(i, None, "reserved byte not zero")),
        }
    }
    /// Byte 1 may only have the bits in `known`.
    fn byte1(&self, known: u8) -> Result<u8, VendorError> {
        check_flags(
            u16::from(self.0[1]),
            u16::from(known),
            |_, bit| cdb_field(1, Some(bit), "reserved bit set"),
            1,
        )?;
        Ok(self.0[1])
    }
    fn alloc_len(&self, at: usize) -> Result<u32, VendorError> {
        let v = self.u32(at);
        // The list header must fit; 0 keeps the SCSI meaning "transfer nothing".
        if v != 0 && (v as usize) < LIST_HEADER_LEN {
            return Err(cdb_field(at, None, "allocation length below 8"));
        }
        Ok(v)
    }
}

fn cdb_field(byte: usize, bit: Option<u8>, what: &'static str) -> VendorError {
    VendorError::CdbField {
        byte: byte as u8,
        bit,
        what,
    }
}

/// Builds a CDB: opcode, byte 1, bytes 2-9, bytes 10-13; 14 reserved, 15 CONTROL 0.
fn cdb(opcode: u8, b1: u8, b2_9: [u8; 8], b10_13: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(CDB_LEN);
    c.push(opcode);
    c.push(b1);
    c.extend_from_slice(&b2_9);
    put_u32(&mut c, b10_13);
    c.extend_from_slice(&[0, 0]);
    c
}

impl SendCdb {
    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        cdb(op::SEND, 0, self.batch_tag.to_be_bytes(), self.param_len)
    }

    /// Decodes a SEND CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::Send(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not SEND")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        c.byte1(0)?;
        let param_len = c.u32(10);
        if param_len > PARAM_LIST_MAX {
            return Err(cdb_field(10, None, "parameter list above 16 MiB"));
        }
        if param_len != 0 && (param_len as usize) < SEND_HEADER_LEN {
            return Err(cdb_field(
                10,
                None,
                "parameter list shorter than its header",
            ));
        }
        Ok(SendCdb {
            batch_tag: c.u64(2),
            param_len,
        })
    }
}

impl ReceiveCdb {
    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut c = vec![0u8; CDB_LEN];
        c[0] = op::RECEIVE;
        c[1] = u8::from(self.wait);
        c[2..6].copy_from_slice(&self.max_records.to_be_bytes());
        c[6..10].copy_from_slice(&self.alloc_len.to_be_bytes());
        c[10..12].copy_from_slice(&self.timeout.to_be_bytes());
        c
    }

    /// Decodes a RECEIVE CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::Receive(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not RECEIVE")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        let wait = c.byte1(1)? & 1 != 0;
        c.reserved(12, 15)?;
        let alloc_len = c.u32(6);
        if alloc_len != 0 && (alloc_len as usize) < RECORD_LIST_HEADER_LEN {
            return Err(cdb_field(6, None, "allocation length below 12"));
        }
        let timeout = c.u16(10);
        if !wait && timeout != 0 {
            return Err(cdb_field(10, None, "timeout without WAIT"));
        }
        Ok(ReceiveCdb {
            wait,
            max_records: c.u32(2),
            alloc_len,
            timeout,
        })
    }

    /// The longest this RECEIVE may wait, in milliseconds.
    #[must_use]
    pub fn timeout_ms(&self) -> u64 {
        if self.wait {
            u64::from(self.timeout) * 100
        } else {
            0
        }
    }
}

impl AckCdb {
    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            AckCdb::UpTo(seq) => cdb(op::ACK, 0, seq.to_be_bytes(), 0),
            AckCdb::List { param_len } => cdb(op::ACK, 1, [0; 8], param_len),
        }
    }

    /// Decodes an ACK CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::Ack(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not ACK")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        let list = c.byte1(1)? & 1 != 0;
        let param_len = c.u32(10);
        if !list {
            if param_len != 0 {
                return Err(cdb_field(10, None, "parameter list without LIST"));
            }
            return Ok(AckCdb::UpTo(c.u64(2)));
        }
        c.reserved(2, 10)?;
        if !param_len.is_multiple_of(8) {
            return Err(cdb_field(10, None, "not a multiple of 8"));
        }
        if param_len as usize > ACK_LIST_MAX * 8 {
            return Err(cdb_field(10, None, "more than 1024 sequence numbers"));
        }
        Ok(AckCdb::List { param_len })
    }
}

impl ReplayCdb {
    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let (b1, v) = match self.from {
            ReplayFrom::Seq(s) => (0, s),
            ReplayFrom::Time(t) => (1, t),
        };
        cdb(op::REPLAY, b1, v.to_be_bytes(), self.alloc_len)
    }

    /// Decodes a REPLAY CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::Replay(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not REPLAY")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        let by_time = c.byte1(1)? & 1 != 0;
        let v = c.u64(2);
        let alloc_len = c.u32(10);
        if alloc_len != 0 && (alloc_len as usize) < RECORD_LIST_HEADER_LEN {
            return Err(cdb_field(10, None, "allocation length below 12"));
        }
        Ok(ReplayCdb {
            from: if by_time {
                ReplayFrom::Time(v)
            } else {
                ReplayFrom::Seq(v)
            },
            alloc_len,
        })
    }
}

impl NodeCdb {
    /// The service action.
    #[must_use]
    pub const fn service_action(&self) -> u8 {
        match self {
            NodeCdb::Register { .. } => sa::REGISTER,
            NodeCdb::SetState(_) => sa::SET_STATE,
            NodeCdb::Query { .. } => sa::QUERY,
            NodeCdb::RoutingTable { .. } => sa::ROUTING_TABLE,
            NodeCdb::QueueStats { .. } => sa::QUEUE_STATS,
        }
    }

    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b2_9 = [0u8; 8];
        let len = match *self {
            NodeCdb::Register { param_len } => param_len,
            NodeCdb::SetState(s) => {
                b2_9[0] = s.code();
                0
            }
            NodeCdb::Query { alloc_len }
            | NodeCdb::RoutingTable { alloc_len }
            | NodeCdb::QueueStats { alloc_len } => alloc_len,
        };
        cdb(op::NODE, self.service_action(), b2_9, len)
    }

    /// Decodes a NODE CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::Node(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not NODE")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        let b1 = c.byte1(0x1f)?;
        let state = c.0[2];
        if b1 != sa::SET_STATE && state != 0 {
            return Err(cdb_field(2, None, "reserved byte not zero"));
        }
        c.reserved(3, 10)?;
        Ok(match b1 {
            sa::REGISTER => {
                let param_len = c.u32(10);
                if param_len > REGISTER_LIST_MAX {
                    return Err(cdb_field(10, None, "more than 64 addresses"));
                }
                if param_len != 0 && (param_len as usize) < LIST_HEADER_LEN {
                    return Err(cdb_field(
                        10,
                        None,
                        "parameter list shorter than its header",
                    ));
                }
                NodeCdb::Register { param_len }
            }
            sa::SET_STATE => {
                c.reserved(10, 14)?;
                NodeCdb::SetState(
                    NodeState::from_code(state)
                        .ok_or_else(|| cdb_field(2, None, "undefined node state"))?,
                )
            }
            sa::QUERY => NodeCdb::Query {
                alloc_len: c.alloc_len(10)?,
            },
            sa::ROUTING_TABLE => NodeCdb::RoutingTable {
                alloc_len: c.alloc_len(10)?,
            },
            sa::QUEUE_STATS => NodeCdb::QueueStats {
                alloc_len: c.alloc_len(10)?,
            },
            _ => return Err(cdb_field(1, Some(4), "undefined service action")),
        })
    }
}

impl SendResultsCdb {
    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        cdb(
            op::SEND_RESULTS,
            0,
            self.batch_tag.to_be_bytes(),
            self.alloc_len,
        )
    }

    /// Decodes a SEND RESULTS CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, VendorError> {
        match VendorCdb::parse(cdb)? {
            VendorCdb::SendResults(c) => Ok(c),
            _ => Err(cdb_field(0, None, "not SEND RESULTS")),
        }
    }

    fn parse(c: &CdbIn<'_>) -> Result<Self, VendorError> {
        c.byte1(0)?;
        let alloc_len = c.u32(10);
        if alloc_len != 0 && (alloc_len as usize) < RESULTS_HEADER_LEN {
            return Err(cdb_field(10, None, "allocation length below 16"));
        }
        Ok(SendResultsCdb {
            batch_tag: c.u64(2),
            alloc_len,
        })
    }
}

impl VendorCdb {
    /// Decodes any vendor CDB: exactly 16 bytes, reserved bytes and CONTROL zero.
    pub fn parse(cdb: &[u8]) -> Result<Self, VendorError> {
        let c: &[u8; CDB_LEN] = cdb
            .try_into()
            .map_err(|_| VendorError::CdbLength(cdb.len()))?;
        let c = CdbIn(c);
        let opcode = c.0[0];
        // NACA and LINK are not supported, so CONTROL must be zero.
        if c.0[15] != 0 {
            return Err(cdb_field(15, None, "CONTROL not zero"));
        }
        if c.0[14] != 0 {
            return Err(cdb_field(14, None, "reserved byte not zero"));
        }
        Ok(match opcode {
            op::SEND => VendorCdb::Send(SendCdb::parse(&c)?),
            op::RECEIVE => VendorCdb::Receive(ReceiveCdb::parse(&c)?),
            op::ACK => VendorCdb::Ack(AckCdb::parse(&c)?),
            op::REPLAY => VendorCdb::Replay(ReplayCdb::parse(&c)?),
            op::NODE => VendorCdb::Node(NodeCdb::parse(&c)?),
            op::SEND_RESULTS => VendorCdb::SendResults(SendResultsCdb::parse(&c)?),
            other => return Err(VendorError::UnsupportedOpcode(other)),
        })
    }

    /// The 16 CDB bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        match self {
            VendorCdb::Send(c) => c.encode(),
            VendorCdb::Receive(c) => c.encode(),
            VendorCdb::Ack(c) => c.encode(),
            VendorCdb::Replay(c) => c.encode(),
            VendorCdb::Node(c) => c.encode(),
            VendorCdb::SendResults(c) => c.encode(),
        }
    }

    /// Bytes of data-out the command carries (its parameter list length).
    #[must_use]
    pub fn data_out_len(&self) -> u32 {
        match *self {
            VendorCdb::Send(c) => c.param_len,
            VendorCdb::Ack(AckCdb::List { param_len })
            | VendorCdb::Node(NodeCdb::Register { param_len }) => param_len,
            _ => 0,
        }
    }

    /// Most bytes of data-in the command may return (its allocation length).
    #[must_use]
    pub fn alloc_len(&self) -> u32 {
        match *self {
            VendorCdb::Receive(c) => c.alloc_len,
            VendorCdb::Replay(c) => c.alloc_len,
            VendorCdb::SendResults(c) => c.alloc_len,
            VendorCdb::Node(
                NodeCdb::Query { alloc_len }
                | NodeCdb::RoutingTable { alloc_len }
                | NodeCdb::QueueStats { alloc_len },
            ) => alloc_len,
            _ => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// SEND data-out

/// One packet of a SEND.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRecord {
    /// Destination node; [`NodeAddr::UNSPECIFIED`] when `broadcast`.
    pub dest: NodeAddr,
    /// To every available node but the sender.
    pub broadcast: bool,
    /// Chosen by the sender; a retried id already stored keeps its first outcome.
    pub packet_id: u64,
    /// At most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

/// SEND flags bit 0.
pub const SEND_FLAG_BROADCAST: u16 = 1 << 0;

impl SendRecord {
    /// Bytes this record occupies in the list, padding included.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        SEND_RECORD_HEADER_LEN + self.payload.len() + pad_len(self.payload.len())
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.dest.0);
        put_u16(
            out,
            if self.broadcast {
                SEND_FLAG_BROADCAST
            } else {
                0
            },
        );
        put_u16(out, 0);
        put_u64(out, self.packet_id);
        put_u32(out, len32(self.payload.len()));
        put_u32(out, crc32c(&self.payload));
        put_payload(out, &self.payload);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, VendorError> {
        let at = r.pos;
        let dest = r.addr("destination")?;
        let broadcast = r.flags(2, SEND_FLAG_BROADCAST)? & SEND_FLAG_BROADCAST != 0;
        if broadcast && !dest.is_unspecified() {
            return Err(field(at, None, "BROADCAST with a destination"));
        }
        r.reserved(2)?;
        let packet_id = r.u64("packet id")?;
        let payload = read_payload(r)?;
        Ok(SendRecord {
            dest,
            broadcast,
            packet_id,
            payload,
        })
    }
}

/// Payload length (u32), CRC32C (u32), payload, padding: checked before any allocation.
fn read_payload(r: &mut Reader<'_>) -> Result<Vec<u8>, VendorError> {
    let len_at = r.pos;
    let len = r.u32("payload length")? as usize;
    if len > PAYLOAD_MAX {
        return Err(field(len_at, None, "payload longer than 65535"));
    }
    let crc_at = r.pos;
    let expected = r.u32("crc32c")?;
    let payload = r.take(len, "payload")?;
    let actual = crc32c(payload);
    if actual != expected {
        return Err(VendorError::Crc {
            offset: crc_at,
            expected,
            actual,
        });
    }
    r.pad(len)?;
    Ok(payload.to_vec())
}

/// SEND data-out: the "FP" list of packet records.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SendList {
    /// At most [`SEND_RECORDS_MAX`].
    pub records: Vec<SendRecord>,
}

impl SendList {
    /// The parameter list.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let len = SEND_HEADER_LEN
            + self
                .records
                .iter()
                .map(SendRecord::encoded_len)
                .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        put_magic(&mut out, b"FP", 0);
        put_u16(&mut out, count16(self.records.len()));
        put_u16(&mut out, 0);
        for rec in &self.records {
            rec.encode_into(&mut out);
        }
        out
    }

    /// Decodes and checks a parameter list; the whole of `data` must be the list.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        if data.len() > PARAM_LIST_MAX as usize {
            return Err(field(PARAM_LIST_MAX as usize, None, "list above 16 MiB"));
        }
        let mut r = Reader::new(data);
        r.magic(b"FP")?;
        r.reserved(1)?;
        let count = r.u16("record count")? as usize;
        if count > SEND_RECORDS_MAX {
            return Err(field(4, None, "more than 1024 records"));
        }
        r.reserved(2)?;
        // Capacity by what the data can hold, never by the count alone.
        let mut records = Vec::with_capacity(count.min(r.remaining() / SEND_RECORD_HEADER_LEN));
        for _ in 0..count {
            records.push(SendRecord::decode_from(&mut r)?);
        }
        r.end()?;
        Ok(SendList { records })
    }
}

// ---------------------------------------------------------------------------------------
// RECEIVE / REPLAY data-in

/// Flags of a delivered record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeliveryFlags {
    /// Sent as a broadcast (bit 0).
    pub broadcast: bool,
    /// Came in through the external port, not from a logged-in node (bit 1).
    pub from_external: bool,
    /// A notice from the target that a packet this node sent could not be delivered
    /// (bit 2); see [`DeliveredRecord::failure_notice`].
    pub failure_notice: bool,
}

impl DeliveryFlags {
    const KNOWN: u16 = 0b111;

    fn bits(self) -> u16 {
        u16::from(self.broadcast)
            | (u16::from(self.from_external) << 1)
            | (u16::from(self.failure_notice) << 2)
    }

    fn from_bits(b: u16) -> Self {
        DeliveryFlags {
            broadcast: b & 1 != 0,
            from_external: b & 2 != 0,
            failure_notice: b & 4 != 0,
        }
    }
}

/// One packet as RECEIVE and REPLAY return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveredRecord {
    /// Assigned by the target, per destination node, from 1.
    pub seq: u64,
    /// Sender, stamped by the target (for a failure notice: the unreachable destination).
    pub source: NodeAddr,
    /// Flags.
    pub flags: DeliveryFlags,
    /// The sender's packet id.
    pub packet_id: u64,
    /// When the target stored it, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// At most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

impl DeliveredRecord {
    /// Bytes this record occupies in the list, padding included.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        DELIVERED_HEADER_LEN + self.payload.len() + pad_len(self.payload.len())
    }

    /// A failure notice for packet `packet_id` this node sent to `dest`: its payload is
    /// the outcome code and three reserved bytes.
    #[must_use]
    pub fn notice(seq: u64, dest: NodeAddr, packet_id: u64, ts: u64, why: Outcome) -> Self {
        DeliveredRecord {
            seq,
            source: dest,
            flags: DeliveryFlags {
                failure_notice: true,
                ..DeliveryFlags::default()
            },
            packet_id,
            timestamp_ms: ts,
            payload: vec![why.code(), 0, 0, 0],
        }
    }

    /// The outcome a failure notice reports, `None` for an ordinary packet or a notice
    /// whose payload is not a known outcome.
    #[must_use]
    pub fn failure_notice(&self) -> Option<Outcome> {
        match (self.flags.failure_notice, self.payload.as_slice()) {
            (true, [code, 0, 0, 0]) => Outcome::from_code(*code),
            _ => None,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        put_u64(out, self.seq);
        out.extend_from_slice(&self.source.0);
        put_u16(out, self.flags.bits());
        put_u16(out, 0);
        put_u64(out, self.packet_id);
        put_u64(out, self.timestamp_ms);
        put_u32(out, len32(self.payload.len()));
        put_u32(out, crc32c(&self.payload));
        put_payload(out, &self.payload);
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<Self, VendorError> {
        let seq = r.u64("sequence number")?;
        let source = r.addr("source")?;
        let flags = DeliveryFlags::from_bits(r.flags(2, DeliveryFlags::KNOWN)?);
        r.reserved(2)?;
        let packet_id = r.u64("packet id")?;
        let timestamp_ms = r.u64("timestamp")?;
        let payload = read_payload(r)?;
        Ok(DeliveredRecord {
            seq,
            source,
            flags,
            packet_id,
            timestamp_ms,
            payload,
        })
    }
}

/// RECEIVE and REPLAY data-in: the "FR" list of delivered records.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecordList {
    /// More records are waiting than this response holds (flag bit 0).
    pub more: bool,
    /// Whole records only, at most 65535.
    pub records: Vec<DeliveredRecord>,
}

impl RecordList {
    /// The data-in bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let len = self.encoded_len();
        let mut out = Vec::with_capacity(len);
        put_magic(&mut out, b"FR", u8::from(self.more));
        put_u16(&mut out, count16(self.records.len()));
        put_u16(&mut out, 0);
        put_u32(&mut out, len32(len));
        for rec in &self.records {
            rec.encode_into(&mut out);
        }
        out
    }

    /// Bytes [`RecordList::encode`] produces: the target adds records while this stays
    /// within the allocation length.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        RECORD_LIST_HEADER_LEN
            + self
                .records
                .iter()
                .map(DeliveredRecord::encoded_len)
                .sum::<usize>()
    }

    /// Decodes data-in. `data` may run past the list (an initiator's whole buffer): the
    /// LIST LENGTH field says where it ends.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FR")?;
        let more = r.flags(1, 1)? & 1 != 0;
        let count = r.u16("record count")? as usize;
        r.reserved(2)?;
        let total = r.u32("list length")? as usize;
        if total < RECORD_LIST_HEADER_LEN {
            return Err(field(8, None, "list length below 12"));
        }
        if total > data.len() {
            return Err(VendorError::Truncated {
                offset: RECORD_LIST_HEADER_LEN,
                need: total - RECORD_LIST_HEADER_LEN,
                len: data.len(),
                what: "records",
            });
        }
        let mut r = Reader {
            buf: &data[..total],
            pos: RECORD_LIST_HEADER_LEN,
        };
        let mut records = Vec::with_capacity(count.min(r.remaining() / DELIVERED_HEADER_LEN));
        for _ in 0..count {
            records.push(DeliveredRecord::decode_from(&mut r)?);
        }
        r.end()?;
        Ok(RecordList { more, records })
    }
}

// ---------------------------------------------------------------------------------------
// ACK data-out

/// ACK data-out: a bare list of sequence numbers, 8 bytes each.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AckList {
    /// At most [`ACK_LIST_MAX`].
    pub seqs: Vec<u64>,
}

impl AckList {
    /// The parameter list.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        self.seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
    }

    /// Decodes a parameter list.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        if data.len() > ACK_LIST_MAX * 8 {
            return Err(field(
                ACK_LIST_MAX * 8,
                None,
                "more than 1024 sequence numbers",
            ));
        }
        let mut r = Reader::new(data);
        let mut seqs = Vec::with_capacity(data.len() / 8);
        while r.remaining() > 0 {
            seqs.push(r.u64("sequence number")?);
        }
        Ok(AckList { seqs })
    }
}

// ---------------------------------------------------------------------------------------
// NODE data

/// Reads `count` addresses, refusing `::` (it would match no packet).
fn read_addrs(r: &mut Reader<'_>, count: usize) -> Result<Vec<NodeAddr>, VendorError> {
    let mut addrs = Vec::with_capacity(count.min(r.remaining() / 16));
    for _ in 0..count {
        let at = r.pos;
        let a = r.addr("address")?;
        if a.is_unspecified() {
            return Err(field(at, None, "unspecified address"));
        }
        addrs.push(a);
    }
    Ok(addrs)
}

/// NODE REGISTER data-out: the "FA" address list that replaces this node's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AddressList {
    /// At most [`ADDRESSES_MAX`], none `::`.
    pub addrs: Vec<NodeAddr>,
}

impl AddressList {
    /// The parameter list.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LIST_HEADER_LEN + 16 * self.addrs.len());
        put_magic(&mut out, b"FA", 0);
        put_u16(&mut out, count16(self.addrs.len()));
        put_u16(&mut out, 0);
        for a in &self.addrs {
            out.extend_from_slice(&a.0);
        }
        out
    }

    /// Decodes a parameter list.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FA")?;
        r.reserved(1)?;
        let count = r.u16("address count")? as usize;
        if count > ADDRESSES_MAX {
            return Err(field(4, None, "more than 64 addresses"));
        }
        if count == 0 {
            // Every empty set would share the key `::` across unrelated initiators.
            return Err(field(4, None, "no address"));
        }
        r.reserved(2)?;
        let at = r.pos;
        let addrs = read_addrs(&mut r, count)?;
        if let Some(k) = addrs.iter().position(|a| !a.is_unicast()) {
            return Err(field(at + 16 * k, None, "not a unicast address"));
        }
        r.end()?;
        Ok(AddressList { addrs })
    }
}

/// Reads the count and total of a data-in list header (bytes 4-7), count <= total.
fn counts(r: &mut Reader<'_>) -> Result<(usize, u16), VendorError> {
    let count = r.u16("count")?;
    let total = r.u16("total")?;
    if count > total {
        return Err(field(4, None, "count above total"));
    }
    Ok((count as usize, total))
}

/// NODE QUERY data-in: the "FN" header with this node's state, then its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's state.
    pub state: NodeState,
    /// Addresses registered in all; `addrs` holds those that fit the allocation length.
    pub total: u16,
    /// Registered addresses.
    pub addrs: Vec<NodeAddr>,
}

impl NodeInfo {
    /// The data-in bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LIST_HEADER_LEN + 16 * self.addrs.len());
        put_magic(&mut out, b"FN", self.state.code());
        put_u16(&mut out, count16(self.addrs.len()));
        put_u16(&mut out, self.total);
        for a in &self.addrs {
            out.extend_from_slice(&a.0);
        }
        out
    }

    /// Decodes data-in (exactly the list: data-in lengths come from the residual).
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FN")?;
        let state = NodeState::from_code(r.u8("state")?)
            .ok_or_else(|| field(3, None, "undefined node state"))?;
        let (count, total) = counts(&mut r)?;
        let addrs = read_addrs(&mut r, count)?;
        r.end()?;
        Ok(NodeInfo {
            state,
            total,
            addrs,
        })
    }
}

/// State of a routing table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteState {
    /// Logged in and available (0).
    Available,
    /// Logged in, in maintenance (1).
    Maintenance,
    /// Registered earlier, not logged in now (2).
    Down,
}

impl RouteState {
    /// Wire code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            RouteState::Available => 0,
            RouteState::Maintenance => 1,
            RouteState::Down => 2,
        }
    }

    /// State of a wire code.
    #[must_use]
    pub const fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(RouteState::Available),
            1 => Some(RouteState::Maintenance),
            2 => Some(RouteState::Down),
            _ => None,
        }
    }
}

/// One routable address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// The address.
    pub addr: NodeAddr,
    /// State of the node that has it.
    pub state: RouteState,
    /// The node is the one asking (flag bit 0).
    pub local: bool,
    /// Routed to the external port rather than a logged-in node (flag bit 1).
    pub external: bool,
    /// Target-assigned id, equal for all addresses of one node.
    pub node_id: u32,
}

/// NODE ROUTING TABLE data-in: the "FT" list of route entries.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RouteList {
    /// Entries in all; `entries` holds those that fit the allocation length.
    pub total: u16,
    /// Entries.
    pub entries: Vec<RouteEntry>,
}

impl RouteList {
    /// The data-in bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LIST_HEADER_LEN + ROUTE_ENTRY_LEN * self.entries.len());
        put_magic(&mut out, b"FT", 0);
        put_u16(&mut out, count16(self.entries.len()));
        put_u16(&mut out, self.total);
        for e in &self.entries {
            out.extend_from_slice(&e.addr.0);
            out.push(e.state.code());
            out.push(u8::from(e.local) | (u8::from(e.external) << 1));
            put_u16(&mut out, 0);
            put_u32(&mut out, e.node_id);
        }
        out
    }

    /// Decodes data-in.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FT")?;
        r.reserved(1)?;
        let (count, total) = counts(&mut r)?;
        let mut entries = Vec::with_capacity(count.min(r.remaining() / ROUTE_ENTRY_LEN));
        for _ in 0..count {
            let addr = r.addr("address")?;
            let state_at = r.pos;
            let state = RouteState::from_code(r.u8("state")?)
                .ok_or_else(|| field(state_at, None, "undefined route state"))?;
            let flags = r.flags(1, 0b11)?;
            r.reserved(2)?;
            entries.push(RouteEntry {
                addr,
                state,
                local: flags & 1 != 0,
                external: flags & 2 != 0,
                node_id: r.u32("node id")?,
            });
        }
        r.end()?;
        Ok(RouteList { total, entries })
    }
}

/// NODE QUEUE STATS data-in ("FQ"): this node's receive queue. Sequence numbers start at
/// 1, so 0 means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Records stored and not acknowledged.
    pub queued_records: u64,
    /// Payload bytes of those records.
    pub queued_bytes: u64,
    /// Lowest unacknowledged sequence number.
    pub first_unacked: u64,
    /// Last sequence number RECEIVE returned.
    pub last_delivered: u64,
    /// Last sequence number assigned.
    pub last_assigned: u64,
    /// Payload bytes the queue may hold.
    pub capacity_bytes: u64,
}

impl QueueStats {
    /// The data-in bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(QUEUE_STATS_LEN);
        put_magic(&mut out, b"FQ", 0);
        put_u32(&mut out, 0);
        for v in [
            self.queued_records,
            self.queued_bytes,
            self.first_unacked,
            self.last_delivered,
            self.last_assigned,
            self.capacity_bytes,
        ] {
            put_u64(&mut out, v);
        }
        out
    }

    /// Decodes data-in.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FQ")?;
        r.reserved(5)?;
        let s = QueueStats {
            queued_records: r.u64("queued records")?,
            queued_bytes: r.u64("queued bytes")?,
            first_unacked: r.u64("first unacknowledged")?,
            last_delivered: r.u64("last delivered")?,
            last_assigned: r.u64("last assigned")?,
            capacity_bytes: r.u64("capacity")?,
        };
        r.end()?;
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------
// SEND RESULTS data-in

/// The outcome of one packet of a SEND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketResult {
    /// The sender's packet id.
    pub packet_id: u64,
    /// What became of it.
    pub outcome: Outcome,
}

/// SEND RESULTS data-in: the "FS" list, one entry per record of the SEND, in its order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SendResults {
    /// Tag of the SEND.
    pub batch_tag: u64,
    /// Records in the SEND; `results` holds those that fit the allocation length.
    pub total: u16,
    /// Outcomes.
    pub results: Vec<PacketResult>,
}

impl SendResults {
    /// The data-in bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(RESULTS_HEADER_LEN + RESULT_ENTRY_LEN * self.results.len());
        put_magic(&mut out, b"FS", 0);
        put_u16(&mut out, count16(self.results.len()));
        put_u16(&mut out, self.total);
        put_u64(&mut out, self.batch_tag);
        for p in &self.results {
            put_u64(&mut out, p.packet_id);
            out.push(p.outcome.code());
            out.extend_from_slice(&[0; 7]);
        }
        out
    }

    /// Decodes data-in.
    pub fn decode(data: &[u8]) -> Result<Self, VendorError> {
        let mut r = Reader::new(data);
        r.magic(b"FS")?;
        r.reserved(1)?;
        let (count, total) = counts(&mut r)?;
        if usize::from(total) > SEND_RECORDS_MAX {
            return Err(field(6, None, "more than 1024 records"));
        }
        let batch_tag = r.u64("batch tag")?;
        let mut results = Vec::with_capacity(count.min(r.remaining() / RESULT_ENTRY_LEN));
        for _ in 0..count {
            let packet_id = r.u64("packet id")?;
            let at = r.pos;
            let outcome = Outcome::from_code(r.u8("outcome")?)
                .ok_or_else(|| field(at, None, "undefined outcome"))?;
            r.reserved(7)?;
            results.push(PacketResult { packet_id, outcome });
        }
        r.end()?;
        Ok(SendResults {
            batch_tag,
            total,
            results,
        })
    }

    /// How the SEND these results describe completed.
    #[must_use]
    pub fn status(&self) -> SendStatus {
        SendStatus::of(self.results.iter().map(|p| p.outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> NodeAddr {
        NodeAddr::from(s.parse::<IpAddr>().expect("ip"))
    }

    fn packet(dest: &str, id: u64, payload: &[u8]) -> SendRecord {
        SendRecord {
            dest: addr(dest),
            broadcast: false,
            packet_id: id,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn addresses_map_ipv4() {
        let a = addr("192.0.2.7");
        assert_eq!(&a.0[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&a.0[12..], &[192, 0, 2, 7]);
        assert_eq!(a.ip(), "192.0.2.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(addr("2001:db8::1").to_string(), "2001:db8::1");
        assert_eq!(
            format!("{:?}", addr("::ffff:10.0.0.1")),
            "NodeAddr(10.0.0.1)"
        );
        assert!(NodeAddr::UNSPECIFIED.is_unspecified());
    }

    #[test]
    fn outcome_sense_table() {
        use key::*;
        let want = [
            (Outcome::Delivered, None),
            (Outcome::Accepted, Some((RECOVERED_ERROR, 0x80, 0x01))),
            (
                Outcome::UnknownDestination,
                Some((ABORTED_COMMAND, 0x80, 0x02)),
            ),
            (
                Outcome::DestinationDown,
                Some((ABORTED_COMMAND, 0x80, 0x03)),
            ),
            (
                Outcome::DestinationMaintenance,
                Some((ABORTED_COMMAND, 0x80, 0x04)),
            ),
        ];
        for (o, s) in want {
            assert_eq!(o.sense_code(), s, "{o:?}");
            assert_eq!(Outcome::from_code(o.code()), Some(o));
            let st = SendStatus::All(o);
            let sense = st.sense().map(|s| s.fixed()).unwrap_or_default();
            assert_eq!(SendStatus::from_reply(st.status(), &sense), Some(st));
            let sense = st.sense().map(|s| s.descriptor()).unwrap_or_default();
            assert_eq!(SendStatus::from_reply(st.status(), &sense), Some(st));
            if let Some((k, a, q)) = s {
                assert_eq!(Outcome::from_sense_code(k, a, q), Some(o));
            }
        }
        let mixed = SendStatus::Mixed.sense().expect("sense").fixed();
        assert_eq!(Sense::parse(&mixed), Some((RECOVERED_ERROR, 0x80, 0x10)));
        assert_eq!(
            SendStatus::from_reply(status::CHECK_CONDITION, &mixed),
            Some(SendStatus::Mixed)
        );
        assert_eq!(
            SendStatus::from_reply(status::BUSY, &[]),
            Some(SendStatus::MediaFull)
        );
        assert_eq!(
            SendStatus::from_reply(status::TASK_SET_FULL, &[]),
            Some(SendStatus::MediaFull)
        );
        let bad = common::INVALID_FIELD_IN_PARAM_LIST.fixed();
        assert_eq!(SendStatus::from_reply(status::CHECK_CONDITION, &bad), None);
        assert_eq!(Outcome::from_code(0x10), None);
        assert_eq!(
            SendStatus::of([Outcome::Accepted, Outcome::Accepted]),
            SendStatus::All(Outcome::Accepted)
        );
        assert_eq!(
            SendStatus::of([Outcome::Delivered, Outcome::DestinationDown]),
            SendStatus::Mixed
        );
        assert_eq!(SendStatus::of([]), SendStatus::All(Outcome::Delivered));
    }

    #[test]
    fn send_list_layout() {
        let l = SendList {
            records: vec![packet("192.0.2.7", 1, b"ping")],
        };
        let b = l.encode();
        assert_eq!(b.len(), 48);
        assert_eq!(&b[..8], b"FP\x01\x00\x00\x01\x00\x00");
        assert_eq!(&b[8 + 28..8 + 32], &4u32.to_be_bytes());
        assert_eq!(&b[8 + 32..8 + 36], &crc32c(b"ping").to_be_bytes());
        assert_eq!(SendList::decode(&b), Ok(l));
        // An odd payload is padded with zeros to 4 bytes.
        let l = SendList {
            records: vec![packet("2001:db8::2", 2, b"abcde")],
        };
        let b = l.encode();
        assert_eq!(b.len(), 8 + 36 + 8);
        assert_eq!(&b[49..52], &[0, 0, 0]);
        assert_eq!(SendList::decode(&b), Ok(l));
    }

    fn err_at(e: Result<impl fmt::Debug, VendorError>) -> (usize, VendorError) {
        let e = e.expect_err("must fail");
        let off = match e {
            VendorError::Truncated { offset, .. }
            | VendorError::ParamField { offset, .. }
            | VendorError::Crc { offset, .. } => offset,
            VendorError::CdbField { byte, .. } => usize::from(byte),
            _ => usize::MAX,
        };
        (off, e)
    }

    #[test]
    fn hostile_send_lists() {
        let good = SendList {
            records: vec![
                packet("192.0.2.7", 1, b"ping"),
                packet("192.0.2.8", 2, b"x"),
            ],
        }
        .encode();
        // Every truncation fails, at or before the cut, without panicking.
        for n in 0..good.len() {
            let (off, e) = err_at(SendList::decode(&good[..n]));
            assert!(off <= n, "cut {n}: {e:?}");
        }
        let patched = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            SendList::decode(&b)
        };
        assert_eq!(err_at(patched(0, b"FX")).0, 0);
        assert_eq!(err_at(patched(2, &[2])).0, 2);
        assert_eq!(err_at(patched(3, &[1])).0, 3);
        // Oversized count: refused before any allocation by it.
        let (off, e) = err_at(patched(4, &[0xff, 0xff]));
        assert_eq!(off, 4);
        assert_eq!(
            e.sense().field.map(|f| (f.in_cdb, f.byte)),
            Some((false, 4))
        );
        // A count above the records present is a truncation, below leaves extra bytes.
        assert!(matches!(
            err_at(patched(4, &[0, 3])).1,
            VendorError::Truncated { .. }
        ));
        assert_eq!(err_at(patched(4, &[0, 1])).0, 8 + 40);
        // Oversized payload length.
        let (off, e) = err_at(patched(8 + 28, &[0, 1, 0, 0]));
        assert_eq!((off, e.sense().asc), (8 + 28, 0x26));
        // A length beyond the data, within the limit.
        assert!(matches!(
            err_at(patched(8 + 28, &[0, 0, 0xff, 0xff])).1,
            VendorError::Truncated { offset: 44, .. }
        ));
        // Bad CRC: ABORTED COMMAND, offset of the crc field in INFORMATION.
        let (off, e) = err_at(patched(8 + 36, b"pong"));
        assert_eq!(off, 8 + 32);
        let s = e.sense();
        assert_eq!((s.key, s.asc, s.ascq, s.info), (0xb, 0x47, 0x01, Some(40)));
        // Reserved flag bit 15 names byte 16 bit 7; bit 1 names byte 17 bit 1.
        assert_eq!(
            patched(8 + 16, &[0x80, 0]).expect_err("flag"),
            VendorError::ParamField {
                offset: 24,
                bit: Some(7),
                what: "reserved flag set"
            }
        );
        let e = patched(8 + 16, &[0, 2]).expect_err("flag");
        assert_eq!(
            e.sense().field.map(|f| (f.byte, f.bit)),
            Some((25, Some(1)))
        );
        // BROADCAST with a destination, reserved field, non-zero padding.
        assert_eq!(err_at(patched(8 + 16, &[0, 1])).0, 8);
        assert_eq!(err_at(patched(8 + 19, &[1])).0, 27);
        assert_eq!(err_at(patched(48 + 36 + 1, &[1])).0, 85);
        // Trailing bytes.
        let mut b = good.clone();
        b.extend_from_slice(&[0; 4]);
        assert_eq!(err_at(SendList::decode(&b)).0, good.len());
    }

    #[test]
    fn limits() {
        let big = SendList {
            records: vec![packet("192.0.2.7", 1, &vec![7u8; PAYLOAD_MAX])],
        };
        assert_eq!(SendList::decode(&big.encode()), Ok(big));
        let many = SendList {
            records: (0..SEND_RECORDS_MAX as u64)
                .map(|i| packet("192.0.2.7", i, b""))
                .collect(),
        };
        assert_eq!(
            SendList::decode(&many.encode()).map(|l| l.records.len()),
            Ok(1024)
        );
        let mut too_many = many.clone();
        too_many.records.push(packet("192.0.2.7", 0, b""));
        assert_eq!(err_at(SendList::decode(&too_many.encode())).0, 4);
        let acks = AckList {
            seqs: (0..1025).collect(),
        };
        assert_eq!(err_at(AckList::decode(&acks.encode())).0, 8192);
        assert!(matches!(
            AckList::decode(&[0; 12]),
            Err(VendorError::Truncated { offset: 8, .. })
        ));
        let addrs = AddressList {
            addrs: (0..65u32)
                .map(|i| NodeAddr::from(Ipv4Addr::from(i + 1)))
                .collect(),
        };
        assert_eq!(err_at(AddressList::decode(&addrs.encode())).0, 4);
        let zero = AddressList {
            addrs: vec![NodeAddr::UNSPECIFIED],
        };
        assert_eq!(err_at(AddressList::decode(&zero.encode())).0, 8);
        // Offsets past 64 KiB stay in INFORMATION only.
        let e = VendorError::ParamField {
            offset: 70_000,
            bit: None,
            what: "x",
        };
        assert_eq!((e.sense().field, e.sense().info), (None, Some(70_000)));
    }

    #[test]
    fn hostile_record_lists() {
        let l = RecordList {
            more: true,
            records: vec![DeliveredRecord {
                seq: 9,
                source: addr("192.0.2.8"),
                flags: DeliveryFlags {
                    broadcast: true,
                    ..DeliveryFlags::default()
                },
                packet_id: 3,
                timestamp_ms: 1_700_000_000_000,
                payload: b"hello".to_vec(),
            }],
        };
        let b = l.encode();
        assert_eq!(b.len(), 12 + 52 + 8);
        assert_eq!(&b[8..12], &72u32.to_be_bytes());
        // A whole allocation-length buffer decodes: the list length bounds it.
        let mut padded = b.clone();
        padded.resize(4096, 0xee);
        assert_eq!(RecordList::decode(&padded), Ok(l.clone()));
        for n in 0..b.len() {
            assert!(RecordList::decode(&b[..n]).is_err(), "cut {n}");
        }
        let patched = |at: usize, v: &[u8]| {
            let mut x = b.clone();
            x[at..at + v.len()].copy_from_slice(v);
            RecordList::decode(&x)
        };
        assert_eq!(err_at(patched(0, b"FP")).0, 0);
        assert_eq!(err_at(patched(3, &[2])).0, 3);
        assert!(matches!(
            err_at(patched(4, &[0xff, 0xff])).1,
            VendorError::Truncated { .. }
        ));
        assert_eq!(err_at(patched(8, &[0, 0, 0, 4])).0, 8);
        assert!(matches!(
            err_at(patched(8, &[0xff, 0xff, 0xff, 0xff])).1,
            VendorError::Truncated { .. }
        ));
        assert_eq!(err_at(patched(12 + 24, &[0, 8])).0, 12 + 25);
        assert!(matches!(
            err_at(patched(12 + 52, b"j")).1,
            VendorError::Crc { offset: 60, .. }
        ));
        let n = DeliveredRecord::notice(4, addr("192.0.2.9"), 77, 5, Outcome::DestinationDown);
        assert_eq!(n.failure_notice(), Some(Outcome::DestinationDown));
        assert_eq!(l.records[0].failure_notice(), None);
    }

    #[test]
    fn cdb_errors_point_at_fields() {
        let send = SendCdb {
            batch_tag: 1,
            param_len: 48,
        }
        .encode();
        let patched = |at: usize, v: u8| {
            let mut c = send.clone();
            c[at] = v;
            VendorCdb::parse(&c)
        };
        assert_eq!(err_at(patched(15, 4)).0, 15);
        assert_eq!(err_at(patched(14, 1)).0, 14);
        assert_eq!(err_at(patched(1, 1)).0, 1);
        assert_eq!(err_at(patched(10, 2)).0, 10); // 32 MiB
        assert_eq!(
            patched(0, 0xc6).expect_err("opcode").sense(),
            common::INVALID_OPCODE.cdb_field(0, None)
        );
        assert_eq!(
            VendorCdb::parse(&send[..10]),
            Err(VendorError::CdbLength(10))
        );
        assert_eq!(VendorCdb::parse(&[]), Err(VendorError::CdbLength(0)));
        let node = |b1: u8, b2: u8| {
            let mut c = vec![0u8; 16];
            c[0] = op::NODE;
            c[1] = b1;
            c[2] = b2;
            VendorCdb::parse(&c)
        };
        assert_eq!(
            node(5, 0)
                .expect_err("sa")
                .sense()
                .field
                .map(|f| (f.byte, f.bit)),
            Some((1, Some(4)))
        );
        assert_eq!(
            node(0x21, 0).expect_err("bit 5"),
            cdb_field(1, Some(5), "reserved bit set")
        );
        assert_eq!(err_at(node(1, 2)).0, 2);
        assert_eq!(err_at(node(2, 1)).0, 2);
        assert_eq!(
            node(1, 1),
            Ok(VendorCdb::Node(NodeCdb::SetState(NodeState::Maintenance)))
        );
        let recv = |b1: u8, alloc: u32, timeout: u16| {
            VendorCdb::parse(
                &ReceiveCdb {
                    wait: false,
                    max_records: 0,
                    alloc_len: alloc,
                    timeout,
                }
                .encode()
                .iter()
                .enumerate()
                .map(|(i, &b)| if i == 1 { b1 } else { b })
                .collect::<Vec<_>>(),
            )
        };
        assert_eq!(err_at(recv(0, 4096, 10)).0, 10);
        assert_eq!(err_at(recv(0, 11, 0)).0, 6);
        assert!(recv(0, 0, 0).is_ok());
        assert!(recv(1, 4096, 10).is_ok());
        assert_eq!(err_at(recv(2, 4096, 0)).0, 1);
        let ack = |b1: u8, len: u32| {
            let mut c = AckCdb::List { param_len: len }.encode();
            c[1] = b1;
            VendorCdb::parse(&c)
        };
        assert_eq!(err_at(ack(1, 12)).0, 10);
        assert_eq!(err_at(ack(1, 8200)).0, 10);
        assert_eq!(err_at(ack(0, 8)).0, 10);
        assert!(ack(1, 8192).is_ok());
    }

    fn arb_addr() -> impl Strategy<Value = NodeAddr> {
        any::<[u8; 16]>().prop_map(NodeAddr)
    }

    fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    fn arb_outcome() -> impl Strategy<Value = Outcome> {
        proptest::sample::select(Outcome::ALL.to_vec())
    }

    fn arb_cdb() -> impl Strategy<Value = VendorCdb> {
        prop_oneof![
            (any::<u64>(), 8..=PARAM_LIST_MAX).prop_map(|(batch_tag, param_len)| {
                VendorCdb::Send(SendCdb {
                    batch_tag,
                    param_len,
                })
            }),
            (any::<bool>(), any::<u32>(), 12..=u32::MAX, any::<u16>()).prop_map(
                |(wait, max_records, alloc_len, t)| VendorCdb::Receive(ReceiveCdb {
                    wait,
                    max_records,
                    alloc_len,
                    timeout: if wait { t } else { 0 },
                })
            ),
            any::<u64>().prop_map(|s| VendorCdb::Ack(AckCdb::UpTo(s))),
            (0..=ACK_LIST_MAX as u32)
                .prop_map(|n| VendorCdb::Ack(AckCdb::List { param_len: n * 8 })),
            (any::<bool>(), any::<u64>(), 12..=u32::MAX).prop_map(|(t, v, alloc_len)| {
                VendorCdb::Replay(ReplayCdb {
                    from: if t {
                        ReplayFrom::Time(v)
                    } else {
                        ReplayFrom::Seq(v)
                    },
                    alloc_len,
                })
            }),
            (8..=REGISTER_LIST_MAX)
                .prop_map(|param_len| VendorCdb::Node(NodeCdb::Register { param_len })),
            any::<bool>().prop_map(|m| VendorCdb::Node(NodeCdb::SetState(if m {
                NodeState::Maintenance
            } else {
                NodeState::Available
            }))),
            (8..=u32::MAX, 0..3u8).prop_map(|(alloc_len, k)| VendorCdb::Node(match k {
                0 => NodeCdb::Query { alloc_len },
                1 => NodeCdb::RoutingTable { alloc_len },
                _ => NodeCdb::QueueStats { alloc_len },
            })),
            (any::<u64>(), 16..=u32::MAX).prop_map(|(batch_tag, alloc_len)| {
                VendorCdb::SendResults(SendResultsCdb {
                    batch_tag,
                    alloc_len,
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn cdbs_round_trip(c in arb_cdb()) {
            let b = c.encode();
            prop_assert_eq!(b.len(), CDB_LEN);
            prop_assert_eq!(VendorCdb::parse(&b), Ok(c));
        }

        #[test]
        fn send_lists_round_trip(
            recs in proptest::collection::vec(
                (arb_addr(), any::<bool>(), any::<u64>(), arb_payload()), 0..8)
        ) {
            let l = SendList {
                records: recs
                    .into_iter()
                    .map(|(dest, broadcast, packet_id, payload)| SendRecord {
                        dest: if broadcast { NodeAddr::UNSPECIFIED } else { dest },
                        broadcast,
                        packet_id,
                        payload,
                    })
                    .collect(),
            };
            let b = l.encode();
            prop_assert_eq!(b.len() % 4, 0);
            prop_assert_eq!(SendList::decode(&b), Ok(l));
        }

        #[test]
        fn record_lists_round_trip(
            more in any::<bool>(),
            recs in proptest::collection::vec(
                (any::<u64>(), arb_addr(), 0..8u16, any::<u64>(), any::<u64>(), arb_payload()),
                0..8)
        ) {
            let l = RecordList {
                more,
                records: recs
                    .into_iter()
                    .map(|(seq, source, f, packet_id, timestamp_ms, payload)| DeliveredRecord {
                        seq,
                        source,
                        flags: DeliveryFlags::from_bits(f),
                        packet_id,
                        timestamp_ms,
                        payload,
                    })
                    .collect(),
            };
            let b = l.encode();
            prop_assert_eq!(b.len(), l.encoded_len());
            prop_assert_eq!(RecordList::decode(&b), Ok(l));
        }

        #[test]
        fn small_lists_round_trip(
            seqs in proptest::collection::vec(any::<u64>(), 0..40),
            addrs in proptest::collection::vec(arb_addr(), 0..ADDRESSES_MAX),
            extra in 0..4u16,
            maint in any::<bool>(),
            routes in proptest::collection::vec(
                (arb_addr(), 0..3u8, 0..4u8, any::<u32>()), 0..20),
            stats in any::<[u64; 6]>(),
            tag in any::<u64>(),
            results in proptest::collection::vec((any::<u64>(), arb_outcome()), 0..40),
        ) {
            let addrs: Vec<NodeAddr> =
                addrs.into_iter().filter(|a| !a.is_unspecified()).collect();
            let a = AckList { seqs };
            prop_assert_eq!(AckList::decode(&a.encode()), Ok(a));
            // NODE REGISTER takes one to 64 unicast addresses; anything else is refused.
            let a = AddressList { addrs: addrs.clone() };
            if !addrs.is_empty() && addrs.iter().all(NodeAddr::is_unicast) {
                prop_assert_eq!(AddressList::decode(&a.encode()), Ok(a));
            } else {
                prop_assert!(AddressList::decode(&a.encode()).is_err());
            }
            let n = NodeInfo {
                state: if maint { NodeState::Maintenance } else { NodeState::Available },
                total: addrs.len() as u16 + extra,
                addrs,
            };
            prop_assert_eq!(NodeInfo::decode(&n.encode()), Ok(n));
            let t = RouteList {
                total: routes.len() as u16 + extra,
                entries: routes
                    .into_iter()
                    .map(|(addr, s, f, node_id)| RouteEntry {
                        addr,
                        state: RouteState::from_code(s).unwrap_or(RouteState::Down),
                        local: f & 1 != 0,
                        external: f & 2 != 0,
                        node_id,
                    })
                    .collect(),
            };
            prop_assert_eq!(RouteList::decode(&t.encode()), Ok(t));
            let q = QueueStats {
                queued_records: stats[0],
                queued_bytes: stats[1],
                first_unacked: stats[2],
                last_delivered: stats[3],
                last_assigned: stats[4],
                capacity_bytes: stats[5],
            };
            prop_assert_eq!(q.encode().len(), QUEUE_STATS_LEN);
            prop_assert_eq!(QueueStats::decode(&q.encode()), Ok(q));
            let r = SendResults {
                batch_tag: tag,
                total: results.len() as u16 + extra,
                results: results
                    .into_iter()
                    .map(|(packet_id, outcome)| PacketResult { packet_id, outcome })
                    .collect(),
            };
            prop_assert_eq!(SendResults::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = VendorCdb::parse(&data);
            let _ = SendList::decode(&data);
            let _ = RecordList::decode(&data);
            let _ = AckList::decode(&data);
            let _ = AddressList::decode(&data);
            let _ = NodeInfo::decode(&data);
            let _ = RouteList::decode(&data);
            let _ = QueueStats::decode(&data);
            let _ = SendResults::decode(&data);
        }

        #[test]
        fn decoders_never_panic_past_the_magic(
            magic in proptest::sample::select(vec![*b"FP", *b"FR", *b"FA", *b"FN", *b"FT", *b"FQ", *b"FS"]),
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut d = vec![magic[0], magic[1], VERSION];
            d.extend_from_slice(&data);
            let _ = SendList::decode(&d);
            let _ = RecordList::decode(&d);
            let _ = AddressList::decode(&d);
            let _ = NodeInfo::decode(&d);
            let _ = RouteList::decode(&d);
            let _ = QueueStats::decode(&d);
            let _ = SendResults::decode(&d);
        }

        #[test]
        fn cdb_fields_never_panic(
            opcode in op::SEND..=0xc7u8,
            rest in any::<[u8; 15]>(),
        ) {
            let mut c = vec![opcode];
            c.extend_from_slice(&rest);
            if let Err(e) = VendorCdb::parse(&c) {
                let s = e.sense();
                prop_assert!(s.key == key::ILLEGAL_REQUEST);
            }
        }
    }
}
