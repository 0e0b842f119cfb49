//! A [`BlockStore`] over one plain file: writes land in the page cache (a volatile write
//! cache) and `flush` makes them durable with `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::error;

use super::{BlockStore, CacheMode, MediaError};

/// One file holding every block of a LUN.
pub struct FileStore {
    file: File,
    block_size: u32,
    blocks: u64,
    /// Set after an I/O error on sync: the page cache may have dropped dirty pages, so a
    /// later successful fsync proves nothing (redb's rule). The store stops serving.
    poisoned: AtomicBool,
}

impl FileStore {
    /// Opens `path`, creating it sparse with `size` bytes when missing. An existing file
    /// must have exactly `size` bytes.
    pub fn open(path: &Path, size: u64, block_size: u32) -> Result<Self, MediaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
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
            blocks: size / u64::from(block_size),
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
            || lba.checked_add(blocks).is_none_or(|e| e > self.blocks)
        {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        Ok(lba * bs)
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
        self.blocks
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

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Volatile
    }

    fn health(&self) -> Result<(), MediaError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MediaError::Failed("an earlier sync failed".into()));
        }
        // The file may have been removed or truncated under us.
        let len = self.file.metadata()?.len();
        if len < self.blocks * u64::from(self.block_size) {
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
}
