//! The bytes on each mirror file: the header, the block data and its crc32c area, and
//! the two metadata slots at the end (docs/design.md). Pure encoding, no I/O.

use super::MirrorSet;

pub(super) const MAGIC: &[u8; 8] = b"FTSSMIR1";
/// Version 2 added the metadata area at the end of the file.
pub(super) const VERSION: u32 = 2;
pub(super) const HEADER_LEN: u64 = 4096;
/// Bytes of the header that the crc covers.
pub(super) const HEADER_BODY: usize = 8 + 4 + 4 + 16 + 4 + 8 + 8;

/// Each of the two metadata slots (A and B) takes this many bytes.
pub(super) const META_SLOT: u64 = 64 << 10;
/// The metadata area starts on this boundary, so neither slot shares a sector or a page
/// with the crc area or with the other slot: a torn write of one slot cannot touch the
/// other.
pub(super) const META_ALIGN: u64 = 4096;
pub(super) const META_MAGIC: &[u8; 8] = b"FTSSMETA";
pub(super) const META_VERSION: u32 = 1;
/// Record header: magic, version u32, payload length u32, generation u64, crc32c u32,
/// reserved u32.
pub(super) const META_HEAD: usize = 8 + 4 + 4 + 8 + 4 + 4;
/// Bytes of the record header the crc covers (everything before the crc field).
pub(super) const META_CRC_AT: usize = 8 + 4 + 4 + 8;
/// Largest payload [`MirrorSet::write_meta`] takes.
pub const META_MAX: usize = META_SLOT as usize - META_HEAD;

/// The checksum slot of a block that holds no data: never written, or deallocated by
/// [`MirrorSet::deallocate`]. Such a block must read as zeros, and GET LBA STATUS reports
/// it deallocated. A real crc32c of 0 is stored as 1 (see [`MirrorSet::write`]).
pub const DEALLOCATED: u32 = 0;

/// Where the metadata area starts and how long a mirror file is, for a volume of `blocks`
/// x `block_size` bytes; `None` if that overflows.
pub(super) fn layout(blocks: u64, block_size: u32) -> Option<(u64, u64)> {
    let end_of_crcs = blocks
        .checked_mul(u64::from(block_size))?
        .checked_add(blocks.checked_mul(4)?)?
        .checked_add(HEADER_LEN)?;
    let meta_off = end_of_crcs.checked_next_multiple_of(META_ALIGN)?;
    Some((meta_off, meta_off.checked_add(2 * META_SLOT)?))
}

/// The newest metadata record: what [`MirrorSet::read_meta`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MetaRecord {
    pub(super) generation: u64,
    pub(super) payload: Vec<u8>,
}

pub(super) fn encode_meta(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(META_HEAD + payload.len());
    r.extend_from_slice(META_MAGIC);
    r.extend_from_slice(&META_VERSION.to_le_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&generation.to_le_bytes());
    debug_assert_eq!(r.len(), META_CRC_AT);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&r), payload);
    r.extend_from_slice(&crc.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(payload);
    r
}

/// The record in one slot, if it is whole: a torn or never written slot fails the magic,
/// the length bound or the crc and reads as empty.
pub(super) fn parse_meta(slot: &[u8]) -> Option<MetaRecord> {
    if slot.len() < META_HEAD || &slot[..8] != META_MAGIC {
        return None;
    }
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(slot.get(at..at + 4)?.try_into().ok()?))
    };
    let len = u32_at(12)? as usize;
    let generation = u64::from_le_bytes(slot.get(16..24)?.try_into().ok()?);
    let payload = slot.get(META_HEAD..META_HEAD.checked_add(len)?)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&slot[..META_CRC_AT]), payload);
    if u32_at(8)? != META_VERSION || len > META_MAX || u32_at(META_CRC_AT)? != crc {
        return None;
    }
    Some(MetaRecord {
        generation,
        payload: payload.to_vec(),
    })
}

pub(super) fn header(
    set_id: &[u8; 16],
    index: u32,
    block_size: u32,
    blocks: u64,
    epoch: u64,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&index.to_le_bytes());
    h.extend_from_slice(set_id);
    h.extend_from_slice(&block_size.to_le_bytes());
    h.extend_from_slice(&blocks.to_le_bytes());
    h.extend_from_slice(&epoch.to_le_bytes());
    debug_assert_eq!(h.len(), HEADER_BODY);
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h.resize(HEADER_LEN as usize, 0);
    h
}

pub(super) struct Header {
    pub(super) set_id: [u8; 16],
    pub(super) block_size: u32,
    pub(super) blocks: u64,
    pub(super) epoch: u64,
}

/// The header, or why the file is not a mirror of this format.
pub(super) fn parse_header(h: &[u8]) -> Result<Header, String> {
    let foreign = || "not an ftss mirror file (foreign or corrupt header)".to_owned();
    if h.len() < HEADER_LEN as usize || &h[..8] != MAGIC {
        return Err(foreign());
    }
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let u64_at = |at: usize| u64::from(u32_at(at)) | u64::from(u32_at(at + 4)) << 32;
    if crc32c::crc32c(&h[..HEADER_BODY]) != u32_at(HEADER_BODY) {
        return Err(foreign());
    }
    let version = u32_at(8);
    if version != VERSION {
        // Say so plainly: an older file is ours, just not of this layout.
        return Err(format!(
            "mirror format version {version}, this build reads version {VERSION} \
             (version 2 added the metadata area): recreate the mirror set"
        ));
    }
    let mut set_id = [0u8; 16];
    set_id.copy_from_slice(&h[16..32]);
    Ok(Header {
        set_id,
        block_size: u32_at(32),
        blocks: u64_at(36),
        epoch: u64_at(44),
    })
}

impl MirrorSet {
    pub(super) fn data_off(&self, lba: u64) -> u64 {
        HEADER_LEN + lba * u64::from(self.block_size)
    }

    pub(super) fn crc_off(&self, lba: u64) -> u64 {
        HEADER_LEN + self.blocks * u64::from(self.block_size) + lba * 4
    }

    /// Offset of the slot that holds records of `generation`: they alternate A, B, A...
    /// so the slot being written never holds the newest good record.
    pub(super) fn slot_off(&self, generation: u64) -> u64 {
        self.meta_off + (generation % 2) * META_SLOT
    }
}
