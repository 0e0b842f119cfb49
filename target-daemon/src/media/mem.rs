//! A block store in memory for unit tests: fully provisioned, write-through, never fails
//! except past its end, so a test sees the SCSI layer's behaviour and not the media's.

use std::sync::Mutex;

use super::{BlockStore, CacheMode, MediaError};

/// 512-byte blocks in a vector; its length (a multiple of 512) is the capacity.
/// Unmapping falls back to the trait's default (writing zeros).
pub(crate) struct MemStore(pub(crate) Mutex<Vec<u8>>);

impl MemStore {
    /// A store of `bytes`, whose length is a multiple of 512.
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        MemStore(Mutex::new(bytes))
    }
}

impl BlockStore for MemStore {
    fn block_size(&self) -> u32 {
        512
    }
    fn num_blocks(&self) -> u64 {
        self.0.lock().map(|v| v.len() as u64 / 512).unwrap_or(0)
    }
    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let v = self
            .0
            .lock()
            .map_err(|_| MediaError::Failed("poisoned".into()))?;
        let off = usize::try_from(lba * 512).map_err(|_| MediaError::Failed("lba".into()))?;
        let src = v
            .get(off..off + buf.len())
            .ok_or_else(|| MediaError::Failed("past the end".into()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_blocks(&self, lba: u64, data: &[u8], _fua: bool) -> Result<(), MediaError> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| MediaError::Failed("poisoned".into()))?;
        let off = usize::try_from(lba * 512).map_err(|_| MediaError::Failed("lba".into()))?;
        let dst = v
            .get_mut(off..off + data.len())
            .ok_or_else(|| MediaError::Failed("past the end".into()))?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), MediaError> {
        Ok(())
    }
    fn cache_mode(&self) -> CacheMode {
        CacheMode::WriteThrough
    }
    fn health(&self) -> Result<(), MediaError> {
        Ok(())
    }
}
