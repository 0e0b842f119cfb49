//! A cached volume: one LUN's block store, its writes through the cache, its reads from
//! the cache or its mirrors.

use super::*;

/// A LUN's storage: the write cache in front of its mirror set.
pub struct CachedVolume {
    cache: Arc<WriteCache>,
    mirrors: Arc<MirrorSet>,
    volume: u32,
    mode: CacheMode,
}

impl CachedVolume {
    /// Volume `volume` of `cache`, acknowledging writes as `mode` says.
    pub fn new(
        cache: Arc<WriteCache>,
        mirrors: Arc<MirrorSet>,
        volume: u32,
        mode: CacheMode,
    ) -> Self {
        Self {
            cache,
            mirrors,
            volume,
            mode,
        }
    }
}

impl BlockStore for CachedVolume {
    fn block_size(&self) -> u32 {
        self.mirrors.block_size()
    }

    fn num_blocks(&self) -> u64 {
        self.mirrors.blocks()
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        self.cache.read(self.volume, lba, buf)
    }

    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size());
        let n = data.len() as u64 / bs;
        if !(data.len() as u64).is_multiple_of(bs)
            || lba.checked_add(n).is_none_or(|e| e > self.num_blocks())
        {
            return Err(MediaError::OutOfRange { lba, blocks: n });
        }
        let seq = self.cache.append(self.volume, lba, data)?;
        if (fua || self.mode != CacheMode::Volatile) && !defer(&self.cache, seq) {
            self.cache.wait_durable(seq)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), MediaError> {
        let seq = self.cache.appended_seq();
        if defer(&self.cache, seq) {
            return Ok(());
        }
        self.cache.wait_durable(seq)
    }

    /// One discard record, acknowledged like a write of the same blocks: committed first
    /// in nonvolatile mode, at the next flush in volatile mode.
    fn unmap(&self, lba: u64, blocks: u64) -> Result<(), MediaError> {
        if lba
            .checked_add(blocks)
            .is_none_or(|e| e > self.num_blocks())
        {
            return Err(MediaError::OutOfRange { lba, blocks });
        }
        if blocks == 0 {
            return Ok(());
        }
        let seq = self.cache.append_discard(self.volume, lba, blocks)?;
        if self.mode != CacheMode::Volatile && !defer(&self.cache, seq) {
            self.cache.wait_durable(seq)?;
        }
        Ok(())
    }

    fn thin_provisioned(&self) -> bool {
        true
    }

    fn provisioning(&self, lba: u64, max: u64) -> Result<(Provisioning, u64), MediaError> {
        self.cache.provisioning(self.volume, lba, max)
    }

    fn cache_mode(&self) -> CacheMode {
        self.mode
    }

    fn writes_in_memory(&self) -> bool {
        true
    }

    /// Cached blocks are copied from the ring, blocks of pending discards are zeros, and
    /// the mirror set reads the rest only from the page cache in an inline scope.
    fn reads_in_memory(&self) -> bool {
        true
    }

    fn health(&self) -> Result<(), MediaError> {
        if self
            .mirrors
            .status()
            .iter()
            .any(|s| s.state == crate::media::mirror::MirrorState::Healthy)
        {
            Ok(())
        } else {
            Err(MediaError::Failed("every mirror has failed".into()))
        }
    }
}
