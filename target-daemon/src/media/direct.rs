//! The write cache as a log device: records are copied into a private map of the cache
//! file, and a commit writes the pages holding them to the file with one direct,
//! data-synchronous write (`pwritev2` on an `O_DIRECT` descriptor with `RWF_DSYNC`).
//!
//! Why not `msync` of a shared map: the shared map's commit goes through the page cache's
//! writeback (page locks, the write-protect of every cleaned page, the file system's
//! writeback path), then the device flush. A direct write hands the pages to the device
//! and, on a file whose blocks are all allocated and written (the cache file is written
//! with zeros when it is made), the data sync that follows is the device flush alone, with
//! no journal commit. On the project's test machine the direct commit ran at up to twice
//! the rate of `pwrite` + `msync` in the same benchmark run (`ci/bench.sh` prints both).
//!
//! The map stays, as the card asks: it is the cache region reads, destage and recovery see.
//! Mapped private, a page reads from the file until the first store to it, which gives the
//! process its own copy; the direct writes only ever take their data from such copies, so
//! they never read the page cache and the kernel keeps it coherent with the file (a direct
//! write drops the cached pages it overwrites), which recovery reads after a restart.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex};

use super::disk::Region;

/// Alignment of a direct write's offset, length and memory: the largest logical block
/// size in use (4 KiB drives); a multiple of every smaller one.
pub const DIRECT_ALIGN: usize = 4096;

/// A private map of the cache file, committed by direct writes.
pub struct DirectRegion {
    map: memmap2::MmapMut,
    /// The map's address, taken once: `MmapMut` hands out its pointer only through
    /// `&mut`, while every store here goes through `&self` into ranges the write cache
    /// reserves for one writer each.
    base: *mut u8,
    /// The same file, opened `O_DIRECT`.
    direct: File,
    /// Page ranges being written now. Two commits whose pages overlap must reach the
    /// device in the order they were taken, or the older copy of a shared page could land
    /// last and drop a record the newer one acknowledged; a commit waits while another
    /// one holds any of its pages (the page cache gave `msync` this order for free).
    busy: Mutex<Vec<(usize, usize)>>,
    freed: Condvar,
}

// SAFETY: `base` points into `map`, which lives as long as the region. Stores go only into
// ranges the write cache hands to one writer at a time (see `Region::put`); loads read
// published records, which nothing rewrites until destage has moved past them.
unsafe impl Send for DirectRegion {}
// SAFETY: as for Send.
unsafe impl Sync for DirectRegion {}

impl DirectRegion {
    /// Maps `file` private and opens `path` (the same file) for direct writes. Fails when
    /// the file system takes no direct I/O or the file's length is not a multiple of
    /// [`DIRECT_ALIGN`]; the caller then falls back to the shared map.
    pub fn new(file: &File, path: &std::path::Path) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if !len.is_multiple_of(DIRECT_ALIGN as u64) || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cache file length {len} is not a multiple of {DIRECT_ALIGN}"),
            ));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        // SAFETY: the cache file is this process's alone (created owner-only, and the
        // daemon holds the data directory's lock); a private map is never changed by
        // another writer's stores, and the file's own contents change only through
        // `flush_range` below, from this map's pages.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(file)? };
        let base = map.as_mut_ptr();
        Ok(Self {
            map,
            base,
            direct,
            busy: Mutex::new(Vec::new()),
            freed: Condvar::new(),
        })
    }

    /// Takes the page range `[from, to)` for one commit, waiting while another commit
    /// holds any page of it.
    fn take(&self, from: usize, to: usize) -> Ranges<'_> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while busy.iter().any(|&(f, t)| f < to && from < t) {
            busy = self
                .freed
                .wait(busy)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        busy.push((from, to));
        Ranges {
            region: self,
            range: (from, to),
        }
    }
}

/// A page range held for one commit; given back on drop.
struct Ranges<'a> {
    region: &'a DirectRegion,
    range: (usize, usize),
}

impl Drop for Ranges<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .region
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = busy.iter().position(|r| *r == self.range) {
            busy.swap_remove(i);
        }
        self.region.freed.notify_all();
    }
}

impl Region for DirectRegion {
    fn size(&self) -> usize {
        self.map.len()
    }

    fn put(&self, off: usize, data: &[u8]) -> io::Result<()> {
        assert!(off + data.len() <= self.map.len(), "write past the map");
        // SAFETY: inside the map (asserted); the range is this writer's alone (the write
        // cache reserves it under its lock), and `data` is not in the map.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), data.len());
        }
        Ok(())
    }

    fn get(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.map.len(), "read past the map");
        // SAFETY: inside the map (asserted); see `put` for why no writer races the range.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), buf.len());
        }
    }

    fn flush_range(&self, off: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        assert!(off + len <= self.map.len(), "flush past the map");
        // Whole pages: a direct write takes aligned offsets, lengths and memory (the map
        // is page aligned). Bytes of the first and last page outside the range go too;
        // they are either committed already (rewritten as they are) or belong to a record
        // still being appended, which no commit covers yet and a later one rewrites whole.
        let from = off / DIRECT_ALIGN * DIRECT_ALIGN;
        let to = (off + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let _held = self.take(from, to);
        let mut at = from;
        while at < to {
            let iov = libc::iovec {
                // SAFETY: `at` is inside the map (`to` is at most its page-aligned length).
                iov_base: unsafe { self.base.add(at) } as *mut libc::c_void,
                iov_len: to - at,
            };
            // SAFETY: the iovec points into the live map for the call's duration.
            let n = unsafe {
                libc::pwritev2(
                    self.direct.as_raw_fd(),
                    &iov,
                    1,
                    at as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 || !(n as usize).is_multiple_of(DIRECT_ALIGN) {
                // A short direct write that is not whole blocks leaves nothing to resume
                // from with an aligned write: report it as the failure it is.
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("direct write of {} bytes wrote {n}", to - at),
                ));
            }
            at += n as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file(name: &str, len: u64) -> (std::path::PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("ftss-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("wc");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .expect("create");
        f.write_all_at(&vec![0u8; len as usize], 0).expect("zeros");
        (p, f)
    }

    #[test]
    fn flushed_bytes_reach_the_file_and_unflushed_ones_do_not() {
        let (p, f) = file("flush", 64 << 10);
        let r = DirectRegion::new(&f, &p).expect("direct region");
        r.put(5000, b"committed").expect("put");
        r.flush_range(5000, 9).expect("flush");
        r.put(40000, b"pending").expect("put");
        let mut got = [0u8; 9];
        f.read_exact_at(&mut got, 5000).expect("read");
        assert_eq!(&got, b"committed");
        let mut pending = [0u8; 7];
        f.read_exact_at(&mut pending, 40000).expect("read");
        assert_eq!(
            pending, [0u8; 7],
            "a store is not in the file before its flush"
        );
        // The map shows both.
        let mut m = [0u8; 7];
        r.get(40000, &mut m);
        assert_eq!(&m, b"pending");
        // A new map of the file (a restart) sees the committed bytes.
        drop(r);
        let again = DirectRegion::new(&f, &p).expect("reopen");
        let mut back = [0u8; 9];
        again.get(5000, &mut back);
        assert_eq!(&back, b"committed");
    }

    #[test]
    fn a_flush_covers_whole_pages_and_keeps_their_other_bytes() {
        let (p, f) = file("pages", 64 << 10);
        f.write_all_at(b"old neighbour", 8192).expect("seed");
        let r = DirectRegion::new(&f, &p).expect("direct region");
        // Same page as the file's neighbour bytes, which the map read from the file.
        r.put(8192 + 100, b"new").expect("put");
        r.flush_range(8192 + 100, 3).expect("flush");
        let mut page = vec![0u8; 4096];
        f.read_exact_at(&mut page, 8192).expect("read");
        assert_eq!(&page[..13], b"old neighbour");
        assert_eq!(&page[100..103], b"new");
    }

    #[test]
    fn overlapping_flushes_are_serialized_and_the_newest_page_lands_last() {
        let (p, f) = file("order", 1 << 20);
        let r = std::sync::Arc::new(DirectRegion::new(&f, &p).expect("direct region"));
        // Many threads each append into one shared page and flush it: whatever order the
        // flushes run in, the file ends with every byte a finished flush covered.
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let r = std::sync::Arc::clone(&r);
                std::thread::spawn(move || {
                    for round in 0..50u32 {
                        let off = 4096 + usize::from(i) * 8;
                        let v = round.to_le_bytes();
                        r.put(off, &v).expect("put");
                        r.flush_range(off, 4).expect("flush");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        for i in 0..8u64 {
            let mut v = [0u8; 4];
            f.read_exact_at(&mut v, 4096 + i * 8).expect("read");
            assert_eq!(u32::from_le_bytes(v), 49, "thread {i}'s last value");
        }
        assert!(r.busy.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_length_that_is_not_whole_pages_is_refused() {
        let (p, f) = file("odd", 5000);
        assert!(DirectRegion::new(&f, &p).is_err());
    }
}
