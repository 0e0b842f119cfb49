//! The mirror set: RAID-1 over two or more files, with a crc32c beside every block on every
//! mirror so silent corruption is found and repaired from a good copy. Formats and rules:
//! docs/design.md.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::disk::Disk;
use super::MediaError;

const MAGIC: &[u8; 8] = b"FTSSMIR1";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 4096;
/// Bytes of the header that the crc covers.
const HEADER_BODY: usize = 8 + 4 + 4 + 16 + 4 + 8 + 8;

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
}

/// A RAID-1 set of mirror files holding one volume.
pub struct MirrorSet {
    block_size: u32,
    blocks: u64,
    set_id: [u8; 16],
    epoch: AtomicU64,
    mirrors: Vec<Mirror>,
    /// Writers hold it shared; a rebuild chunk holds it exclusively, so a stale copy never
    /// overwrites a newer write.
    io: RwLock<()>,
    repairs: AtomicU64,
    /// Serialises epoch changes and header rewrites.
    meta: Mutex<()>,
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

fn parse_header(h: &[u8]) -> Option<Header> {
    if h.len() < HEADER_BODY + 4 || &h[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(h[HEADER_BODY..HEADER_BODY + 4].try_into().ok()?);
    if crc32c::crc32c(&h[..HEADER_BODY]) != crc
        || u32::from_le_bytes(h[8..12].try_into().ok()?) != VERSION
    {
        return None;
    }
    Some(Header {
        set_id: h[16..32].try_into().ok()?,
        block_size: u32::from_le_bytes(h[32..36].try_into().ok()?),
        blocks: u64::from_le_bytes(h[36..44].try_into().ok()?),
        epoch: u64::from_le_bytes(h[44..52].try_into().ok()?),
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
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
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
        let data_len = blocks
            .checked_mul(u64::from(block_size))
            .ok_or_else(|| MediaError::Failed("volume size overflows".into()))?;
        let file_len = HEADER_LEN + data_len + blocks * 4;
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
                let hd = parse_header(&h).ok_or_else(|| {
                    MediaError::Failed(format!(
                        "{}: not an ftss mirror file (foreign or corrupt header)",
                        p.display()
                    ))
                })?;
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
        Ok(Self {
            block_size,
            blocks,
            set_id,
            epoch: AtomicU64::new(epoch),
            mirrors,
            io: RwLock::new(()),
            repairs: AtomicU64::new(0),
            meta: Mutex::new(()),
        })
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
    fn fail(&self, i: usize, why: String) {
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
            // 0 marks "never written"; a real crc of 0 is stored as 1 and the 1-in-2^32
            // collision makes the block read as corrupt, never as wrong data.
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

    /// Reads blocks and their checksums from mirror `i`; returns the indexes of blocks
    /// whose copy does not verify.
    fn read_from(&self, i: usize, lba: u64, buf: &mut [u8]) -> std::io::Result<Vec<usize>> {
        let m = &self.mirrors[i];
        let n = buf.len() / self.block_size as usize;
        let mut crcs = vec![0u8; n * 4];
        m.read_at(buf, self.data_off(lba))?;
        m.read_at(&mut crcs, self.crc_off(lba))?;
        let bs = self.block_size as usize;
        Ok((0..n)
            .filter(|&k| {
                let stored = u32::from_le_bytes([
                    crcs[4 * k],
                    crcs[4 * k + 1],
                    crcs[4 * k + 2],
                    crcs[4 * k + 3],
                ]);
                let b = &buf[k * bs..(k + 1) * bs];
                if stored == 0 {
                    b.iter().any(|&x| x != 0)
                } else {
                    crc32c::crc32c(b).max(1) != stored
                }
            })
            .collect())
    }

    /// Reads whole blocks from a mirror whose copy verifies, repairing bad copies.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.check_range(lba, buf.len())?;
        let bs = self.block_size as usize;
        let order: Vec<usize> = (0..self.mirrors.len())
            .filter(|&i| self.healthy(i))
            .collect();
        let mut first_bad: Option<(usize, Vec<usize>)> = None;
        for &i in &order {
            match self.read_from(i, lba, buf) {
                Ok(bad) if bad.is_empty() => {
                    if let Some((j, blocks)) = first_bad {
                        // Mirror j had bad copies that this one holds good: rewrite them.
                        for k in blocks {
                            let at = lba + k as u64;
                            if self.write_one(j, at, &buf[k * bs..(k + 1) * bs]).is_ok() {
                                self.repairs.fetch_add(1, Ordering::Relaxed);
                                warn!(mirror = %self.mirrors[j].path.display(), lba = at, "repaired a corrupt block");
                            }
                        }
                    }
                    return Ok(());
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

    fn write_one(&self, i: usize, lba: u64, block: &[u8]) -> std::io::Result<()> {
        let m = &self.mirrors[i];
        let c = crc32c::crc32c(block).max(1);
        m.write_at(block, self.data_off(lba))?;
        m.write_at(&c.to_le_bytes(), self.crc_off(lba))?;
        m.sync()
    }

    /// Copies every block from a healthy mirror onto mirror `target`, `rate_bytes_s` at
    /// most, while I/O continues; `progress(done, total)` is called per chunk.
    pub fn rebuild(
        &self,
        target: usize,
        rate_bytes_s: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        if target >= self.mirrors.len() {
            return Err(MediaError::Failed(format!("no mirror {target}")));
        }
        *self.mirrors[target].state() = MirrorState::Rebuilding(0);
        self.mirrors[target]
            .inject_eio
            .store(false, Ordering::Relaxed);
        info!(mirror = %self.mirrors[target].path.display(), "rebuild started");
        let bs = u64::from(self.block_size);
        let chunk = (1u64 << 20) / bs;
        let mut buf = vec![0u8; (chunk * bs) as usize];
        let started = Instant::now();
        let mut lba = 0;
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let b = &mut buf[..(n * bs) as usize];
            {
                let _g = self
                    .io
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                self.read(lba, b)?;
                let crcs: Vec<u8> = b
                    .chunks(bs as usize)
                    .flat_map(|x| {
                        // Unwritten blocks keep crc 0, so a rebuilt copy stays identical.
                        let c = if x.iter().all(|&v| v == 0) {
                            0
                        } else {
                            crc32c::crc32c(x).max(1)
                        };
                        c.to_le_bytes()
                    })
                    .collect();
                let m = &self.mirrors[target];
                m.write_at(b, self.data_off(lba))
                    .and_then(|()| m.write_at(&crcs, self.crc_off(lba)))
                    .map_err(|e| {
                        *m.state() = MirrorState::Failed(format!("rebuild write failed: {e}"));
                        MediaError::Io(e)
                    })?;
            }
            lba += n;
            *self.mirrors[target].state() = MirrorState::Rebuilding(lba);
            progress(lba, self.blocks);
            if rate_bytes_s > 0 {
                let due = Duration::from_secs_f64((lba * bs) as f64 / rate_bytes_s as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let _g = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let m = &self.mirrors[target];
        m.sync()
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
            .and_then(|()| m.sync())
            .map_err(MediaError::Io)?;
        *m.state() = MirrorState::Healthy;
        info!(mirror = %m.path.display(), "rebuild complete");
        Ok(())
    }

    /// Verifies every copy of every block, repairing bad copies from good ones.
    pub fn scrub(&self) -> Result<ScrubReport, MediaError> {
        let mut report = ScrubReport::default();
        let bs = self.block_size as usize;
        let chunk = ((1usize << 20) / bs) as u64;
        let mut lba = 0;
        let mut buf = vec![0u8; chunk as usize * bs];
        let mut other = vec![0u8; chunk as usize * bs];
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
                let want = self.data_off(self.blocks) + self.blocks * 4;
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
                match self.read_from(i, lba, &mut buf[..len]) {
                    Ok(bad) => report.mismatches += bad.len() as u64,
                    Err(e) => self.fail(i, format!("scrub read error: {e}")),
                }
            }
            // A verified read repairs the bad copies it finds.
            self.read(lba, &mut other[..len])?;
            report.repaired += self.repairs.load(Ordering::Relaxed) - before;
            // Copies that each verify can still disagree (a crash between the writes to
            // two mirrors of a block no longer in the journal cannot leave this, so it
            // means a bug or tampering): count it and make every copy the verified one.
            for &i in &healthy {
                if !self.healthy(i) || self.read_from(i, lba, &mut buf[..len]).is_err() {
                    continue;
                }
                for k in 0..n as usize {
                    let (a, b) = (&buf[k * bs..(k + 1) * bs], &other[k * bs..(k + 1) * bs]);
                    if a != b {
                        report.mismatches += 1;
                        let at = lba + k as u64;
                        warn!(mirror = %self.mirrors[i].path.display(), lba = at, "copies differ");
                        if self.write_one(i, at, b).is_ok() {
                            report.repaired += 1;
                            self.repairs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            report.blocks += n;
            lba += n;
        }
        Ok(report)
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

    /// Bad copies rewritten from good ones since start.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
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
}
