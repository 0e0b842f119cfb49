//! The read and write path: every write to every mirror in service, reads from the
//! first copy that verifies, and read-repair of the bad copies met on the way; and the
//! read that must not wait, inside an inline scope ([`crate::media::inline`]).

use std::sync::atomic::Ordering;

use tracing::warn;

use super::format::DEALLOCATED;
use super::MirrorSet;
use crate::media::{inline, MediaError};

impl MirrorSet {
    pub(super) fn check_range(&self, lba: u64, len: usize) -> Result<u64, MediaError> {
        let bs = u64::from(self.block_size);
        let n = len as u64 / bs;
        if !(len as u64).is_multiple_of(bs) || lba.checked_add(n).is_none_or(|e| e > self.blocks) {
            return Err(MediaError::OutOfRange { lba, blocks: n });
        }
        Ok(n)
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
        self.on_writable("write", |m| {
            m.write_at(data, self.data_off(lba))
                .and_then(|()| m.write_at(&crcs, self.crc_off(lba)))
        })
    }

    /// Runs `op` on every mirror that takes writes, under the shared I/O lock (a repair
    /// holds it exclusively); a mirror whose `op` fails is taken out of service. Ok while
    /// one mirror is still in service.
    fn on_writable(
        &self,
        what: &str,
        op: impl Fn(&super::Mirror) -> std::io::Result<()>,
    ) -> Result<(), MediaError> {
        let _g = self
            .io
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for i in 0..self.mirrors.len() {
            if !self.writable(i) {
                continue;
            }
            if let Err(e) = op(&self.mirrors[i]) {
                self.fail(i, format!("{what} error: {e}"));
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
    pub(super) fn read_from(
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
        Ok(self.verify(buf, &raw, crcs))
    }

    /// Puts the stored checksums `raw` (4 bytes a block) into `crcs`, one per block, and
    /// returns the indexes of the blocks of `buf` that do not verify against them.
    fn verify(&self, buf: &[u8], raw: &[u8], crcs: &mut Vec<u32>) -> Vec<usize> {
        crcs.clear();
        crcs.extend(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        let bs = self.block_size as usize;
        (0..crcs.len())
            .filter(|&k| {
                let b = &buf[k * bs..(k + 1) * bs];
                if crcs[k] == DEALLOCATED {
                    !all_zero(b)
                } else {
                    crc32c::crc32c(b).max(1) != crcs[k]
                }
            })
            .collect()
    }

    /// Reads whole blocks from a mirror whose copy verifies, repairing bad copies. Inside
    /// an inline scope it never waits: see `read_nowait`.
    pub fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        if inline::active() {
            return self.read_nowait(lba, buf);
        }
        self.read_verified(lba, buf, &mut Vec::new())
    }

    /// [`read`](Self::read) on an async worker: what the blocking read does when all goes
    /// well (the first mirror's copy verifies, so nothing is repaired), provided that
    /// copy and its checksums are already in the page cache. Everything else is refused
    /// ([`inline::refuse`], [`MediaError::WouldBlock`]) rather than dealt with here: data
    /// not in memory, a read error, a checksum mismatch, a mirror out of service or being
    /// rebuilt. The command then runs again on a blocking thread, whose read fails a
    /// mirror, logs, counts and repairs as it always does, once. So a refused read has no
    /// effect of its own: no mirror failed, no repair, no counter, no log line.
    ///
    /// Only a set with every mirror healthy is tried. The blocking read would take the
    /// same first copy in a degraded set too, but failures and rebuilds are rare, and
    /// then the ordinary path, which knows how to handle them, serves every read.
    fn read_nowait(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let n = self.check_range(lba, buf.len())?;
        let refuse = || {
            inline::refuse();
            Err(MediaError::WouldBlock)
        };
        // A rebuild puts its mirror in the Rebuilding state for its whole run, so this
        // also refuses while one runs.
        if !(0..self.mirrors.len()).all(|i| self.healthy(i)) {
            return refuse();
        }
        let m = &self.mirrors[0];
        let Ok(len) = usize::try_from(n * 4) else {
            return refuse();
        };
        let mut raw = vec![0u8; len];
        // Data, then checksums: the order of `read_from`. Any error is the blocking
        // read's to meet and handle.
        let cached = m
            .read_at_nowait(buf, self.data_off(lba))
            .and_then(|data| Ok(data && m.read_at_nowait(&mut raw, self.crc_off(lba))?));
        if !matches!(cached, Ok(true)) || !self.verify(buf, &raw, &mut Vec::new()).is_empty() {
            return refuse();
        }
        Ok(())
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
    pub(super) fn read_copies(
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
    pub(super) fn repair_one(&self, i: usize, lba: u64, block: &[u8], crc: u32) -> bool {
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
        // The checksums are zeroed by a punch as well: it zeroes exactly the byte range
        // (freeing the whole pages inside it), which is what 0 = deallocated needs.
        self.on_writable("deallocate", |m| {
            m.punch(self.data_off(lba), blocks * bs)
                .and_then(|()| m.punch(self.crc_off(lba), blocks * 4))
        })
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
}

/// Whether `b` holds only zeros. Compared a page at a time against zeros (memcmp, which
/// is vectorized): a byte-at-a-time test cannot be, because it stops at the first
/// nonzero byte, and it took 45% of the daemon's CPU time reading unwritten 128 KiB
/// blocks (perf).
pub(crate) fn all_zero(b: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}
