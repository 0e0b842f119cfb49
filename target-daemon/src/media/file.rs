//! A [`BlockStore`] over one plain file: writes land in the page cache (a volatile write
//! cache) and `flush` makes them durable with `fdatasync`. The file is sparse: unmapped
//! blocks are holes punched with `fallocate`, and GET LBA STATUS finds them with
//! `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::error;

use super::{write_zeros, BlockStore, CacheMode, MediaError, Provisioning};

/// One file holding every block of a LUN.
pub struct FileStore {
    file: File,
    block_size: u32,
    /// Grows at run time (`admin luns resize`), never shrinks.
    blocks: AtomicU64,
    /// Set after an I/O error on sync: the page cache may have dropped dirty pages, so a
    /// later successful fsync proves nothing (redb's rule). The store stops serving.
    poisoned: AtomicBool,
}

impl FileStore {
    /// Opens `path`, creating it sparse with `size` bytes when missing. An existing file
    /// must have exactly `size` bytes.
    pub fn open(path: &Path, size: u64, block_size: u32) -> Result<Self, MediaError> {
        // Owner-only: the file is the LUN's data.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)?;
        } else if len != size {
            return Err(MediaError::Failed(format!(
                "{} holds {len} bytes but the configuration says {size}",
                path.display()
            )));
        }
        Ok(Self {
            file,
            block_size,
            blocks: AtomicU64::new(size / u64::from(block_size)),
            poisoned: AtomicBool::new(false),
        })
    }

    fn check(&self, lba: u64, len: usize) -> Result<u64, MediaError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MediaError::Failed("an earlier sync failed".into()));
        }
        let bs = u64::from(self.block_size);
        let blocks = len as u64 / bs;
        if !(len as u64).is_multiple_of(bs)
            || lba
                .checked_add(blocks)
                .is_none_or(|e| e > self.blocks.load(Ordering::Acquire))
        {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        Ok(lba * bs)
    }

    /// Like `check`, for a count of blocks rather than a buffer.
    fn check_blocks(&self, lba: u64, blocks: u64) -> Result<u64, MediaError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MediaError::Failed("an earlier sync failed".into()));
        }
        if lba
            .checked_add(blocks)
            .is_none_or(|e| e > self.blocks.load(Ordering::Acquire))
        {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        Ok(lba * u64::from(self.block_size))
    }

    fn sync(&self) -> Result<(), MediaError> {
        self.file.sync_data().map_err(|e| {
            error!("fdatasync failed, the LUN stops serving: {e}");
            self.poisoned.store(true, Ordering::Release);
            MediaError::Io(e)
        })
    }
}

impl BlockStore for FileStore {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn num_blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    fn grow(&self, blocks: u64) -> Result<(), MediaError> {
        let bytes = blocks
            .checked_mul(u64::from(self.block_size))
            .ok_or(MediaError::Failed("size overflows".into()))?;
        if blocks < self.num_blocks() {
            return Err(MediaError::Failed("a LUN only grows".into()));
        }
        self.file.set_len(bytes)?;
        self.file.sync_all()?;
        // Only once the file holds them may a command address the new blocks.
        self.blocks.store(blocks, Ordering::Release);
        Ok(())
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let off = self.check(lba, buf.len())?;
        self.file.read_exact_at(buf, off)?;
        Ok(())
    }

    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), MediaError> {
        let off = self.check(lba, data.len())?;
        self.file.write_all_at(data, off)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), MediaError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MediaError::Failed("an earlier sync failed".into()));
        }
        self.sync()
    }

    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size);
        let off = self.check_blocks(lba, blocks)?;
        if blocks == 0 {
            return Ok(());
        }
        let (Ok(start), Ok(len)) = (
            libc::off_t::try_from(off),
            libc::off_t::try_from(blocks * bs),
        ) else {
            return Err(MediaError::OutOfRange { lba, blocks });
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is ours and
        // open for the life of `self`.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            )
        };
        if r == 0 {
            // The file system frees whole blocks and zeroes partial ones, so the range
            // reads back as zeros either way.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A file system without hole punching: zeros keep the promise (LBPRZ).
            return write_zeros(self, lba, blocks);
        }
        Err(MediaError::Io(e))
    }

    fn thin_provisioned(&self) -> bool {
        true
    }

    fn provisioning(&self, lba: u64, max: u64) -> Result<(Provisioning, u64), MediaError> {
        let bs = u64::from(self.block_size);
        let max = max.max(1);
        let off = self.check_blocks(lba, 1)?;
        let end = off + max.min(self.num_blocks() - lba) * bs;
        let fd = self.file.as_raw_fd();
        let Ok(pos) = libc::off_t::try_from(off) else {
            return Err(MediaError::OutOfRange { lba, blocks: 1 });
        };
        // SAFETY: lseek only reads its integer arguments. FileStore does all I/O with
        // pread/pwrite, so moving the file offset disturbs nothing.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data at or after `off`: a hole to the end of the file.
                Some(libc::ENXIO) => Ok((Provisioning::Deallocated, (end - off) / bs)),
                // No SEEK_DATA on this file system: everything counts as mapped.
                Some(libc::EINVAL) => Ok((Provisioning::Mapped, max)),
                _ => Err(MediaError::Io(e)),
            };
        }
        let data = data as u64;
        if data > off {
            // Only whole blocks inside the hole are deallocated.
            let n = (data.min(end) - off) / bs;
            if n > 0 {
                return Ok((Provisioning::Deallocated, n));
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, pos, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(MediaError::Io(io::Error::last_os_error()));
        }
        // A block with any data in it is mapped.
        let n = (hole as u64).min(end).saturating_sub(off).div_ceil(bs);
        Ok((Provisioning::Mapped, n.max(1)))
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Volatile
    }

    fn health(&self) -> Result<(), MediaError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MediaError::Failed("an earlier sync failed".into()));
        }
        // The file may have been removed or truncated under us.
        let len = self.file.metadata()?.len();
        if len < self.num_blocks() * u64::from(self.block_size) {
            return Err(MediaError::Failed(format!(
                "backing file shrank to {len} bytes"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds_and_size_check() {
        let dir = std::env::temp_dir().join(format!("ftss-filestore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("a.img");
        let s = FileStore::open(&p, 64 * 512, 512).expect("create");
        assert_eq!(s.num_blocks(), 64);
        s.write_blocks(3, &[7u8; 1024], true).expect("write");
        let mut b = [0u8; 1024];
        s.read_blocks(3, &mut b).expect("read");
        assert_eq!(b, [7u8; 1024]);
        assert!(matches!(
            s.read_blocks(63, &mut b),
            Err(MediaError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.write_blocks(0, &[0u8; 100], false),
            Err(MediaError::OutOfRange { .. })
        ));
        assert!(s.health().is_ok());
        drop(s);
        assert!(matches!(
            FileStore::open(&p, 128 * 512, 512),
            Err(MediaError::Failed(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unmap_punches_holes_that_read_as_zeros_and_show_as_deallocated() {
        let dir = std::env::temp_dir().join(format!("ftss-filestore-unmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let s = FileStore::open(&dir.join("t.img"), 256 * 512, 512).expect("create");
        assert!(s.thin_provisioned());
        // Never written: one hole over the whole file.
        assert_eq!(
            s.provisioning(0, 256).expect("status"),
            (Provisioning::Deallocated, 256)
        );
        s.write_blocks(0, &[0x5a; 64 * 512], false).expect("write");
        assert_eq!(
            s.provisioning(0, 256).expect("status"),
            (Provisioning::Mapped, 64)
        );
        // Blocks 8-23 cover whole 4 KiB file system blocks: they are freed.
        s.unmap(8, 16).expect("unmap");
        assert_eq!(
            s.provisioning(0, 256).expect("status"),
            (Provisioning::Mapped, 8)
        );
        assert_eq!(
            s.provisioning(8, 248).expect("status"),
            (Provisioning::Deallocated, 16)
        );
        assert_eq!(
            s.provisioning(24, 232).expect("status"),
            (Provisioning::Mapped, 40)
        );
        // A lone block inside a file system block is zeroed, and stays mapped.
        s.unmap(1, 1).expect("unmap");
        let mut b = vec![0u8; 64 * 512];
        s.read_blocks(0, &mut b).expect("read");
        assert!(b[..512].iter().all(|&x| x == 0x5a));
        assert!(b[512..1024].iter().all(|&x| x == 0));
        assert!(b[1024..8 * 512].iter().all(|&x| x == 0x5a));
        assert!(b[8 * 512..24 * 512].iter().all(|&x| x == 0));
        assert!(b[24 * 512..].iter().all(|&x| x == 0x5a));
        assert_eq!(
            s.provisioning(1, 255).expect("status"),
            (Provisioning::Mapped, 7)
        );
        assert!(matches!(
            s.unmap(250, 7),
            Err(MediaError::OutOfRange { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
