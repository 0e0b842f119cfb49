//! The log's records on the volume: the 24-byte header (magic, version, kind, sequence
//! number, body length, crc32c), packet and ACK bodies, and reading them back by position.

use super::*;

pub(super) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
pub(super) fn le32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
pub(super) fn addr(b: &[u8], o: usize) -> NodeAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    NodeAddr(a)
}

pub(super) fn encode_record(kind: u16, seq: u64, body: &[u8], bs: u64) -> Vec<u8> {
    let len = (HDR + body.len()).div_ceil(bs as usize) * bs as usize;
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&MAGIC.to_le_bytes());
    r.extend_from_slice(&VERSION.to_le_bytes());
    r.extend_from_slice(&kind.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(body);
    let crc = crc32c::crc32c(&r);
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r.resize(len, 0);
    r
}

pub(super) fn packet_body(p: &NewPacket, ts_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(PKT_FIXED + p.payload.len());
    b.extend_from_slice(&p.node.0);
    b.extend_from_slice(&p.dest.0);
    b.extend_from_slice(&p.source.0);
    b.extend_from_slice(&p.sender.0);
    b.extend_from_slice(&p.packet_id.to_le_bytes());
    b.extend_from_slice(&ts_ms.to_le_bytes());
    b.extend_from_slice(&p.flags.to_le_bytes());
    b.extend_from_slice(&(p.payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&p.payload);
    b
}

pub(super) fn parse_packet(seq: u64, body: &[u8]) -> Option<Packet> {
    if body.len() < PKT_FIXED {
        return None;
    }
    let n = le32(body, 82) as usize;
    if body.len() != PKT_FIXED + n {
        return None;
    }
    Some(Packet {
        seq,
        node: addr(body, 0),
        dest: addr(body, 16),
        source: addr(body, 32),
        sender: addr(body, 48),
        packet_id: le64(body, 64),
        ts_ms: le64(body, 72),
        flags: u16::from_le_bytes([body[80], body[81]]),
        payload: body[PKT_FIXED..].to_vec(),
    })
}

pub(super) fn ack_body(node: NodeAddr, upto: u64, list: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + list.len() * 8);
    b.extend_from_slice(&node.0);
    b.extend_from_slice(&upto.to_le_bytes());
    b.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for s in list {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

pub(super) fn parse_ack(body: &[u8]) -> Option<(NodeAddr, u64, Vec<u64>)> {
    if body.len() < 28 {
        return None;
    }
    let n = le32(body, 24) as usize;
    if body.len() != 28 + n * 8 {
        return None;
    }
    Some((
        addr(body, 0),
        le64(body, 16),
        (0..n).map(|i| le64(body, 28 + i * 8)).collect(),
    ))
}

/// A record header read from the log.
pub(super) struct Hdr {
    pub(super) kind: u16,
    pub(super) seq: u64,
    pub(super) body_len: usize,
}

impl PacketQueue {
    pub(super) fn lba(&self, pos: u64) -> u64 {
        1 + (pos % self.cap) / self.bs
    }

    pub(super) fn read_at(&self, pos: u64, buf: &mut [u8]) -> Result<(), QueueError> {
        self.cache.read(self.volume, self.lba(pos), buf)?;
        Ok(())
    }

    /// Reads the header at `pos` if a valid record of sequence `want` starts there.
    pub(super) fn header(
        &self,
        pos: u64,
        want: Option<u64>,
    ) -> Result<Option<(Hdr, Vec<u8>)>, QueueError> {
        let mut first = vec![0u8; self.bs as usize];
        self.read_at(pos, &mut first)?;
        if le32(&first, 0) != MAGIC || u16::from_le_bytes([first[4], first[5]]) != VERSION {
            return Ok(None);
        }
        let h = Hdr {
            kind: u16::from_le_bytes([first[6], first[7]]),
            seq: le64(&first, 8),
            body_len: le32(&first, 16) as usize,
        };
        if want.is_some_and(|w| w != h.seq) {
            return Ok(None);
        }
        let room = self.cap - pos % self.cap;
        if (HDR + h.body_len) as u64 > room {
            return Ok(None);
        }
        Ok(Some((h, first)))
    }

    /// Reads and verifies a whole record; returns its header and body.
    pub(super) fn record(
        &self,
        pos: u64,
        want: Option<u64>,
    ) -> Result<Option<(Hdr, Vec<u8>)>, QueueError> {
        let Some((h, first)) = self.header(pos, want)? else {
            return Ok(None);
        };
        let len = (HDR + h.body_len).div_ceil(self.bs as usize) * self.bs as usize;
        let mut r = first;
        if len > r.len() {
            let mut rest = vec![0u8; len - r.len()];
            self.read_at(pos + r.len() as u64, &mut rest)?;
            r.extend_from_slice(&rest);
        }
        let want_crc = le32(&r, 20);
        r[20..24].fill(0);
        if crc32c::crc32c(&r[..HDR + h.body_len]) != want_crc {
            return Ok(None);
        }
        let body = r[HDR..HDR + h.body_len].to_vec();
        Ok(Some((h, body)))
    }

    pub(super) fn rec_len(&self, body_len: usize) -> u64 {
        ((HDR + body_len) as u64).div_ceil(self.bs) * self.bs
    }
}
