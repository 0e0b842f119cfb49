//! Storage media under the LUNs: the [`BlockStore`] trait and its implementations.
//!
//! The SCSI layer sees a LUN's storage only through [`BlockStore`], so a plain file, the
//! nonvolatile write cache over a mirror set, or a test double can stand behind it.

pub mod cache;
pub mod direct;
pub mod disk;
pub mod file;
pub mod inline;
#[cfg(test)]
pub(crate) mod mem;
pub mod mirror;

use std::io;

/// The write cache's volume id for a LUN: a stable hash of target and LUN, so reordering
/// the configuration can never replay one LUN's records into another.
pub(crate) fn volume_id(iqn: &str, lun: u16) -> u32 {
    let h = format!("{}/{lun}", iqn.to_ascii_lowercase())
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    // u32::MAX marks wrap records.
    h.min(u32::MAX - 1)
}

/// How records get into the write cache's mapped file, and how a commit makes them
/// durable (`media.cache_writes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheWrites {
    /// `pwrite` into the shared map's page cache; a commit is `msync(MS_SYNC)`.
    Write,
    /// CPU stores through the shared map (a DAX file on persistent memory); a commit is
    /// `msync(MS_SYNC)`.
    Map,
    /// Stores into a private map; a commit is one direct, data-synchronous write of the
    /// pages that hold the records ([`direct::DirectRegion`]).
    Direct,
}

/// How a store acknowledges writes; reported to initiators in the Caching mode page
/// (WCE) and the Extended INQUIRY Data VPD page (V_SUP / NV_SUP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Writes are durable when acknowledged; no write cache is visible (WCE = 0).
    WriteThrough,
    /// Writes are acknowledged on reaching a volatile cache; SYNCHRONIZE CACHE or FUA make
    /// them durable (WCE = 1, V_SUP = 1).
    Volatile,
    /// Writes are acknowledged once committed to a nonvolatile cache (WCE = 1, NV_SUP = 1):
    /// they survive power loss without SYNCHRONIZE CACHE.
    Nonvolatile,
}

/// Errors a store reports; the SCSI layer maps each to sense data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The request reaches past the end of the store.
    #[error("lba {lba} + {blocks} blocks is beyond the end of the store")]
    OutOfRange {
        /// First block asked for.
        lba: u64,
        /// Number of blocks asked for.
        blocks: u64,
    },
    /// An I/O error that no healthy copy could mask (MEDIUM ERROR to the initiator).
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// Data read back failed its checksum on every copy (MEDIUM ERROR, unrecovered read).
    #[error("checksum mismatch at lba {lba} on every copy")]
    Corrupt {
        /// The block that failed.
        lba: u64,
    },
    /// The store has no healthy backing left (HARDWARE ERROR; TEST UNIT READY fails).
    #[error("no healthy backing store: {0}")]
    Failed(String),
    /// The store cannot take the write now, but may later (BUSY / TASK SET FULL).
    #[error("store is full, try again")]
    Full,
    /// Inside an [`inline::run_inline`] scope, the operation would have waited for the
    /// device and gave up without an effect (see [`inline::refuse`]); the command runs
    /// again on a blocking thread, so this never reaches an initiator.
    #[error("would wait for the device: runs again on a blocking thread")]
    WouldBlock,
    /// A mirror rebuild that may not start: the mirror needs none, it is the last healthy
    /// copy, there is no healthy copy to take the data from, or a rebuild is running.
    #[error("rebuild refused: {0}")]
    RebuildRefused(String),
    /// A metadata record larger than a mirror set's metadata slot.
    #[error("metadata record of {len} bytes: a slot holds at most {max}")]
    MetaTooLarge {
        /// Bytes asked to store.
        len: usize,
        /// The most a slot takes.
        max: usize,
    },
}

/// Whether a range of blocks has storage behind it (SBC-3 4.7 logical block provisioning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// The blocks hold data (perhaps zeros that were written).
    Mapped,
    /// No storage is allocated; the blocks read back as zeros.
    Deallocated,
}

/// Writes zeros over `blocks` blocks from `lba`, 1 MiB at a time: what unmapping means
/// on a store that cannot deallocate.
pub fn write_zeros<S: BlockStore + ?Sized>(
    store: &S,
    lba: u64,
    blocks: u64,
) -> Result<(), MediaError> {
    let bs = store.block_size() as usize;
    let chunk_blocks = ((1 << 20) / bs as u64).max(1);
    let zeros = vec![0u8; chunk_blocks.min(blocks) as usize * bs];
    let mut done = 0u64;
    while done < blocks {
        let n = (blocks - done).min(chunk_blocks);
        store.write_blocks(lba + done, &zeros[..n as usize * bs], false)?;
        done += n;
    }
    Ok(())
}

/// A fixed-size array of logical blocks: the storage behind one LUN.
///
/// Implementations are shared between connection tasks and called from blocking
/// threads; every method may block on I/O.
pub trait BlockStore: Send + Sync + 'static {
    /// Bytes per logical block (512 or 4096).
    fn block_size(&self) -> u32;

    /// Number of logical blocks.
    fn num_blocks(&self) -> u64;

    /// Grows the store to `blocks` blocks (`admin luns resize`); stores that cannot
    /// grow refuse.
    fn grow(&self, _blocks: u64) -> Result<(), MediaError> {
        Err(MediaError::Failed("this store cannot grow".into()))
    }

    /// Reads `buf.len() / block_size()` whole blocks starting at `lba` into `buf`.
    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError>;

    /// Writes whole blocks starting at `lba`. Returns once the data is as durable as
    /// [`cache_mode`](Self::cache_mode) promises, or fully durable when `fua` is set.
    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), MediaError>;

    /// Makes every write completed before this call durable (SYNCHRONIZE CACHE).
    fn flush(&self) -> Result<(), MediaError>;

    /// Deallocates `blocks` blocks from `lba`; they read back as zeros afterwards.
    /// Stores without thin provisioning write zeros instead.
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), MediaError> {
        write_zeros(self, lba, blocks)
    }

    /// Whether the store deallocates on [`unmap`](Self::unmap) (thin provisioning).
    fn thin_provisioned(&self) -> bool {
        false
    }

    /// Provisioning status of the blocks from `lba` (GET LBA STATUS): the status of
    /// `lba` and how many blocks from it, at least 1 and at most `max`, share it. Stores
    /// without thin provisioning report every block mapped.
    fn provisioning(&self, lba: u64, max: u64) -> Result<(Provisioning, u64), MediaError> {
        let _ = lba;
        Ok((Provisioning::Mapped, max.max(1)))
    }

    /// Write acknowledgement semantics.
    fn cache_mode(&self) -> CacheMode;

    /// Whether a write is only a copy into memory, with any wait for durability deferred
    /// (see [`cache::defer_commits`]) and no other blocking than a full cache, which
    /// [`inline::run_inline`] turns into a refusal. Such writes may run on an async worker.
    fn writes_in_memory(&self) -> bool {
        false
    }

    /// Whether a read never waits for the device inside an [`inline::run_inline`] scope:
    /// it copies from memory (the write cache's ring, the page cache) or is refused. Such
    /// reads may run on an async worker.
    fn reads_in_memory(&self) -> bool {
        false
    }

    /// `Ok` while the store can serve I/O. A failed backing store makes TEST UNIT READY
    /// fail, which multipath checkers rely on.
    fn health(&self) -> Result<(), MediaError>;
}
