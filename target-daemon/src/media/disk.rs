//! The two ways the media layer touches stable storage, as traits: a [`Disk`] (a file read
//! and written with pread/pwrite and made durable with fdatasync; the mirrors) and a
//! [`Region`] (a memory map whose ranges are made durable by msync or, for
//! [`DirectRegion`](super::direct::DirectRegion), a direct write; the write cache).
//!
//! Production uses files and memmap2. [`SimFs`] is the test double of the file system: it
//! keeps what was synced apart from what was only written, and at a crash keeps the synced
//! bytes plus an arbitrary (seeded) subset of the unsynced sectors, as a power cut would
//! leave a disk whose cache had written back some dirty pages and not others.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::MmapRaw;

/// A file of the mirror set.
pub trait Disk: Send + Sync {
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Sets the length; new bytes read as zeros.
    fn set_size(&self, len: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `off` if they are all in memory already, without
    /// waiting for the device: `Ok(true)` when read, `Ok(false)` when the read would have
    /// had to wait (nothing may be assumed about `buf` then, and the caller reads again
    /// with [`read_at`](Self::read_at) where it may wait). The default never reads: a disk
    /// that cannot tell always says it would wait.
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<bool> {
        let _ = (buf, off);
        Ok(false)
    }
    /// Writes all of `data` at `off`; not durable until [`sync`](Self::sync).
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Zeros `len` bytes at `off`, giving the space back to the file system where it can
    /// (a hole); like a write, not durable until [`sync`](Self::sync). The default writes
    /// zeros, which reads back the same.
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros_at(self, off, len)
    }
}

/// Writes `len` zero bytes at `off`, 1 MiB at a time: hole punching where the file system
/// has none.
fn write_zeros_at<D: Disk + ?Sized>(d: &D, off: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        d.write_at(&zeros[..n as usize], off + done)?;
        done += n;
    }
    Ok(())
}

impl Disk for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }
    /// `preadv2(RWF_NOWAIT)`: the kernel copies from the page cache, and answers EAGAIN
    /// instead of reading the device when a page is missing (it starts the readahead
    /// anyway, which warms the cache for the blocking read that follows).
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        if buf.is_empty() {
            return Ok(true);
        }
        let Ok(at) = libc::off_t::try_from(off) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the one iovec points at `buf`, which is live, writable and exactly
        // `iov_len` bytes long for the call's duration; the descriptor is open for the
        // life of `self`.
        let n = unsafe { libc::preadv2(self.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not in the page cache; or no RWF_NOWAIT for this file system or kernel
                // (EOPNOTSUPP; ENOSYS without preadv2): either way only a read that may
                // wait can get the data.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        // A short read: part of the range is cached and the rest is not (or the file
        // ends early, which the blocking read then reports as the error it is).
        Ok(n as usize == buf.len())
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.write_all_at(data, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(());
        }
        let (Ok(start), Ok(n)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open for
        // the life of `self`.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                n,
            )
        };
        if r == 0 {
            // Whole file-system blocks are freed and partial ones zeroed: the range reads
            // back as zeros either way.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A file system without hole punching: zeros keep the promise.
            return write_zeros_at(self, off, len);
        }
        Err(e)
    }
}

/// The write cache's mapped region.
pub trait Region: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> usize;
    /// Copies `data` in at `off`. The caller owns that range (no concurrent writer).
    fn put(&self, off: usize, data: &[u8]) -> io::Result<()>;
    /// Copies `parts`, back to back, in at `off` (one system call where stores are writes).
    fn put_parts(&self, off: usize, parts: &[&[u8]]) -> io::Result<()> {
        put_each(self, off, parts)
    }
    /// Copies bytes out at `off`.
    fn get(&self, off: usize, buf: &mut [u8]);
    /// Makes the range durable (msync MS_SYNC, or a direct write with RWF_DSYNC).
    fn flush_range(&self, off: usize, len: usize) -> io::Result<()>;
}

/// [`Region::put_parts`] as one [`Region::put`] per part.
fn put_each<R: Region + ?Sized>(r: &R, off: usize, parts: &[&[u8]]) -> io::Result<()> {
    let mut at = off;
    for p in parts {
        r.put(at, p)?;
        at += p.len();
    }
    Ok(())
}

/// A file mapped shared with memmap2.
pub struct MmapRegion {
    map: MmapRaw,
    stores: Stores,
}

/// How bytes get into the mapped cache file. Either way they land in the same page-cache
/// pages the map shows, and a commit is the same `msync(MS_SYNC)` of the map's range.
#[derive(Debug)]
pub enum Stores {
    /// `pwrite` on the file. The pages never get writable entries in this process's page
    /// tables, so the msync that cleans them needs no TLB shootdown on the other CPUs
    /// running the daemon's threads: on the test machine (2 vCPUs) that halved the commit
    /// time (see docs/design.md). The default for ordinary file systems.
    Write(File),
    /// CPU stores through the map: for a DAX (persistent memory) file, where the map is the
    /// memory itself and there is no page cache to write through.
    Map,
}

impl MmapRegion {
    /// Maps all of `file`; `map_stores` chooses [`Stores::Map`], else [`Stores::Write`].
    pub fn new(file: &File, map_stores: bool) -> io::Result<Self> {
        Ok(Self {
            map: MmapRaw::map_raw(file)?,
            stores: if map_stores {
                Stores::Map
            } else {
                Stores::Write(file.try_clone()?)
            },
        })
    }
}

impl Region for MmapRegion {
    fn size(&self) -> usize {
        self.map.len()
    }
    fn put_parts(&self, off: usize, parts: &[&[u8]]) -> io::Result<()> {
        let Stores::Write(f) = &self.stores else {
            return put_each(self, off, parts);
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        assert!(off + total <= self.map.len(), "write past the map");
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        use std::os::fd::AsRawFd;
        // SAFETY: every iovec points into a live slice of `parts` for the call's duration.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // A short write (not expected for a regular file) finishes part by part.
        let mut done = n as usize;
        let mut at = off;
        for p in parts {
            if done >= p.len() {
                done -= p.len();
            } else {
                self.put(at + done, &p[done..])?;
                done = 0;
            }
            at += p.len();
        }
        Ok(())
    }

    fn put(&self, off: usize, data: &[u8]) -> io::Result<()> {
        assert!(off + data.len() <= self.map.len(), "write past the map");
        if let Stores::Write(f) = &self.stores {
            use std::os::unix::fs::FileExt;
            return f.write_all_at(data, off as u64);
        }
        // SAFETY: inside the mapping (asserted). The write cache reserves every range it
        // writes under its lock for exactly one writer, and readers only read published
        // records, which are not rewritten until destage has moved the tail past them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(off),
                data.len(),
            );
        }
        Ok(())
    }
    fn get(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.map.len(), "read past the map");
        // SAFETY: inside the mapping (asserted); see `put` for why no writer races us.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len());
        }
    }
    fn flush_range(&self, off: usize, len: usize) -> io::Result<()> {
        self.map.flush_range(off, len)
    }
}

/// Granularity at which [`SimFs`] tracks unsynced bytes: a crash keeps or loses each
/// sector on its own, so a record can be torn anywhere between sectors.
pub const SIM_SECTOR: u64 = 512;

/// `v.resize(len, 0)` through a zeroed allocation: the element-wise fill is slow in
/// unoptimized test builds, and the simulations grow megabyte files many times a second.
fn resize_zeroed(v: &mut Vec<u8>, len: usize) {
    if len <= v.len() {
        v.truncate(len);
        return;
    }
    let mut w = vec![0u8; len];
    w[..v.len()].copy_from_slice(v);
    *v = w;
}

#[derive(Default)]
struct SimFile {
    /// What the program sees.
    current: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Sectors of `current` that differ from `durable` (or may).
    dirty: BTreeSet<u64>,
}

impl SimFile {
    fn sync_range(&mut self, off: u64, len: u64) {
        if self.durable.len() != self.current.len() {
            resize_zeroed(&mut self.durable, self.current.len());
        }
        let first = off / SIM_SECTOR;
        let last = (off + len).div_ceil(SIM_SECTOR);
        let sectors: Vec<u64> = self.dirty.range(first..last).copied().collect();
        for s in sectors {
            let a = (s * SIM_SECTOR) as usize;
            let b = ((s + 1) * SIM_SECTOR).min(self.current.len() as u64) as usize;
            if a < b {
                self.durable[a..b].copy_from_slice(&self.current[a..b]);
            }
            self.dirty.remove(&s);
        }
    }
}

struct SimState {
    files: HashMap<String, SimFile>,
    /// Operations left before the power cut; `None` once it has happened or if unarmed.
    ops_left: Option<u64>,
    /// Set once the power is cut: every later operation fails.
    dead: bool,
    rng: u64,
    /// Chance (per mille) that an unsynced sector was written back before the cut.
    writeback_permille: u64,
    snapshot: Option<HashMap<String, Vec<u8>>>,
    /// Injected failures per file name: (writes, syncs) left to fail with EIO.
    faults: HashMap<String, (u64, u64)>,
    /// Test hooks run after each completed read of a file, outside the lock, so a test
    /// can run other I/O at an exact point of an operation (see [`SimFs::after_read`]).
    read_hooks: HashMap<String, ReadHook>,
}

/// What [`SimFs::after_read`] runs.
pub type ReadHook = Box<dyn FnMut() + Send>;

/// Which operation [`SimFs::fail_next`] makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimFault {
    /// `write_at`, or a store into the region (a failed `pwrite` into the mapped file).
    Write,
    /// `sync`, or `flush_range` (a failed fdatasync or msync).
    Sync,
}

/// A simulated file system for power-loss tests. Cloning shares it.
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<SimState>>,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl SimFs {
    /// An empty file system whose crash choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(SimState {
                files: HashMap::new(),
                ops_left: None,
                dead: false,
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                writeback_permille: 500,
                snapshot: None,
                faults: HashMap::new(),
                read_hooks: HashMap::new(),
            })),
        }
    }

    /// A file system holding `files` as durable content (a machine after reboot).
    pub fn from_snapshot(seed: u64, files: HashMap<String, Vec<u8>>) -> Self {
        let fs = Self::new(seed);
        {
            let mut s = fs.lock();
            for (name, bytes) in files {
                s.files.insert(
                    name,
                    SimFile {
                        current: bytes.clone(),
                        durable: bytes,
                        dirty: BTreeSet::new(),
                    },
                );
            }
        }
        fs
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cuts the power after `ops` more file operations (reads, writes, syncs).
    pub fn arm(&self, ops: u64) {
        self.lock().ops_left = Some(ops);
    }

    /// Cuts the power now.
    pub fn crash(&self) {
        let mut s = self.lock();
        Self::cut(&mut s);
    }

    /// Makes the next `n` operations of kind `what` on file `name` fail with EIO (the
    /// data of a failed write does not reach the file). The power stays on.
    pub fn fail_next(&self, name: &str, what: SimFault, n: u64) {
        let mut s = self.lock();
        let f = s.faults.entry(name.to_string()).or_default();
        match what {
            SimFault::Write => f.0 = n,
            SimFault::Sync => f.1 = n,
        }
    }

    /// Runs `hook` after every successful read of file `name` (replacing an earlier
    /// hook), outside the file system's lock: the hook may do I/O on any file, from this
    /// thread or others, to interleave it with the reader at a chosen point.
    pub fn after_read(&self, name: &str, hook: ReadHook) {
        self.lock().read_hooks.insert(name.to_string(), hook);
    }

    /// Runs the read hook of `name`, if any, without holding the lock.
    fn run_read_hook(&self, name: &str) {
        let Some(mut hook) = self.lock().read_hooks.remove(name) else {
            return;
        };
        hook();
        // Put back unless the hook installed a new one meanwhile.
        self.lock()
            .read_hooks
            .entry(name.to_string())
            .or_insert(hook);
    }

    /// Consumes one injected failure of kind `what` on `name`, if one is left.
    fn injected(s: &mut SimState, name: &str, what: SimFault) -> bool {
        let Some(f) = s.faults.get_mut(name) else {
            return false;
        };
        let left = match what {
            SimFault::Write => &mut f.0,
            SimFault::Sync => &mut f.1,
        };
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// Whether the power has been cut.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// What the disks held at the power cut (cuts it now if it has not happened).
    pub fn snapshot(&self) -> HashMap<String, Vec<u8>> {
        let mut s = self.lock();
        Self::cut(&mut s);
        s.snapshot.clone().unwrap_or_default()
    }

    fn cut(s: &mut SimState) {
        if s.dead {
            return;
        }
        s.dead = true;
        let mut rng = s.rng;
        let permille = s.writeback_permille;
        let mut snap = HashMap::new();
        let mut names: Vec<&String> = s.files.keys().collect();
        names.sort(); // HashMap order is random; the seed alone must decide the outcome
        for name in names {
            let f = &s.files[name];
            let mut bytes = f.durable.clone();
            resize_zeroed(&mut bytes, f.current.len());
            for &sec in &f.dirty {
                if xorshift(&mut rng) % 1000 < permille {
                    let a = (sec * SIM_SECTOR) as usize;
                    let b = ((sec + 1) * SIM_SECTOR).min(f.current.len() as u64) as usize;
                    if a < b {
                        bytes[a..b].copy_from_slice(&f.current[a..b]);
                    }
                }
            }
            snap.insert(name.clone(), bytes);
        }
        s.snapshot = Some(snap);
    }

    /// Counts one operation; fails once the power is cut.
    fn op(s: &mut SimState) -> io::Result<()> {
        if let Some(n) = s.ops_left {
            if n == 0 {
                s.ops_left = None;
                Self::cut(s);
            } else {
                s.ops_left = Some(n - 1);
            }
        }
        if s.dead {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Opens (creating empty) the file `name`.
    pub fn file(&self, name: &str) -> SimDisk {
        self.lock().files.entry(name.to_string()).or_default();
        SimDisk {
            fs: self.clone(),
            name: name.to_string(),
        }
    }
}

/// One file of a [`SimFs`], usable as a [`Disk`] or a [`Region`] (its length fixed first).
#[derive(Clone)]
pub struct SimDisk {
    fs: SimFs,
    name: String,
}

impl SimDisk {
    fn with<R>(&self, f: impl FnOnce(&mut SimFile) -> io::Result<R>) -> io::Result<R> {
        self.with_fault(None, f)
    }

    /// [`with`](Self::with) for an operation that an injected `fault` can fail.
    fn with_fault<R>(
        &self,
        fault: Option<SimFault>,
        f: impl FnOnce(&mut SimFile) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut s = self.fs.lock();
        SimFs::op(&mut s)?;
        if fault.is_some_and(|w| SimFs::injected(&mut s, &self.name, w)) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = s
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f(file)
    }
}

impl Disk for SimDisk {
    fn size(&self) -> io::Result<u64> {
        self.with(|f| Ok(f.current.len() as u64))
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        self.with(|f| {
            // Length changes are metadata; the simulation treats them as durable at once
            // (the product only resizes files when creating them, then syncs).
            resize_zeroed(&mut f.current, len as usize);
            resize_zeroed(&mut f.durable, len as usize);
            f.dirty.retain(|&s| s * SIM_SECTOR < len);
            Ok(())
        })
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.with(|f| {
            let end = off as usize + buf.len();
            if end > f.current.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            buf.copy_from_slice(&f.current[off as usize..end]);
            Ok(())
        })?;
        self.fs.run_read_hook(&self.name);
        Ok(())
    }
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.with_fault(Some(SimFault::Write), |f| {
            let end = off as usize + data.len();
            if end > f.current.len() {
                resize_zeroed(&mut f.current, end);
            }
            f.current[off as usize..end].copy_from_slice(data);
            for s in off / SIM_SECTOR..(end as u64).div_ceil(SIM_SECTOR) {
                f.dirty.insert(s);
            }
            Ok(())
        })
    }
    fn sync(&self) -> io::Result<()> {
        self.with_fault(Some(SimFault::Sync), |f| {
            let n = f.current.len() as u64;
            f.sync_range(0, n);
            Ok(())
        })
    }
}

impl Region for SimDisk {
    fn size(&self) -> usize {
        let s = self.fs.lock();
        s.files.get(&self.name).map_or(0, |f| f.current.len())
    }
    fn put(&self, off: usize, data: &[u8]) -> io::Result<()> {
        // After the cut stores simply never reach the disk; only an injected failure (a
        // failed pwrite into the mapped file) is reported.
        match Disk::write_at(self, data, off as u64) {
            Err(e) if !self.fs.is_dead() => Err(e),
            _ => Ok(()),
        }
    }
    fn get(&self, off: usize, buf: &mut [u8]) {
        let s = self.fs.lock();
        if let Some(f) = s.files.get(&self.name) {
            if off + buf.len() <= f.current.len() {
                buf.copy_from_slice(&f.current[off..off + buf.len()]);
            }
        }
    }
    fn flush_range(&self, off: usize, len: usize) -> io::Result<()> {
        self.with_fault(Some(SimFault::Sync), |f| {
            f.sync_range(off as u64, len as u64);
            Ok(())
        })
    }
}

/// Test helper: makes the page cache forget `path`'s pages, as memory pressure would, so
/// the next read has to go to the device: written back first (`fdatasync`), since dirty
/// pages cannot be dropped, then `POSIX_FADV_DONTNEED` over the whole file.
#[cfg(test)]
pub(crate) fn drop_cached_pages(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = File::open(path).expect("open to drop its cached pages");
    f.sync_data().expect("fdatasync before dropping pages");
    // SAFETY: posix_fadvise only reads its integer arguments; `f` is open for the call.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) failed: {r}");
}

/// Test helper: runs `attempt` (drop pages with [`drop_cached_pages`], read them without
/// waiting, check what came back; `true` when the read was refused) until one is refused,
/// for up to 20 s, and returns how many attempts the kernel served anyway.
///
/// What the test machine (2 vCPUs under Firecracker, ext4) does: `preadv2(RWF_NOWAIT)` of
/// dropped pages mostly fails with EAGAIN within microseconds, but in some periods, up to
/// seconds long, every such read is served, after 40 us to 2 ms in the call: the kernel
/// starts the read (it does so even under RWF_NOWAIT, to warm the cache) and it has
/// completed by the time it looks, the vCPU having been held up meanwhile. Such a read
/// is correct; refusals come back when the period ends.
#[cfg(test)]
pub(crate) fn tries_until_refused(mut attempt: impl FnMut() -> bool) -> usize {
    const TRY_FOR: std::time::Duration = std::time::Duration::from_secs(20);
    let started = std::time::Instant::now();
    let mut served = 0;
    while started.elapsed() < TRY_FOR {
        if attempt() {
            return served;
        }
        served += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    panic!(
        "for {TRY_FOR:?} the kernel served every read of dropped pages ({served}) under RWF_NOWAIT"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `preadv2(RWF_NOWAIT)` does on the file system of the temp dir (ext4 on the
    /// test machine): cached bytes are read, dropped ones are refused, and a blocking read
    /// brings them back.
    #[test]
    fn a_nowait_read_takes_cached_pages_and_refuses_dropped_ones() {
        let dir = std::env::temp_dir().join(format!("ftss-disk-nowait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
        Disk::write_at(&f, &data, 0).expect("write");
        let mut buf = vec![0u8; 64 << 10];
        assert!(
            f.read_at_nowait(&mut buf, 4096).expect("nowait"),
            "just written: cached"
        );
        assert_eq!(buf, data[4096..4096 + buf.len()]);
        tries_until_refused(|| {
            drop_cached_pages(&path);
            buf.fill(0);
            if !f.read_at_nowait(&mut buf, 4096).expect("nowait") {
                return true;
            }
            assert_eq!(buf, data[4096..4096 + buf.len()], "served after all: right");
            false
        });
        Disk::read_at(&f, &mut buf, 4096).expect("blocking read");
        assert_eq!(buf, data[4096..4096 + buf.len()]);
        buf.fill(0);
        assert!(
            f.read_at_nowait(&mut buf, 4096).expect("nowait"),
            "cached again"
        );
        assert_eq!(buf, data[4096..4096 + buf.len()]);
        assert!(f.read_at_nowait(&mut [], 0).expect("empty"));
        // Past the end: short, so "would wait"; the blocking read says what is wrong.
        assert!(!f
            .read_at_nowait(&mut buf, data.len() as u64 - 10)
            .expect("short"));
        assert!(Disk::read_at(&f, &mut buf, data.len() as u64 - 10).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_simulated_disk_never_reads_without_waiting() {
        let fs = SimFs::new(5);
        let d = fs.file("f");
        d.write_at(&[9u8; 512], 0).expect("write");
        let mut b = [0u8; 512];
        assert!(!d.read_at_nowait(&mut b, 0).expect("nowait"));
        assert_eq!(b, [0u8; 512], "nothing read");
    }

    #[test]
    fn a_crash_keeps_synced_bytes_and_drops_or_keeps_unsynced_sectors_by_seed() {
        let outcome = |seed| {
            let fs = SimFs::new(seed);
            let d = fs.file("f");
            d.set_size(64 * SIM_SECTOR).expect("len");
            d.write_at(&[1u8; 4096], 0).expect("write");
            d.sync().expect("sync");
            d.write_at(&[2u8; 16384], 4096).expect("write");
            let snap = fs.snapshot();
            assert!(d.write_at(&[3u8; 1], 0).is_err(), "dead after the cut");
            snap["f"].clone()
        };
        let a = outcome(7);
        assert_eq!(a, outcome(7), "the seed decides");
        assert!(a[..4096].iter().all(|&b| b == 1), "synced bytes survive");
        let kept = a[4096..20480]
            .chunks(SIM_SECTOR as usize)
            .filter(|s| s[0] == 2)
            .count();
        assert!(
            kept > 0 && kept < 32,
            "some unsynced sectors kept, some lost: {kept}"
        );
        assert!((0..20).map(outcome).any(|b| b != a), "other seeds differ");
    }

    #[test]
    fn injected_failures_hit_only_their_file_and_kind_and_leave_the_power_on() {
        let fs = SimFs::new(3);
        let (d, e) = (fs.file("d"), fs.file("e"));
        d.set_size(4 * SIM_SECTOR).expect("len");
        fs.fail_next("d", SimFault::Write, 2);
        fs.fail_next("d", SimFault::Sync, 1);
        e.write_at(b"e", 0).expect("another file is not affected");
        assert!(d.write_at(b"x", 0).is_err(), "first write fails");
        assert!(
            Region::put(&d, 1, b"y").is_err(),
            "a store into the map fails too"
        );
        d.write_at(b"z", 2).expect("the third write succeeds");
        assert!(Region::flush_range(&d, 0, 512).is_err(), "the msync fails");
        d.sync().expect("the next sync succeeds");
        assert!(!fs.is_dead());
        let snap = fs.snapshot();
        assert_eq!(
            &snap["d"][..3],
            b"\0\0z",
            "failed writes never reached the file"
        );
    }

    #[test]
    fn the_power_cut_lands_after_the_armed_number_of_operations() {
        let fs = SimFs::new(1);
        let d = fs.file("f");
        fs.arm(3);
        d.write_at(b"a", 0).expect("1");
        d.write_at(b"b", 1).expect("2");
        d.sync().expect("3");
        assert!(d.write_at(b"c", 2).is_err(), "the fourth fails");
        assert!(fs.is_dead());
        assert_eq!(&fs.snapshot()["f"][..2], b"ab");
    }
}
