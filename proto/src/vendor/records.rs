//! The vendor parameter data: SEND's packet list, RECEIVE and REPLAY's record list, ACK's
//! list, NODE's address lists, node, route and queue information, SEND RESULTS.

use super::*;

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

    pub(super) fn from_bits(b: u16) -> Self {
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
