//! The mirror set: RAID-1 over two or more files, with a crc32c beside every block on every
//! mirror so silent corruption is found and repaired from a good copy, and a small
//! metadata area (two alternating slots) for state that must be as durable as the data,
//! such as a LUN's persistent reservations. Formats and rules: docs/design.md.
//!
//! This file holds the set's state and what it reports; each concern has its own file:
//! `format.rs` (the header, crc area and metadata record on each file), `open.rs` (opening
//! and assembling the set from its files), `io.rs` (the write and read path, read-repair,
//! deallocation), `health.rs` (failing a mirror, degraded service), `meta.rs` (the
//! metadata record), `rebuild.rs` (copying a failed mirror back), `scrub.rs` (verifying
//! and repairing every copy).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use super::disk::Disk;

mod format;
mod health;
#[cfg(test)]
mod inline_tests;
mod io;
mod meta;
#[cfg(test)]
mod meta_tests;
mod open;
mod rebuild;
mod scrub;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod tests;

use format::MetaRecord;
pub use format::{DEALLOCATED, META_MAX};

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
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> std::io::Result<bool> {
        self.eio()?;
        self.file.read_at_nowait(buf, off)
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

impl MirrorSet {
    /// Bytes per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.blocks
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
