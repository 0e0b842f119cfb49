//! The vendor CDBs: one type per command, decoded from and encoded to the 16-byte CDB.

use super::*;

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

pub(super) fn cdb_field(byte: usize, bit: Option<u8>, what: &'static str) -> VendorError {
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
