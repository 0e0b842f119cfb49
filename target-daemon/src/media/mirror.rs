//! The mirror set: RAID-1 over two or more files, with a crc32c beside every block on every
//! mirror so silent corruption is found and repaired from a good copy, and a small
//! metadata area (two alternating slots) for state that must be as durable as the data,
//! such as a LUN's persistent reservations. Formats and rules: docs/design.md.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::disk::Disk;
use super::MediaError;

const MAGIC: &[u8; 8] = b"FTSSMIR1";
/// Version 2 added the metadata area at the end of the file.
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 4096;
/// Bytes of the header that the crc covers.
const HEADER_BODY: usize = 8 + 4 + 4 + 16 + 4 + 8 + 8;

/// Each of the two metadata slots (A and B) takes this many bytes.
const META_SLOT: u64 = 64 << 10;
/// The metadata area starts on this boundary, so neither slot shares a sector or a page
/// with the crc area or with the other slot: a torn write of one slot cannot touch the
/// other.
const META_ALIGN: u64 = 4096;
const META_MAGIC: &[u8; 8] = b"FTSSMETA";
const META_VERSION: u32 = 1;
/// Record header: magic, version u32, payload length u32, generation u64, crc32c u32,
/// reserved u32.
const META_HEAD: usize = 8 + 4 + 4 + 8 + 4 + 4;
/// Bytes of the record header the crc covers (everything before the crc field).
const META_CRC_AT: usize = 8 + 4 + 4 + 8;
/// Largest payload [`MirrorSet::write_meta`] takes.
pub const META_MAX: usize = META_SLOT as usize - META_HEAD;

/// The checksum slot of a block that holds no data: never written, or deallocated by
/// [`MirrorSet::deallocate`]. Such a block must read as zeros, and GET LBA STATUS reports
/// it deallocated. A real crc32c of 0 is stored as 1 (see [`MirrorSet::write`]).
pub const DEALLOCATED: u32 = 0;

/// Where the metadata area starts and how long a mirror file is, for a volume of `blocks`
/// x `block_size` bytes; `None` if that overflows.
fn layout(blocks: u64, block_size: u32) -> Option<(u64, u64)> {
    let end_of_crcs = blocks
        .checked_mul(u64::from(block_size))?
        .checked_add(blocks.checked_mul(4)?)?
        .checked_add(HEADER_LEN)?;
    let meta_off = end_of_crcs.checked_next_multiple_of(META_ALIGN)?;
    Some((meta_off, meta_off.checked_add(2 * META_SLOT)?))
}

/// The newest metadata record: what [`MirrorSet::read_meta`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MetaRecord {
    generation: u64,
    payload: Vec<u8>,
}

fn encode_meta(generation: u64, payload: &[u8]) -> Vec<u8> {
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
fn parse_meta(slot: &[u8]) -> Option<MetaRecord> {
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

/// Health of one mirror.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MirrorState {
    /// Serving reads and writes.
    Healthy,
    /// Out of service; needs a rebuild.
    Failed(String),
    /// Being rebuilt: blocks copied so far.
    Rebuilding(u64),
}

/// Proof that [`MirrorSet::begin_rebuild`] put a mirror into the rebuilding state and
/// reserved the set for its rebuild; [`MirrorSet::run_rebuild`] consumes it, so each
/// started rebuild runs its copy at most once.
#[must_use = "a started rebuild holds the set until run_rebuild or abandon_rebuild"]
#[derive(Debug)]
pub struct RebuildTicket {
    target: usize,
}

impl RebuildTicket {
    /// The mirror being rebuilt.
    pub fn mirror(&self) -> usize {
        self.target
    }
}

/// What `status` reports about one mirror.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MirrorStatus {
    /// File path.
    pub path: PathBuf,
    /// Health.
    pub state: MirrorState,
}

/// Result of a scrub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScrubReport {
    /// Blocks checked.
    pub blocks: u64,
    /// Copies that did not match their checksum or the other copies.
    pub mismatches: u64,
    /// Copies rewritten from a good one.
    pub repaired: u64,
}

struct Mirror {
    path: PathBuf,
    file: Box<dyn Disk>,
    state: Mutex<MirrorState>,
    /// Test hook: every I/O on this mirror fails, as a dying disk would.
    inject_eio: AtomicBool,
}

impl Mirror {
    fn state(&self) -> MutexGuard<'_, MirrorState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn eio(&self) -> std::io::Result<()> {
        if self.inject_eio.load(Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], off: u64) -> std::io::Result<()> {
        self.eio()?;
        self.file.write_at(data, off)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.eio()?;
        self.file.read_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.eio()?;
        self.file.sync()
    }
    fn punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.eio()?;
        self.file.punch(off, len)
    }
}

/// A RAID-1 set of mirror files holding one volume.
pub struct MirrorSet {
    block_size: u32,
    blocks: u64,
    set_id: [u8; 16],
    epoch: AtomicU64,
    mirrors: Vec<Mirror>,
    /// Writers hold it shared; a rebuild chunk, a scrub chunk and a read-repair hold it
    /// exclusively, so a stale copy never overwrites a newer write.
    io: RwLock<()>,
    repairs: AtomicU64,
    /// Repair writes (read-repair or scrub) that failed and took their mirror out.
    repair_failures: AtomicU64,
    /// The mirror whose rebuild holds the set, if any: one rebuild per set at a time, so
    /// two copies never race over one target or starve I/O twice over.
    rebuilding: Mutex<Option<usize>>,
    /// Serialises epoch changes and header rewrites.
    meta: Mutex<()>,
    /// Offset of the metadata area (slot A; slot B follows it).
    meta_off: u64,
    /// Length of every mirror file.
    file_len: u64,
    /// The newest metadata record, `None` until one is written. Held across a whole
    /// `write_meta` and across a rebuild's copy of the area, so neither misses the other.
    /// Lock order: this before `meta` (a failing mirror takes `meta` to raise the epoch).
    record: Mutex<Option<MetaRecord>>,
    /// Progress of a running scrub: blocks verified plus one; 0 when none runs.
    scrubbed: AtomicU64,
}

/// Clears the scrub progress however the scrub ends.
struct ScrubRunning<'a>(&'a AtomicU64);

impl Drop for ScrubRunning<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

fn header(set_id: &[u8; 16], index: u32, block_size: u32, blocks: u64, epoch: u64) -> Vec<u8> {
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

struct Header {
    set_id: [u8; 16],
    block_size: u32,
    blocks: u64,
    epoch: u64,
}

/// The header, or why the file is not a mirror of this format.
fn parse_header(h: &[u8]) -> Result<Header, String> {
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

fn random_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    id
}

impl MirrorSet {
    /// Opens (or creates) the mirror files of a volume of `blocks` x `block_size` bytes.
    /// A missing or empty file becomes a new mirror; if the set already has data it is
    /// marked failed until rebuilt. A file of another set or geometry is refused.
    pub fn open(paths: &[PathBuf], blocks: u64, block_size: u32) -> Result<Self, MediaError> {
        let mut disks: Vec<(PathBuf, Box<dyn Disk>)> = Vec::new();
        for p in paths {
            // Owner-only: a mirror holds the LUN's data.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)?;
            disks.push((p.clone(), Box::new(f)));
        }
        Self::open_disks(disks, blocks, block_size)
    }

    /// [`open`](Self::open) over already opened disks (files, or the test double).
    pub fn open_disks(
        disks: Vec<(PathBuf, Box<dyn Disk>)>,
        blocks: u64,
        block_size: u32,
    ) -> Result<Self, MediaError> {
        let paths: Vec<PathBuf> = disks.iter().map(|(p, _)| p.clone()).collect();
        if paths.len() < 2 {
            return Err(MediaError::Failed(
                "a mirror set needs at least two files".into(),
            ));
        }
        let (meta_off, file_len) = layout(blocks, block_size)
            .ok_or_else(|| MediaError::Failed("volume size overflows".into()))?;
        let mut files = Vec::new();
        let mut headers = Vec::new();
        for (p, f) in disks {
            let p = &p;
            let len = f.size()?;
            if len == 0 {
                headers.push(None);
            } else if len < HEADER_LEN {
                return Err(MediaError::Failed(format!(
                    "{}: not an ftss mirror file ({len} bytes, no header)",
                    p.display()
                )));
            } else {
                let mut h = vec![0u8; HEADER_LEN as usize];
                f.read_at(&mut h, 0)?;
                let hd = parse_header(&h)
                    .map_err(|why| MediaError::Failed(format!("{}: {why}", p.display())))?;
                if hd.block_size != block_size || hd.blocks != blocks {
                    return Err(MediaError::Failed(format!(
                        "{}: mirror holds {} blocks of {} bytes, the configuration says {blocks} of {block_size}",
                        p.display(),
                        hd.blocks,
                        hd.block_size
                    )));
                }
                headers.push(Some(hd));
            }
            files.push(f);
        }
        let existing: Vec<&Header> = headers.iter().flatten().collect();
        let set_id = existing.first().map_or_else(random_id, |h| h.set_id);
        if let Some(h) = existing.iter().find(|h| h.set_id != set_id) {
            let i = headers
                .iter()
                .position(|x| x.as_ref().is_some_and(|x| x.set_id == h.set_id))
                .unwrap_or(0);
            return Err(MediaError::Failed(format!(
                "{}: mirror belongs to another set",
                paths[i].display()
            )));
        }
        let epoch = existing.iter().map(|h| h.epoch).max().unwrap_or(1);
        let fresh_set = existing.is_empty();
        let mut mirrors = Vec::new();
        for (i, (f, h)) in files.into_iter().zip(&headers).enumerate() {
            let len = f.size()?;
            let state = match h {
                Some(_) if len != file_len => MirrorState::Failed(format!(
                    "holds {len} bytes, a mirror of this set holds {file_len}: truncated?"
                )),
                Some(h) if h.epoch == epoch => MirrorState::Healthy,
                Some(h) => MirrorState::Failed(format!("stale: epoch {} < {epoch}", h.epoch)),
                None => {
                    f.set_size(file_len)?;
                    f.write_at(
                        &header(
                            &set_id,
                            i as u32,
                            block_size,
                            blocks,
                            if fresh_set { epoch } else { 0 },
                        ),
                        0,
                    )?;
                    f.sync()?;
                    if fresh_set {
                        MirrorState::Healthy
                    } else {
                        MirrorState::Failed("new mirror: needs a rebuild".into())
                    }
                }
            };
            if let MirrorState::Failed(why) = &state {
                warn!("mirror {}: {why}", paths[i].display());
            }
            mirrors.push(Mirror {
                path: paths[i].clone(),
                file: f,
                state: Mutex::new(state),
                inject_eio: AtomicBool::new(false),
            });
        }
        let set = Self {
            block_size,
            blocks,
            set_id,
            epoch: AtomicU64::new(epoch),
            mirrors,
            io: RwLock::new(()),
            repairs: AtomicU64::new(0),
            repair_failures: AtomicU64::new(0),
            rebuilding: Mutex::new(None),
            meta: Mutex::new(()),
            meta_off,
            file_len,
            record: Mutex::new(None),
            scrubbed: AtomicU64::new(0),
        };
        set.load_meta();
        Ok(set)
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn data_off(&self, lba: u64) -> u64 {
        HEADER_LEN + lba * u64::from(self.block_size)
    }

    fn crc_off(&self, lba: u64) -> u64 {
        HEADER_LEN + self.blocks * u64::from(self.block_size) + lba * 4
    }

    /// Offset of the slot that holds records of `generation`: they alternate A, B, A...
    /// so the slot being written never holds the newest good record.
    fn slot_off(&self, generation: u64) -> u64 {
        self.meta_off + (generation % 2) * META_SLOT
    }

    fn record(&self) -> MutexGuard<'_, Option<MetaRecord>> {
        // Updated by a single assignment after the I/O: consistent across a panic.
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads both slots of mirror `i`.
    fn read_slots(&self, i: usize) -> std::io::Result<[Option<MetaRecord>; 2]> {
        let mut buf = vec![0u8; META_SLOT as usize];
        let mut out = [None, None];
        for (k, slot) in out.iter_mut().enumerate() {
            self.mirrors[i].read_at(&mut buf, self.meta_off + k as u64 * META_SLOT)?;
            *slot = parse_meta(&buf);
        }
        Ok(out)
    }

    /// Writes `rec` into its slot on mirror `i` and syncs it.
    fn write_record(&self, i: usize, rec: &MetaRecord) -> std::io::Result<()> {
        let m = &self.mirrors[i];
        m.write_at(
            &encode_meta(rec.generation, &rec.payload),
            self.slot_off(rec.generation),
        )?;
        m.sync()
    }

    /// At open: the newest whole record across the healthy mirrors becomes the current
    /// one, and every healthy mirror that lacks it (a crash during `write_meta` reached
    /// only some) gets it now, so losing the mirror that had it cannot bring back an
    /// older record later.
    fn load_meta(&self) {
        let mut rec = self.record();
        let mut seen: Vec<(usize, [Option<MetaRecord>; 2])> = Vec::new();
        for i in 0..self.mirrors.len() {
            if !self.healthy(i) {
                continue;
            }
            match self.read_slots(i) {
                Ok(slots) => seen.push((i, slots)),
                Err(e) => self.fail(i, format!("metadata read error: {e}")),
            }
        }
        let best = seen
            .iter()
            .flat_map(|(_, slots)| slots.iter().flatten())
            .max_by_key(|r| r.generation)
            .cloned();
        if let Some(b) = &best {
            for (i, slots) in &seen {
                if slots[(b.generation % 2) as usize].as_ref() == Some(b) || !self.healthy(*i) {
                    continue;
                }
                warn!(mirror = %self.mirrors[*i].path.display(), generation = b.generation, "metadata record missing: copied from another mirror");
                if let Err(e) = self.write_record(*i, b) {
                    self.fail(*i, format!("metadata write error: {e}"));
                }
            }
        }
        *rec = best;
    }

    /// Stores `payload` as the set's metadata record (at most [`META_MAX`] bytes) on every
    /// healthy mirror and syncs it there: the next generation goes into the slot that does
    /// not hold the current one, so a crash midway leaves the current record readable.
    /// A mirror that fails the write or the sync is taken out of service, as a failed
    /// data write takes it; the call fails only if no mirror took the record.
    pub fn write_meta(&self, payload: &[u8]) -> Result<(), MediaError> {
        if payload.len() > META_MAX {
            return Err(MediaError::MetaTooLarge {
                len: payload.len(),
                max: META_MAX,
            });
        }
        let mut rec = self.record();
        let new = MetaRecord {
            generation: rec.as_ref().map_or(1, |r| r.generation + 1),
            payload: payload.to_vec(),
        };
        let bytes = encode_meta(new.generation, payload);
        let off = self.slot_off(new.generation);
        // Only healthy mirrors: one being rebuilt gets the area at the end of its
        // rebuild, under this lock.
        let targets: Vec<usize> = (0..self.mirrors.len())
            .filter(|&i| self.healthy(i))
            .collect();
        for &i in &targets {
            if let Err(e) = self.mirrors[i].write_at(&bytes, off) {
                self.fail(i, format!("metadata write error: {e}"));
            }
        }
        let mut took = 0;
        for &i in &targets {
            if !self.healthy(i) {
                continue;
            }
            match self.mirrors[i].sync() {
                Ok(()) => took += 1,
                // Never retried, like a data sync (docs/design.md).
                Err(e) => self.fail(i, format!("metadata sync failed: {e}")),
            }
        }
        if took == 0 {
            return Err(MediaError::Failed(
                "no mirror took the metadata record".into(),
            ));
        }
        *rec = Some(new);
        Ok(())
    }

    /// The newest metadata record [`write_meta`](Self::write_meta) stored (found at open
    /// on the healthy mirrors, a torn newest slot falling back to the older one), or
    /// `None` if there is none.
    pub fn read_meta(&self) -> Option<Vec<u8>> {
        self.record().as_ref().map(|r| r.payload.clone())
    }

    fn healthy(&self, i: usize) -> bool {
        *self.mirrors[i].state() == MirrorState::Healthy
    }

    /// Mirrors that take writes: healthy ones and the one being rebuilt.
    fn writable(&self, i: usize) -> bool {
        matches!(
            *self.mirrors[i].state(),
            MirrorState::Healthy | MirrorState::Rebuilding(_)
        )
    }

    /// Takes mirror `i` out of service and raises the survivors' epoch, so it is not
    /// trusted again after a restart until rebuilt.
    pub(crate) fn fail(&self, i: usize, why: String) {
        {
            let mut s = self.mirrors[i].state();
            if matches!(*s, MirrorState::Failed(_)) {
                return;
            }
            *s = MirrorState::Failed(why.clone());
        }
        error!(mirror = %self.mirrors[i].path.display(), "mirror failed: {why}");
        let _g = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        for j in 0..self.mirrors.len() {
            if self.healthy(j) {
                let h = header(&self.set_id, j as u32, self.block_size, self.blocks, epoch);
                let m = &self.mirrors[j];
                if let Err(e) = m.write_at(&h, 0).and_then(|()| m.sync()) {
                    drop(_g);
                    self.fail(j, format!("header update failed: {e}"));
                    return;
                }
            }
        }
    }

    fn check_range(&self, lba: u64, len: usize) -> Result<u64, MediaError> {
        let bs = u64::from(self.block_size);
        let n = len as u64 / bs;
        if !(len as u64).is_multiple_of(bs) || lba.checked_add(n).is_none_or(|e| e > self.blocks) {
            return Err(MediaError::OutOfRange { lba, blocks: n });
        }
        Ok(n)
    }

    fn any_healthy(&self) -> Result<(), MediaError> {
        if (0..self.mirrors.len()).any(|i| self.healthy(i)) {
            Ok(())
        } else {
            Err(MediaError::Failed("every mirror has failed".into()))
        }
    }

    /// Writes whole blocks, with their checksums, to every mirror in service.
    pub fn write(&self, lba: u64, data: &[u8]) -> Result<(), MediaError> {
        let n = self.check_range(lba, data.len())?;
        let bs = self.block_size as usize;
        let mut crcs = Vec::with_capacity(n as usize * 4);
        for b in data.chunks(bs) {
            // 0 marks a block without data (DEALLOCATED); a real crc of 0 is stored as 1
            // and the 1-in-2^32 collision makes the block read as corrupt, never as wrong
            // data.
            let c = crc32c::crc32c(b).max(1);
            crcs.extend_from_slice(&c.to_le_bytes());
        }
        let _g = self
            .io
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for i in 0..self.mirrors.len() {
            if !self.writable(i) {
                continue;
            }
            let m = &self.mirrors[i];
            if let Err(e) = m
                .write_at(data, self.data_off(lba))
                .and_then(|()| m.write_at(&crcs, self.crc_off(lba)))
            {
                self.fail(i, format!("write error: {e}"));
            }
        }
        self.any_healthy()
    }

    /// Makes every completed write durable on every mirror in service.
    pub fn sync(&self) -> Result<(), MediaError> {
        for i in 0..self.mirrors.len() {
            if self.writable(i) {
                if let Err(e) = self.mirrors[i].sync() {
                    // Never retry: after a failed fsync the page cache may have dropped
                    // the data (docs/design.md).
                    self.fail(i, format!("sync failed: {e}"));
                }
            }
        }
        self.any_healthy()
    }

    /// Reads blocks and their checksums from mirror `i` (the checksums into `crcs`, one per
    /// block); returns the indexes of blocks whose copy does not verify.
    fn read_from(
        &self,
        i: usize,
        lba: u64,
        buf: &mut [u8],
        crcs: &mut Vec<u32>,
    ) -> std::io::Result<Vec<usize>> {
        let m = &self.mirrors[i];
        let n = buf.len() / self.block_size as usize;
        let mut raw = vec![0u8; n * 4];
        m.read_at(buf, self.data_off(lba))?;
        m.read_at(&mut raw, self.crc_off(lba))?;
        crcs.clear();
        crcs.extend(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        let bs = self.block_size as usize;
        Ok((0..n)
            .filter(|&k| {
                let b = &buf[k * bs..(k + 1) * bs];
                if crcs[k] == DEALLOCATED {
                    b.iter().any(|&x| x != 0)
                } else {
                    crc32c::crc32c(b).max(1) != crcs[k]
                }
            })
            .collect())
    }

    /// Reads whole blocks from a mirror whose copy verifies, repairing bad copies.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.read_verified(lba, buf, &mut Vec::new())
    }

    /// [`read`](Self::read), also giving the verified copy's checksums (0 for a
    /// deallocated block), so a copy made from it keeps each block's provisioning.
    fn read_verified(
        &self,
        lba: u64,
        buf: &mut [u8],
        crcs: &mut Vec<u32>,
    ) -> Result<(), MediaError> {
        self.check_range(lba, buf.len())?;
        if self.read_copies(lba, buf, false, crcs)? {
            return Ok(());
        }
        // A copy needs repair. The good copy read above may already be older than a
        // write that landed since; rewriting it now could put old data over new. So the
        // repair reads again and writes under the exclusive I/O lock, which every write
        // (destage) holds shared.
        let _g = self
            .io
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.read_copies(lba, buf, true, crcs).map(|_| ())
    }

    /// Reads blocks from the first healthy mirror whose copy verifies. Returns whether
    /// every mirror read on the way verified; bad copies met on the way are rewritten
    /// from the good one if `repair` (the caller holds the I/O lock exclusively), else
    /// left for the caller to repair under it.
    fn read_copies(
        &self,
        lba: u64,
        buf: &mut [u8],
        repair: bool,
        crcs: &mut Vec<u32>,
    ) -> Result<bool, MediaError> {
        let bs = self.block_size as usize;
        let order: Vec<usize> = (0..self.mirrors.len())
            .filter(|&i| self.healthy(i))
            .collect();
        let mut first_bad: Option<(usize, Vec<usize>)> = None;
        for &i in &order {
            match self.read_from(i, lba, buf, crcs) {
                Ok(bad) if bad.is_empty() => {
                    let Some((j, blocks)) = first_bad else {
                        return Ok(true);
                    };
                    if !repair {
                        return Ok(false);
                    }
                    // Mirror j had bad copies that this one holds good: rewrite them.
                    for k in blocks {
                        let at = lba + k as u64;
                        if !self.repair_one(j, at, &buf[k * bs..(k + 1) * bs], crcs[k]) {
                            break;
                        }
                        warn!(mirror = %self.mirrors[j].path.display(), lba = at, "repaired a corrupt block");
                    }
                    return Ok(true);
                }
                Ok(bad) => {
                    warn!(mirror = %self.mirrors[i].path.display(), lba, blocks = bad.len(), "checksum mismatch");
                    if first_bad.is_none() {
                        first_bad = Some((i, bad));
                    }
                }
                Err(e) => self.fail(i, format!("read error: {e}")),
            }
        }
        self.any_healthy()?;
        Err(MediaError::Corrupt { lba })
    }

    /// Rewrites one block of mirror `i` as a verified copy holds it: `crc` is that copy's
    /// checksum, and a deallocated one (0) is deallocated here too rather than written, so
    /// a repair never turns an unmapped block into a mapped one on one mirror only.
    fn write_one(&self, i: usize, lba: u64, block: &[u8], crc: u32) -> std::io::Result<()> {
        let m = &self.mirrors[i];
        let bs = u64::from(self.block_size);
        if crc == DEALLOCATED {
            m.punch(self.data_off(lba), bs)?;
        } else {
            m.write_at(block, self.data_off(lba))?;
        }
        m.write_at(&crc.to_le_bytes(), self.crc_off(lba))?;
        m.sync()
    }

    /// Rewrites one bad copy on mirror `i` (caller holds the I/O lock exclusively) and
    /// counts it. A failed write or sync fails the mirror: the sync is never retried,
    /// for Linux reports a writeback error once per open file, so a later sync on the
    /// same handle would succeed and the write cache would free records this mirror
    /// never got. Returns whether the copy was repaired.
    fn repair_one(&self, i: usize, lba: u64, block: &[u8], crc: u32) -> bool {
        match self.write_one(i, lba, block, crc) {
            Ok(()) => {
                self.repairs.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.repair_failures.fetch_add(1, Ordering::Relaxed);
                self.fail(i, format!("repair of lba {lba} failed: {e}"));
                false
            }
        }
    }

    /// Deallocates `blocks` blocks from `lba` on every mirror in service: punches the data
    /// out of each file (the space goes back to the file system) and sets the blocks'
    /// checksums to [`DEALLOCATED`], so they read back as zeros, verify, and count as
    /// unmapped for GET LBA STATUS on every mirror alike. Not durable until
    /// [`sync`](Self::sync), like [`write`](Self::write).
    pub fn deallocate(&self, lba: u64, blocks: u64) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size);
        if lba.checked_add(blocks).is_none_or(|e| e > self.blocks) {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        if blocks == 0 {
            return Ok(());
        }
        let _g = self
            .io
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for i in 0..self.mirrors.len() {
            if !self.writable(i) {
                continue;
            }
            let m = &self.mirrors[i];
            // The checksums are zeroed by a punch as well: it zeroes exactly the byte range
            // (freeing the whole pages inside it), which is what 0 = deallocated needs.
            if let Err(e) = m
                .punch(self.data_off(lba), blocks * bs)
                .and_then(|()| m.punch(self.crc_off(lba), blocks * 4))
            {
                self.fail(i, format!("deallocate error: {e}"));
            }
        }
        self.any_healthy()
    }

    /// The stored checksums of `blocks` blocks from `lba`, from the first healthy mirror
    /// that reads them ([`DEALLOCATED`] for unmapped blocks). Every healthy mirror holds
    /// the same values; the data is not read, so this is cheap for GET LBA STATUS.
    pub fn checksums(&self, lba: u64, blocks: u64) -> Result<Vec<u32>, MediaError> {
        if lba.checked_add(blocks).is_none_or(|e| e > self.blocks) {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        let len = usize::try_from(blocks.saturating_mul(4))
            .map_err(|_| MediaError::OutOfRange { lba, blocks })?;
        let mut raw = vec![0u8; len];
        for i in 0..self.mirrors.len() {
            if !self.healthy(i) {
                continue;
            }
            match self.mirrors[i].read_at(&mut raw, self.crc_off(lba)) {
                Ok(()) => {
                    return Ok(raw
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect())
                }
                Err(e) => self.fail(i, format!("checksum read error: {e}")),
            }
        }
        self.any_healthy()?;
        Err(MediaError::Failed("no mirror could be read".into()))
    }

    /// Writes one rebuild chunk onto mirror `target`: the verified copy's blocks and
    /// checksums as they are, deallocated blocks as holes (so a rebuild keeps the set thin
    /// and every block's provisioning the same on every mirror).
    fn copy_chunk(
        &self,
        target: usize,
        lba: u64,
        data: &[u8],
        crcs: &[u32],
    ) -> std::io::Result<()> {
        let m = &self.mirrors[target];
        let bs = self.block_size as usize;
        let mut k = 0;
        while k < crcs.len() {
            let hole = crcs[k] == DEALLOCATED;
            let run = crcs[k..]
                .iter()
                .take_while(|&&c| (c == DEALLOCATED) == hole)
                .count();
            let off = self.data_off(lba + k as u64);
            if hole {
                m.punch(off, (run * bs) as u64)?;
            } else {
                m.write_at(&data[k * bs..(k + run) * bs], off)?;
            }
            k += run;
        }
        let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        m.write_at(&raw, self.crc_off(lba))
    }

    /// Puts mirror `target` into service for a rebuild: writers reach it from now on and
    /// status shows it rebuilding, before the copy starts (on its own thread, for the
    /// admin interface) with [`run_rebuild`](Self::run_rebuild).
    ///
    /// Only a failed mirror is rebuilt, and only while another mirror is healthy to copy
    /// from; one rebuild per set at a time. The checks and the state change happen
    /// together under the set's rebuild lock and the mirror's state lock, so of two
    /// concurrent calls exactly one succeeds. Refusals are
    /// [`MediaError::RebuildRefused`].
    pub fn begin_rebuild(&self, target: usize) -> Result<RebuildTicket, MediaError> {
        let m = self
            .mirrors
            .get(target)
            .ok_or_else(|| MediaError::RebuildRefused(format!("no mirror {target}")))?;
        let refuse = |why: String| Err(MediaError::RebuildRefused(why));
        let mut running = self
            .rebuilding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *running {
            Some(r) if r == target => {
                return refuse(format!("mirror {target} is already being rebuilt"));
            }
            Some(r) => {
                return refuse(format!(
                    "mirror {r} of this set is already being rebuilt; one at a time"
                ));
            }
            None => {}
        }
        let sources = (0..self.mirrors.len())
            .filter(|&j| j != target && self.healthy(j))
            .count();
        {
            let mut state = m.state();
            match (&*state, sources) {
                (MirrorState::Healthy, 0) => {
                    return refuse(format!(
                        "mirror {target} is the last healthy mirror of the set: \
                         rebuilding it would leave no copy to read"
                    ));
                }
                (MirrorState::Healthy, _) => {
                    return refuse(format!(
                        "mirror {target} is healthy: only a failed mirror is rebuilt"
                    ));
                }
                (MirrorState::Rebuilding(_), _) => {
                    return refuse(format!("mirror {target} is already being rebuilt"));
                }
                (MirrorState::Failed(_), 0) => {
                    return refuse(format!("no healthy mirror to copy mirror {target} from"));
                }
                (MirrorState::Failed(_), _) => {}
            }
            // The replaced disk works before writers may reach it: cleared the other way
            // round, a write landing in between would fail the mirror again at once.
            m.inject_eio.store(false, Ordering::Relaxed);
            *state = MirrorState::Rebuilding(0);
        }
        *running = Some(target);
        info!(mirror = %m.path.display(), "rebuild started");
        Ok(RebuildTicket { target })
    }

    /// Gives up a rebuild that [`begin_rebuild`](Self::begin_rebuild) started but that
    /// will not run (its thread could not start): the mirror is failed again with `why`
    /// and the set is free for another rebuild.
    pub fn abandon_rebuild(&self, ticket: RebuildTicket, why: String) {
        self.fail(ticket.target, why);
        self.end_rebuild();
    }

    fn end_rebuild(&self) {
        *self
            .rebuilding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// [`begin_rebuild`](Self::begin_rebuild) and [`run_rebuild`](Self::run_rebuild) in
    /// one call.
    pub fn rebuild(
        &self,
        target: usize,
        rate_bytes_s: u64,
        progress: impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let ticket = self.begin_rebuild(target)?;
        self.run_rebuild(ticket, rate_bytes_s, progress)
    }

    /// Copies every block from a healthy mirror onto the mirror of `ticket`,
    /// `rate_bytes_s` at most, while I/O continues, then the current metadata record;
    /// `progress(done, total)` is called per chunk. It ends healthy only if nothing
    /// failed it meanwhile: any write or sync error on it, from the copy or from the
    /// writes it takes alongside, leaves it failed until a new rebuild is started.
    pub fn run_rebuild(
        &self,
        ticket: RebuildTicket,
        rate_bytes_s: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let target = ticket.target;
        let r = self.copy_to(target, rate_bytes_s, &mut progress);
        let path = self.mirrors[target].path.display();
        match &r {
            Ok(()) => info!(mirror = %path, "rebuild complete"),
            Err(e) => {
                // A no-op when a write already failed it (its reason is kept).
                self.fail(target, format!("rebuild stopped: {e}"));
                warn!(mirror = %path, "rebuild failed: {e}");
            }
        }
        self.end_rebuild();
        r
    }

    /// Moves mirror `target` from rebuilding to `to`, only if it is still rebuilding:
    /// anything that failed it since (a write or sync error) wins.
    fn advance_rebuild(&self, target: usize, to: MirrorState) -> Result<(), MediaError> {
        let mut state = self.mirrors[target].state();
        match &*state {
            MirrorState::Rebuilding(_) => {
                *state = to;
                Ok(())
            }
            MirrorState::Failed(why) => Err(MediaError::Failed(format!(
                "mirror {target} failed during its rebuild: {why}"
            ))),
            MirrorState::Healthy => Err(MediaError::Failed(format!(
                "mirror {target} left its rebuild"
            ))),
        }
    }

    fn copy_to(
        &self,
        target: usize,
        rate_bytes_s: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size);
        let chunk = (1u64 << 20) / bs;
        let mut buf = vec![0u8; (chunk * bs) as usize];
        let mut crcs = Vec::new();
        let started = Instant::now();
        let mut lba = 0;
        let m = &self.mirrors[target];
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let b = &mut buf[..(n * bs) as usize];
            {
                let _g = self
                    .io
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // No point copying onto a mirror a write has failed meanwhile.
                self.advance_rebuild(target, MirrorState::Rebuilding(lba))?;
                // Under the lock held exclusively: repairs may write.
                self.read_copies(lba, b, true, &mut crcs)?;
                if let Err(e) = self.copy_chunk(target, lba, b, &crcs) {
                    self.fail(target, format!("rebuild write failed: {e}"));
                    return Err(MediaError::Io(e));
                }
                lba += n;
                self.advance_rebuild(target, MirrorState::Rebuilding(lba))?;
            }
            progress(lba, self.blocks);
            if rate_bytes_s > 0 {
                let due = Duration::from_secs_f64((lba * bs) as f64 / rate_bytes_s as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        // The metadata area last, under the record lock so a concurrent write_meta
        // (which skips a mirror being rebuilt) either lands before this copy or after
        // the mirror is healthy again. The current record goes into its slot, the other
        // slot is zeroed: a mirror coming back from an old life may hold stale records
        // there, and the whole area is written so a truncated file regains its length.
        let rec = self.record();
        let mut area = vec![0u8; 2 * META_SLOT as usize];
        if let Some(r) = rec.as_ref() {
            let at = (self.slot_off(r.generation) - self.meta_off) as usize;
            let bytes = encode_meta(r.generation, &r.payload);
            area[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let written = {
            // Held from the header write to the state change, so an epoch raised by
            // another mirror's failure either reaches this header or comes after the
            // mirror is healthy and rewrites it.
            let _g = self
                .meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let epoch = self.epoch.load(Ordering::SeqCst);
            // One fdatasync covers the copied chunks and the area; a second one orders
            // the header (which makes the mirror current after a restart) after them.
            let r = m
                .write_at(&area, self.meta_off)
                .and_then(|()| m.sync())
                .and_then(|()| {
                    m.write_at(
                        &header(
                            &self.set_id,
                            target as u32,
                            self.block_size,
                            self.blocks,
                            epoch,
                        ),
                        0,
                    )
                })
                .and_then(|()| m.sync());
            match r {
                Ok(()) => Ok(self.advance_rebuild(target, MirrorState::Healthy)),
                Err(e) => Err(e),
            }
        };
        drop(rec);
        match written {
            Ok(healthy) => healthy,
            Err(e) => {
                // After `meta` is released: failing takes it to raise the epoch.
                self.fail(target, format!("rebuild write failed: {e}"));
                Err(MediaError::Io(e))
            }
        }
    }

    /// Verifies every copy of every block, repairing bad copies from good ones.
    pub fn scrub(&self) -> Result<ScrubReport, MediaError> {
        let mut report = ScrubReport::default();
        self.scrubbed.store(1, Ordering::Relaxed);
        let _running = ScrubRunning(&self.scrubbed);
        let bs = self.block_size as usize;
        let chunk = ((1usize << 20) / bs) as u64;
        let mut lba = 0;
        let mut buf = vec![0u8; chunk as usize * bs];
        let mut other = vec![0u8; chunk as usize * bs];
        let (mut crcs, mut good_crcs) = (Vec::new(), Vec::new());
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let len = n as usize * bs;
            let _g = self
                .io
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if lba == 0 {
                // A file cut short reads back zeros with zero checksums ("never written")
                // once a later write extends it again; only its size gives it away.
                let want = self.file_len;
                for i in 0..self.mirrors.len() {
                    if self.healthy(i) {
                        match self.mirrors[i].file.size() {
                            Ok(len) if len >= want => {}
                            Ok(len) => {
                                self.fail(i, format!("holds {len} bytes of {want}: truncated"))
                            }
                            Err(e) => self.fail(i, format!("scrub cannot stat: {e}")),
                        }
                    }
                }
            }
            let healthy: Vec<usize> = (0..self.mirrors.len())
                .filter(|&i| self.healthy(i))
                .collect();
            let before = self.repairs.load(Ordering::Relaxed);
            for &i in &healthy {
                match self.read_from(i, lba, &mut buf[..len], &mut crcs) {
                    Ok(bad) => report.mismatches += bad.len() as u64,
                    Err(e) => self.fail(i, format!("scrub read error: {e}")),
                }
            }
            // A verified read repairs the bad copies it finds (the lock is held).
            self.read_copies(lba, &mut other[..len], true, &mut good_crcs)?;
            report.repaired += self.repairs.load(Ordering::Relaxed) - before;
            // Copies that each verify can still disagree (a crash between the writes to
            // two mirrors of a block no longer in the journal cannot leave this, so it
            // means a bug or tampering): count it and make every copy the verified one.
            // Equal data with different checksums is a zero block that one mirror holds
            // deallocated and another mapped: a disagreement about provisioning.
            for &i in &healthy {
                if !self.healthy(i) || self.read_from(i, lba, &mut buf[..len], &mut crcs).is_err() {
                    continue;
                }
                for k in 0..n as usize {
                    let (a, b) = (&buf[k * bs..(k + 1) * bs], &other[k * bs..(k + 1) * bs]);
                    if a != b || crcs[k] != good_crcs[k] {
                        report.mismatches += 1;
                        let at = lba + k as u64;
                        warn!(mirror = %self.mirrors[i].path.display(), lba = at, "copies differ");
                        if self.repair_one(i, at, b, good_crcs[k]) {
                            report.repaired += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            report.blocks += n;
            lba += n;
            self.scrubbed.store(lba + 1, Ordering::Relaxed);
        }
        self.scrub_meta(&mut report);
        Ok(report)
    }

    /// Checks that every healthy mirror holds the current metadata record in its slot and
    /// rewrites it where it does not (counted like a block copy). The older slot is not
    /// compared: it may hold a previous generation or nothing, and is never read while
    /// the current one verifies.
    fn scrub_meta(&self, report: &mut ScrubReport) {
        let rec = self.record();
        let Some(r) = rec.as_ref() else {
            return;
        };
        let mut buf = vec![0u8; META_SLOT as usize];
        for i in 0..self.mirrors.len() {
            if !self.healthy(i) {
                continue;
            }
            if let Err(e) = self.mirrors[i].read_at(&mut buf, self.slot_off(r.generation)) {
                self.fail(i, format!("scrub metadata read error: {e}"));
                continue;
            }
            if parse_meta(&buf).as_ref() == Some(r) {
                continue;
            }
            report.mismatches += 1;
            warn!(mirror = %self.mirrors[i].path.display(), generation = r.generation, "metadata record damaged");
            match self.write_record(i, r) {
                Ok(()) => {
                    report.repaired += 1;
                    self.repairs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.repair_failures.fetch_add(1, Ordering::Relaxed);
                    self.fail(i, format!("metadata write error: {e}"));
                }
            }
        }
    }

    /// Per-mirror state.
    pub fn status(&self) -> Vec<MirrorStatus> {
        self.mirrors
            .iter()
            .map(|m| MirrorStatus {
                path: m.path.clone(),
                state: m.state().clone(),
            })
            .collect()
    }

    /// Blocks the running scrub has verified, or `None` when no scrub runs.
    pub fn scrub_progress(&self) -> Option<u64> {
        self.scrubbed.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Bad copies rewritten from good ones since start.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Repairs (read-repair, scrub) whose write or sync failed and failed their mirror.
    pub fn repair_failures(&self) -> u64 {
        self.repair_failures.load(Ordering::Relaxed)
    }

    /// Test hook: make every I/O on mirror `i` fail with EIO (a disk going bad).
    pub fn inject_eio(&self, i: usize, on: bool) {
        self.mirrors[i].inject_eio.store(on, Ordering::Relaxed);
    }

    /// Paths, for messages.
    pub fn path(&self, i: usize) -> &Path {
        &self.mirrors[i].path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftss-mirror-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn set(d: &Path) -> (MirrorSet, Vec<PathBuf>) {
        let paths = vec![d.join("a.mir"), d.join("b.mir")];
        (MirrorSet::open(&paths, 256, 512).expect("open"), paths)
    }

    fn pattern(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn write_read_and_unwritten_blocks_read_zero() {
        let d = dir("rw");
        let (s, _) = set(&d);
        s.write(8, &pattern(1)).expect("write");
        let mut b = vec![0u8; 4096];
        s.read(8, &mut b).expect("read");
        assert_eq!(b, pattern(1));
        s.read(100, &mut b).expect("unwritten");
        assert!(b.iter().all(|&x| x == 0));
        assert!(matches!(
            s.read(255, &mut b),
            Err(MediaError::OutOfRange { .. })
        ));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn flipped_byte_is_detected_and_repaired_from_the_good_copy() {
        let d = dir("flip");
        let (s, paths) = set(&d);
        s.write(0, &pattern(7)).expect("write");
        s.sync().expect("sync");
        // Flip one byte of block 3's data on mirror a.
        let f = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&paths[0])
            .expect("open");
        let off = HEADER_LEN + 3 * 512 + 17;
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, off).expect("read");
        f.write_all_at(&[one[0] ^ 0x40], off).expect("write");
        let mut b = vec![0u8; 4096];
        s.read(0, &mut b).expect("read survives");
        assert_eq!(b, pattern(7));
        assert_eq!(s.repairs(), 1);
        assert_eq!(
            s.scrub().expect("scrub").mismatches,
            0,
            "repair made both copies good"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn eio_fails_one_mirror_service_continues_rebuild_restores_two_copies() {
        let d = dir("eio");
        let (s, paths) = set(&d);
        for k in 0..16u64 {
            s.write(k * 8, &pattern(k as u8)).expect("write");
        }
        s.inject_eio(1, true);
        s.write(200, &pattern(99))
            .expect("write continues on the survivor");
        assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
        let mut b = vec![0u8; 4096];
        for k in 0..16u64 {
            s.read(k * 8, &mut b).expect("read from survivor");
            assert_eq!(b, pattern(k as u8), "zero data loss");
        }
        // The survivor's epoch moved on: after a restart the failed mirror stays out.
        drop(s);
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert!(
            matches!(s.status()[1].state, MirrorState::Failed(_)),
            "stale mirror not trusted"
        );
        let mut seen = 0;
        s.rebuild(1, 0, |done, total| {
            assert!(done <= total);
            seen += 1;
        })
        .expect("rebuild");
        assert!(seen > 0);
        assert_eq!(s.status()[1].state, MirrorState::Healthy);
        let r = s.scrub().expect("scrub");
        assert_eq!(r.mismatches, 0);
        assert_eq!(r.blocks, 256);
        // Both copies now serve: fail the first and read everything from the rebuilt one.
        s.inject_eio(0, true);
        for k in 0..16u64 {
            s.read(k * 8, &mut b).expect("read from rebuilt mirror");
            assert_eq!(b, pattern(k as u8));
        }
        s.read(200, &mut b).expect("read");
        assert_eq!(b, pattern(99));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn truncated_mirror_fails_on_read_and_data_stays_correct() {
        let d = dir("trunc");
        let (s, paths) = set(&d);
        s.write(128, &pattern(3)).expect("write");
        s.sync().expect("sync");
        OpenOptions::new()
            .write(true)
            .open(&paths[0])
            .expect("open")
            .set_len(4096)
            .expect("truncate");
        let mut b = vec![0u8; 4096];
        s.read(128, &mut b).expect("read from the other mirror");
        assert_eq!(b, pattern(3));
        assert!(matches!(s.status()[0].state, MirrorState::Failed(_)));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn foreign_and_mismatched_files_are_refused() {
        let d = dir("foreign");
        let (s, paths) = set(&d);
        drop(s);
        std::fs::write(d.join("junk.mir"), b"not a mirror at all").expect("write");
        let e = MirrorSet::open(&[paths[0].clone(), d.join("junk.mir")], 256, 512)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("junk.mir"), "{e}");
        let e = MirrorSet::open(&paths, 512, 512).err().expect("refused");
        assert!(e.to_string().contains("256 blocks"), "{e}");
        let other = dir("foreign2");
        let (s2, p2) = set(&other);
        drop(s2);
        let e = MirrorSet::open(&[paths[0].clone(), p2[0].clone()], 256, 512)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("another set"), "{e}");
        let _ = std::fs::remove_dir_all(d);
        let _ = std::fs::remove_dir_all(other);
    }

    #[test]
    fn a_version_1_mirror_is_refused_by_name_and_version() {
        let d = dir("v1");
        let (s, paths) = set(&d);
        drop(s);
        // A version 1 header, crc and all, as an older build wrote it.
        let mut h = header(&[7; 16], 0, 512, 256, 1);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&h[..HEADER_BODY]);
        h[HEADER_BODY..HEADER_BODY + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&paths[0], &h).expect("write");
        let e = MirrorSet::open(&paths, 256, 512).err().expect("refused");
        assert!(
            e.to_string().contains("a.mir") && e.to_string().contains("version 1"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    /// Bytes the file system has allocated to `path`.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    #[test]
    fn deallocate_punches_holes_reads_zeros_and_keeps_checksums_consistent() {
        let d = dir("dealloc");
        let (s, paths) = set(&d);
        for k in 0..32u64 {
            s.write(k * 8, &pattern(k as u8)).expect("write");
        }
        s.sync().expect("sync");
        let before: Vec<u64> = paths.iter().map(|p| allocated(p)).collect();
        assert!(
            s.checksums(0, 256)
                .expect("crcs")
                .iter()
                .all(|&c| c != DEALLOCATED),
            "every block mapped"
        );
        // Blocks 16-111: 48 KiB, whole 4 KiB pages of the data area (which starts at 4096).
        s.deallocate(16, 96).expect("deallocate");
        s.sync().expect("sync");
        for (p, b) in paths.iter().zip(&before) {
            assert!(
                allocated(p) + 40 * 1024 <= *b,
                "{}: the space went back to the file system",
                p.display()
            );
        }
        let crcs = s.checksums(0, 256).expect("crcs");
        for (lba, c) in crcs.iter().enumerate() {
            assert_eq!(
                *c == DEALLOCATED,
                (16..112).contains(&lba),
                "lba {lba}: crc {c:#x}"
            );
        }
        let mut b = vec![0u8; 4096];
        s.read(16, &mut b).expect("read");
        assert!(
            b.iter().all(|&x| x == 0),
            "deallocated blocks read as zeros"
        );
        s.read(8, &mut b).expect("read");
        assert_eq!(b, pattern(1), "neighbours untouched");
        s.read(112, &mut b).expect("read");
        assert_eq!(b, pattern(14), "neighbours untouched");
        // A lone block inside a page: zeroed in place, deallocated all the same.
        s.deallocate(3, 1).expect("deallocate");
        let mut one = vec![0u8; 512];
        s.read(3, &mut one).expect("read");
        assert!(one.iter().all(|&x| x == 0));
        assert_eq!(s.checksums(2, 3).expect("crcs")[1], DEALLOCATED);
        assert_eq!(s.scrub().expect("scrub").mismatches, 0, "scrub is clean");
        // Written again, a block is mapped again.
        s.write(16, &pattern(9)).expect("write");
        assert!(s
            .checksums(16, 8)
            .expect("crcs")
            .iter()
            .all(|&c| c != DEALLOCATED));
        assert!(matches!(
            s.deallocate(250, 7),
            Err(MediaError::OutOfRange { .. })
        ));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn repair_and_rebuild_keep_deallocated_blocks_deallocated() {
        let d = dir("dealloc-repair");
        let (s, paths) = set(&d);
        for k in 0..32u64 {
            s.write(k * 8, &pattern(k as u8)).expect("write");
        }
        s.deallocate(64, 64).expect("deallocate");
        s.sync().expect("sync");
        // Garbage lands in a deallocated block of mirror a (crc 0 says it must be zeros).
        let f = OpenOptions::new()
            .write(true)
            .open(&paths[0])
            .expect("open");
        f.write_all_at(&[0x77; 16], HEADER_LEN + 70 * 512 + 100)
            .expect("write");
        let mut b = vec![0u8; 4096];
        s.read(64, &mut b).expect("read from the good copy");
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(s.repairs(), 1);
        assert_eq!(
            s.checksums(64, 64).expect("crcs"),
            vec![DEALLOCATED; 64],
            "the repair deallocated the block again rather than writing it"
        );
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
        // Mirror b is replaced: the rebuild copies holes as holes.
        drop(s);
        std::fs::remove_file(&paths[1]).expect("lose b");
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        s.rebuild(1, 0, |_, _| {}).expect("rebuild");
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
        s.inject_eio(0, true);
        let crcs = s.checksums(0, 256).expect("crcs from b");
        for (lba, c) in crcs.iter().enumerate() {
            assert_eq!(*c == DEALLOCATED, (64..128).contains(&lba), "lba {lba}");
        }
        s.read(60, &mut b).expect("read from b");
        assert_eq!(&b[..2048], &pattern(7)[2048..], "mapped blocks copied");
        assert!(b[2048..].iter().all(|&x| x == 0), "deallocated ones zeros");
        // The rebuild writes b's whole metadata area, which a never had written.
        let (a, b) = (allocated(&paths[0]), allocated(&paths[1]));
        assert!(
            b <= a + 2 * META_SLOT,
            "b is as sparse as a where the set is unmapped: {b} bytes against {a}"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    /// Offset of metadata slot `k` (0 = A, 1 = B) in the test sets' files.
    fn slot(k: u64) -> u64 {
        let (meta_off, _) = layout(256, 512).expect("layout");
        meta_off + k * META_SLOT
    }

    fn flip(path: &Path, off: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        let mut one = [0u8; 1];
        f.read_exact_at(&mut one, off).expect("read");
        f.write_all_at(&[one[0] ^ 0x5a], off).expect("write");
    }

    #[test]
    fn layout_puts_the_metadata_area_after_the_crcs_on_a_4096_boundary() {
        // 256 blocks of 512: header 4096, data 131072, crcs 1024 -> 136192, rounded up.
        assert_eq!(layout(256, 512), Some((139_264, 139_264 + 2 * META_SLOT)));
        // 1 GiB of 4096-byte blocks: the crc area ends on a boundary already.
        assert_eq!(
            layout(262_144, 4096),
            Some((
                4096 + (1 << 30) + (1 << 20),
                4096 + (1 << 30) + (1 << 20) + 2 * META_SLOT
            ))
        );
        assert_eq!(layout(u64::MAX / 2, 4096), None);
    }

    #[test]
    fn meta_round_trip_and_limits() {
        let d = dir("meta-rt");
        let (s, paths) = set(&d);
        assert_eq!(s.read_meta(), None, "a new set has no record");
        s.write_meta(b"first").expect("write");
        assert_eq!(s.read_meta().as_deref(), Some(&b"first"[..]));
        s.write_meta(b"second").expect("write");
        assert_eq!(s.read_meta().as_deref(), Some(&b"second"[..]));
        s.write_meta(b"").expect("an empty record is a record");
        assert_eq!(s.read_meta(), Some(Vec::new()));
        let big = vec![1u8; META_MAX];
        s.write_meta(&big).expect("a full slot");
        assert_eq!(s.read_meta(), Some(big));
        assert!(matches!(
            s.write_meta(&vec![1u8; META_MAX + 1]),
            Err(MediaError::MetaTooLarge { .. })
        ));
        // The data blocks are untouched by all this.
        s.write(0, &pattern(4)).expect("write");
        let mut b = vec![0u8; 4096];
        s.read(0, &mut b).expect("read");
        assert_eq!(b, pattern(4));
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
        drop(s);
        let len = std::fs::metadata(&paths[0]).expect("stat").len();
        assert_eq!(Some(len), layout(256, 512).map(|l| l.1), "file length");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn meta_survives_reopen() {
        let d = dir("meta-reopen");
        let (s, paths) = set(&d);
        for k in 0..5u8 {
            s.write_meta(&[k; 100]).expect("write");
        }
        drop(s);
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.read_meta(), Some(vec![4; 100]));
        // Generations go on from where they were: the next record wins after a reopen.
        s.write_meta(b"later").expect("write");
        drop(s);
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.read_meta().as_deref(), Some(&b"later"[..]));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_torn_newest_slot_falls_back_to_the_previous_generation() {
        let d = dir("meta-torn");
        let (s, paths) = set(&d);
        s.write_meta(b"old").expect("generation 1, slot B");
        s.write_meta(b"new").expect("generation 2, slot A");
        drop(s);
        // Damage the newest record's payload on every mirror.
        for p in &paths {
            flip(p, slot(0) + META_HEAD as u64 + 1);
        }
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.read_meta().as_deref(), Some(&b"old"[..]));
        assert!(s.status().iter().all(|m| m.state == MirrorState::Healthy));
        // The next record overwrites the damaged slot; the fallback record stays.
        s.write_meta(b"newer").expect("write");
        drop(s);
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.read_meta().as_deref(), Some(&b"newer"[..]));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_damaged_copy_on_one_mirror_is_repaired_at_open_and_by_scrub() {
        let d = dir("meta-one");
        let (s, paths) = set(&d);
        s.write_meta(b"old").expect("write");
        s.write_meta(b"new").expect("write");
        drop(s);
        flip(&paths[1], slot(0) + 3);
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(
            s.read_meta().as_deref(),
            Some(&b"new"[..]),
            "the good copy wins"
        );
        assert_eq!(s.scrub().expect("scrub").mismatches, 0, "copied at open");
        // Damage under a running set: the scrub finds and rewrites it.
        flip(&paths[0], slot(0) + META_HEAD as u64);
        let r = s.scrub().expect("scrub");
        assert_eq!((r.mismatches, r.repaired), (1, 1));
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
        // Both copies good again: either mirror alone gives the record.
        drop(s);
        std::fs::remove_file(&paths[1]).expect("lose b");
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.read_meta().as_deref(), Some(&b"new"[..]));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_failed_mirror_does_not_stop_write_meta() {
        let d = dir("meta-eio");
        let (s, paths) = set(&d);
        s.write_meta(b"both").expect("write");
        s.inject_eio(1, true);
        s.write_meta(b"survivor")
            .expect("the healthy mirror takes it");
        assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
        assert_eq!(s.read_meta().as_deref(), Some(&b"survivor"[..]));
        s.inject_eio(0, true);
        assert!(
            s.write_meta(b"nowhere").is_err(),
            "no mirror left to take it"
        );
        assert_eq!(
            s.read_meta().as_deref(),
            Some(&b"survivor"[..]),
            "a failed write changes nothing"
        );
        drop(s);
        // After a restart the stale mirror b is not read; a has the newest record.
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
        assert_eq!(s.read_meta().as_deref(), Some(&b"survivor"[..]));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn rebuild_carries_the_metadata_to_the_new_mirror() {
        let d = dir("meta-rebuild");
        let (s, paths) = set(&d);
        s.write_meta(b"one").expect("write");
        drop(s);
        // Mirror b is replaced by an empty file: a new mirror with no record at all.
        std::fs::remove_file(&paths[1]).expect("lose b");
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert!(matches!(s.status()[1].state, MirrorState::Failed(_)));
        s.write_meta(b"two").expect("written to a only");
        s.rebuild(1, 0, |_, _| {}).expect("rebuild");
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
        drop(s);
        // Now lose a: b alone must give the newest record.
        std::fs::remove_file(&paths[0]).expect("lose a");
        let s = MirrorSet::open(&paths, 256, 512).expect("reopen");
        assert_eq!(s.status()[1].state, MirrorState::Healthy);
        assert_eq!(s.read_meta().as_deref(), Some(&b"two"[..]));
        let _ = std::fs::remove_dir_all(d);
    }

    /// A power cut at every step of a `write_meta` (two mirrors: two writes, two syncs),
    /// each with a few write-back outcomes: after the reboot the record is the old one or
    /// the new one, never missing, and the new one whenever the call returned.
    #[test]
    fn power_loss_during_write_meta_keeps_the_old_or_the_new_record() {
        use super::super::disk::SimFs;
        let open = |fs: &SimFs| {
            let disks: Vec<(PathBuf, Box<dyn Disk>)> = ["a", "b"]
                .iter()
                .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
                .collect();
            MirrorSet::open_disks(disks, 64, 512)
        };
        let (mut old, mut new, mut acked) = (0, 0, 0);
        for ops in 0..6 {
            for seed in 0..8 {
                let fs = SimFs::new(seed);
                let s = open(&fs).expect("open");
                // Header and payload span three sectors: a cut before the syncs keeps
                // all, some or none of them, so some records come back whole, some torn.
                s.write_meta(&[1u8; 1000]).expect("old record");
                fs.arm(ops);
                let returned = s.write_meta(&[2u8; 1000]).is_ok();
                let snap = fs.snapshot();
                let fs = SimFs::from_snapshot(seed, snap);
                let s = open(&fs).expect("reopen after the cut");
                let got = s.read_meta().expect("a record survives");
                assert!(
                    got == [2u8; 1000] || (!returned && got == [1u8; 1000]),
                    "ops {ops} seed {seed}: returned {returned}, got {:?}",
                    &got[..4]
                );
                // Whatever won is now on every healthy mirror.
                assert_eq!(s.scrub().expect("scrub").mismatches, 0);
                acked += usize::from(returned);
                if got == [1u8; 1000] {
                    old += 1;
                } else {
                    new += 1;
                }
            }
        }
        assert!(
            old > 0 && new > acked && acked > 0,
            "cuts before, during and after: {old} old, {new} new, {acked} acknowledged"
        );
    }

    use super::super::disk::{SimFault, SimFs};
    use std::sync::Arc;

    /// Blocks in the simulated sets: two rebuild chunks of 512-byte blocks.
    const SIM_BLOCKS: u64 = 4096;

    fn sim_set(fs: &SimFs, names: &[&str]) -> MirrorSet {
        let disks: Vec<(PathBuf, Box<dyn Disk>)> = names
            .iter()
            .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
            .collect();
        MirrorSet::open_disks(disks, SIM_BLOCKS, 512).expect("open")
    }

    /// Fails mirror `name` (index `i`) with one injected write error.
    fn fail_by_write(fs: &SimFs, s: &MirrorSet, name: &str, i: usize) {
        fs.fail_next(name, SimFault::Write, 1);
        s.write(SIM_BLOCKS - 8, &pattern(0xee))
            .expect("the others take it");
        assert!(
            matches!(s.status()[i].state, MirrorState::Failed(_)),
            "{:?}",
            s.status()
        );
    }

    fn failed(s: &MirrorSet, i: usize) -> bool {
        matches!(s.status()[i].state, MirrorState::Failed(_))
    }

    /// Overwrites block `lba`'s data on the simulated file `name`, leaving its crc: a
    /// copy that no longer verifies.
    fn corrupt(fs: &SimFs, name: &str, lba: u64) {
        fs.file(name)
            .write_at(&[0xa5; 512], HEADER_LEN + lba * 512)
            .expect("corrupt");
    }

    #[test]
    fn a_write_or_sync_error_on_the_rebuild_target_leaves_it_failed() {
        for fault in [SimFault::Write, SimFault::Sync] {
            let fs = SimFs::new(1);
            let s = sim_set(&fs, &["a", "b"]);
            s.write(10, &pattern(1)).expect("write");
            fail_by_write(&fs, &s, "b", 1);
            let mut chunks = 0;
            let r = s.rebuild(1, 0, |_, _| {
                chunks += 1;
                if chunks == 1 {
                    // Block 10 is already copied: this write is the only way b gets
                    // the new data, and b fails it.
                    fs.fail_next("b", fault, 1);
                    s.write(10, &pattern(3)).expect("a takes the write");
                    s.sync().expect("a syncs");
                }
            });
            assert!(chunks >= 1, "{fault:?}: the rebuild copied a chunk");
            let mut got = vec![0u8; 4096];
            s.read(10, &mut got).expect("read");
            assert!(got == pattern(3), "{fault:?}: the new data");
            // Without a, only b could answer: it must not, for it missed the write.
            s.inject_eio(0, true);
            let stale = s.read(10, &mut got).is_ok() && got == pattern(1);
            assert!(!stale, "{fault:?}: a read returned stale data from b");
            assert!(
                failed(&s, 1),
                "{fault:?}: b stays failed after its {fault:?} error, state {:?}, rebuild {r:?}",
                s.status()[1].state
            );
            assert!(r.is_err(), "{fault:?}: the rebuild reports the failure");
        }
    }

    #[test]
    fn a_write_error_of_the_rebuild_itself_leaves_the_target_failed() {
        let fs = SimFs::new(2);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(10, &pattern(1)).expect("write");
        fail_by_write(&fs, &s, "b", 1);
        fs.fail_next("b", SimFault::Write, 1);
        assert!(s.rebuild(1, 0, |_, _| {}).is_err());
        assert!(failed(&s, 1), "{:?}", s.status());
        // A new, explicit rebuild may run again and succeeds.
        s.rebuild(1, 0, |_, _| {}).expect("second rebuild");
        assert_eq!(s.status()[1].state, MirrorState::Healthy);
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    }

    #[test]
    fn of_two_concurrent_rebuilds_exactly_one_runs() {
        use std::sync::mpsc;
        let fs = SimFs::new(3);
        let s = sim_set(&fs, &["a", "b", "c"]);
        s.write(10, &pattern(1)).expect("write");
        fail_by_write(&fs, &s, "b", 1);
        fail_by_write(&fs, &s, "c", 2);
        let (running_tx, running_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let wait = Duration::from_secs(20);
        std::thread::scope(|sc| {
            let first = sc.spawn(|| {
                let mut running = Some(running_tx);
                s.rebuild(1, 0, move |_, _| {
                    if let Some(tx) = running.take() {
                        let _ = tx.send(());
                        let _ = go_rx.recv_timeout(wait);
                    }
                })
            });
            running_rx
                .recv_timeout(wait)
                .expect("the first rebuild runs");
            let same = s.rebuild(1, 0, |_, _| {});
            let other = s.rebuild(2, 0, |_, _| {});
            let _ = go_tx.send(());
            let first = first.join().expect("first rebuild thread");
            assert!(
                same.is_err(),
                "a second rebuild of mirror 1 ran beside the first: {same:?}"
            );
            assert!(
                other.is_err(),
                "a rebuild of mirror 2 ran beside the one of mirror 1: {other:?}"
            );
            let msg = same.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("already"), "{msg}");
            first.expect("the first rebuild completes");
        });
        assert_eq!(s.status()[1].state, MirrorState::Healthy);
        assert!(failed(&s, 2), "mirror 2 was never started");
        s.rebuild(2, 0, |_, _| {}).expect("one after the other");
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    }

    #[test]
    fn the_last_healthy_mirror_is_not_rebuilt() {
        let fs = SimFs::new(4);
        let s = sim_set(&fs, &["a", "b"]);
        s.write(10, &pattern(1)).expect("write");
        fail_by_write(&fs, &s, "b", 1);
        let r = s.rebuild(0, 0, |_, _| {});
        assert_eq!(
            s.status()[0].state,
            MirrorState::Healthy,
            "the last healthy mirror stays in service (rebuild said {r:?})"
        );
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("last healthy"), "refused by name: {msg:?}");
        let mut got = vec![0u8; 4096];
        s.read(10, &mut got).expect("reads go on");
        assert_eq!(got, pattern(1));
        // A healthy mirror with a healthy partner has nothing to rebuild either.
        s.rebuild(1, 0, |_, _| {}).expect("rebuild b");
        let msg = s.rebuild(0, 0, |_, _| {}).err().map(|e| e.to_string());
        assert!(
            msg.as_deref().is_some_and(|m| m.contains("healthy")),
            "{msg:?}"
        );
        assert_eq!(s.status()[0].state, MirrorState::Healthy);
    }

    #[test]
    fn a_failed_repair_write_or_sync_on_read_fails_that_mirror() {
        for fault in [SimFault::Write, SimFault::Sync] {
            let fs = SimFs::new(5);
            let s = sim_set(&fs, &["a", "b"]);
            s.write(0, &pattern(7)).expect("write");
            s.sync().expect("sync");
            corrupt(&fs, "a", 3);
            fs.fail_next("a", fault, 1);
            let mut got = vec![0u8; 4096];
            s.read(0, &mut got).expect("b answers");
            assert_eq!(got, pattern(7));
            assert!(
                failed(&s, 0),
                "{fault:?}: a failed repair leaves a out of service, state {:?}",
                s.status()[0].state
            );
            assert_eq!(s.repairs(), 0, "{fault:?}: nothing was repaired");
        }
    }

    #[test]
    fn a_failed_repair_write_or_sync_in_scrub_fails_that_mirror() {
        for fault in [SimFault::Write, SimFault::Sync] {
            // A copy that fails its checksum.
            let fs = SimFs::new(6);
            let s = sim_set(&fs, &["a", "b"]);
            s.write(0, &pattern(7)).expect("write");
            corrupt(&fs, "a", 3);
            fs.fail_next("a", fault, 1);
            s.scrub().expect("scrub");
            assert!(
                failed(&s, 0),
                "{fault:?}: checksum repair, state {:?}",
                s.status()[0].state
            );
            // Copies that each verify but differ: b gets a's, and fails to take it.
            let fs = SimFs::new(7);
            let s = sim_set(&fs, &["a", "b"]);
            s.write(0, &pattern(7)).expect("write");
            let other = pattern(8);
            let crc = crc32c::crc32c(&other[..512]).max(1);
            let a = fs.file("a");
            a.write_at(&other[..512], HEADER_LEN).expect("data");
            a.write_at(&crc.to_le_bytes(), HEADER_LEN + SIM_BLOCKS * 512)
                .expect("crc");
            fs.fail_next("b", fault, 1);
            let r = s.scrub().expect("scrub");
            assert_eq!(r.mismatches, 1);
            assert!(
                failed(&s, 1),
                "{fault:?}: copies-differ repair, state {:?}",
                s.status()[1].state
            );
        }
    }

    /// A reader finds a bad copy on a, reads the good one on b, and before it rewrites a
    /// a newer write (a destage) of the same block lands on both: the repair must not
    /// put the old data back over it.
    #[test]
    fn read_repair_never_overwrites_a_newer_write() {
        use std::sync::mpsc;
        let fs = SimFs::new(8);
        let s = Arc::new(sim_set(&fs, &["a", "b"]));
        s.write(0, &pattern(1)).expect("write");
        s.sync().expect("sync");
        corrupt(&fs, "a", 0);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let writer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                if go_rx.recv().is_ok() {
                    s.write(0, &pattern(2)).expect("newer write");
                    let _ = done_tx.send(());
                }
            })
        };
        // The reader reads b's data, then its crcs: right after those, the writer runs.
        let mut reads_of_b = 0;
        let mut go = Some(go_tx);
        fs.after_read(
            "b",
            Box::new(move || {
                reads_of_b += 1;
                if reads_of_b == 2 {
                    if let Some(go) = go.take() {
                        let _ = go.send(());
                        // Were the writer held back by a lock the reader holds, it
                        // could not finish now: go on after a while rather than hang.
                        let _ = done_rx.recv_timeout(Duration::from_secs(5));
                    }
                }
            }),
        );
        let mut got = vec![0u8; 4096];
        s.read(0, &mut got).expect("read");
        assert!(got == pattern(1) || got == pattern(2), "old or new");
        writer.join().expect("writer");
        s.read(0, &mut got).expect("read");
        assert!(
            got == pattern(2),
            "a repair wrote the old block 0 over the newer write: {}",
            if got[..512] == pattern(1)[..512] {
                "block 0 is the old data"
            } else {
                "block 0 is neither"
            }
        );
        assert_eq!(s.scrub().expect("scrub").mismatches, 0);
    }
}
