//! The ring's on-disk format: the superblock (two copies, the newer valid one wins) and
//! each record's header, with their magic, version and crc32c (docs/design.md).

use super::*;

impl WriteCache {
    pub(super) fn write_superblock(
        &self,
        tail: u64,
        tail_seq: u64,
        sb_seq: u64,
    ) -> Result<(), MediaError> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(SB_MAGIC);
        b.extend_from_slice(&u32::from(VERSION).to_le_bytes());
        b.extend_from_slice(&sb_seq.to_le_bytes());
        b.extend_from_slice(&self.ring.to_le_bytes());
        b.extend_from_slice(&tail.to_le_bytes());
        b.extend_from_slice(&tail_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let slot = (sb_seq % 2) * SB_LEN;
        self.put(slot, &b)?;
        self.map
            .flush_range(slot as usize, SB_LEN as usize)
            .map_err(MediaError::Io)
    }

    /// The valid superblock with the highest sequence: (tail, tail seq, sb seq).
    pub(super) fn read_superblock(&self) -> Option<(u64, u64, u64)> {
        let mut best = None;
        for slot in 0..2u64 {
            // magic 8, version 4, sb seq 8, ring 8, tail 8, tail seq 8, then the crc.
            let mut b = [0u8; 48];
            self.get(slot * SB_LEN, &mut b);
            if &b[..8] != SB_MAGIC
                || crc32c::crc32c(&b[..44]) != u32::from_le_bytes([b[44], b[45], b[46], b[47]])
            {
                continue;
            }
            let rd = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
            let (sb_seq, ring, tail, tail_seq) = (rd(12), rd(20), rd(28), rd(36));
            if ring != self.ring {
                continue;
            }
            if best.is_none_or(|(_, _, s)| sb_seq > s) {
                best = Some((tail, tail_seq, sb_seq));
            }
        }
        best
    }

    /// Parses the record at log position `pos`, expecting sequence `seq`.
    pub(super) fn parse_record(&self, pos: u64, seq: u64) -> Option<(u16, u32, u64, Vec<u8>)> {
        let phys = self.phys(pos);
        if RING_START + self.ring - phys < HDR_LEN {
            return None;
        }
        let mut h = [0u8; HDR_LEN as usize];
        self.get(phys, &mut h);
        let u32at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32at(0) != REC_MAGIC || u16::from_le_bytes([h[4], h[5]]) != VERSION {
            return None;
        }
        let kind = u16::from_le_bytes([h[6], h[7]]);
        if u64at(8) != seq {
            return None;
        }
        let (volume, len, lba) = (u32at(16), u64::from(u32at(20)), u64at(24));
        if len > self.ring || phys + HDR_LEN + len > RING_START + self.ring {
            return None;
        }
        let want = u32at(40);
        let mut payload = vec![0u8; len as usize];
        self.get(phys + HDR_LEN, &mut payload);
        h[40..44].fill(0);
        let mut c = crc32c::crc32c(&h);
        c = crc32c::crc32c_append(c, &payload);
        (c == want).then_some((kind, volume, lba, payload))
    }

    pub(super) fn header(
        &self,
        kind: u16,
        seq: u64,
        volume: u32,
        lba: u64,
        payload: &[u8],
    ) -> [u8; HDR_LEN as usize] {
        let mut h = [0u8; HDR_LEN as usize];
        h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&volume.to_le_bytes());
        h[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[24..32].copy_from_slice(&lba.to_le_bytes());
        let mut c = crc32c::crc32c(&h);
        c = crc32c::crc32c_append(c, payload);
        h[40..44].copy_from_slice(&c.to_le_bytes());
        h
    }
}
