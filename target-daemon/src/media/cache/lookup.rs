//! Reads through the cache: each block from the newest record that holds it, or from the
//! mirrors, and the provisioning status GET LBA STATUS reports.

use super::*;

impl WriteCache {
    /// Where the current copy of each of `n` blocks from `lba` of `volume` is. Destage
    /// drops an index entry or a pending discard only after the mirrors hold its effect,
    /// so a block that neither covers is already on the mirrors. Callers look at the
    /// mirrors only after this, never before: the other order could miss a block whose
    /// destage finished in between.
    pub(super) fn sources(g: &Inner, volume: u32, lba: u64, n: u64, bs: u64) -> Vec<Source> {
        let end = lba.saturating_add(n);
        let discarded: Vec<(u64, u64)> = g
            .discards
            .iter()
            .filter(|d| d.volume == volume && d.lba < end && lba < d.lba + d.blocks)
            .map(|d| (d.lba, d.lba + d.blocks))
            .collect();
        let mut sources: Vec<Source> = (lba..end)
            .map(|b| {
                if discarded.iter().any(|&(s, e)| (s..e).contains(&b)) {
                    Source::Discarded
                } else {
                    Source::Mirrors
                }
            })
            .collect();
        // An index entry is newer than any pending discard of its block (see `index`).
        g.index.runs(volume, lba, n, bs, |first, count, pos| {
            for k in 0..count {
                sources[(first - lba + k) as usize] = Source::Ring(pos + k * bs);
            }
        });
        sources
    }

    /// Reads blocks of `volume`: cached copies from the ring, blocks of pending discards
    /// as zeros, the rest from the mirrors. In an inline scope the mirrors are read only
    /// from the page cache ([`MirrorSet::read`]); their refusal changes nothing here.
    pub fn read(&self, volume: u32, lba: u64, buf: &mut [u8]) -> Result<(), MediaError> {
        let m = self
            .volumes
            .get(&volume)
            .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
        let bs = m.block_size() as usize;
        let n = buf.len() / bs;
        let sources = {
            let g = lock(&self.inner)?;
            let sources = Self::sources(&g, volume, lba, n as u64, bs as u64);
            // Copied under the lock: destage may release the space once it lets go.
            for (k, src) in sources.iter().enumerate() {
                let b = &mut buf[k * bs..(k + 1) * bs];
                match src {
                    Source::Ring(pos) => self.get(self.phys(*pos), b),
                    Source::Discarded => b.fill(0),
                    Source::Mirrors => {}
                }
            }
            sources
        };
        // Only the blocks the mirrors hold are read there: a block being destaged is
        // mid-write on the mirrors, and a verified read that met it there could "repair"
        // one mirror with the other's older copy.
        let mut k = 0;
        while k < n {
            if !matches!(sources[k], Source::Mirrors) {
                k += 1;
                continue;
            }
            let run = sources[k..]
                .iter()
                .take_while(|s| matches!(s, Source::Mirrors))
                .count();
            m.read(lba + k as u64, &mut buf[k * bs..(k + run) * bs])?;
            k += run;
        }
        Ok(())
    }

    /// Provisioning of the blocks from `lba` of `volume` (GET LBA STATUS): the status of
    /// `lba` and how many blocks from it, at least 1 and at most `max`, share it. Cached
    /// writes are mapped, pending discards deallocated; the rest is what the mirrors'
    /// checksums say ([`DEALLOCATED`](crate::media::mirror::DEALLOCATED) or not).
    pub fn provisioning(
        &self,
        volume: u32,
        lba: u64,
        max: u64,
    ) -> Result<(Provisioning, u64), MediaError> {
        let m = self
            .volumes
            .get(&volume)
            .ok_or_else(|| MediaError::Failed(format!("no volume {volume}")))?;
        let max = max.max(1);
        if lba >= m.blocks() {
            return Err(MediaError::OutOfRange { lba, blocks: 1 });
        }
        let end = lba.saturating_add(max).min(m.blocks());
        let mut state = None;
        let mut at = lba;
        let mut chunk = PROVISIONING_CHUNK_FIRST;
        while at < end {
            let n = (end - at).min(chunk);
            chunk = (chunk * 2).min(PROVISIONING_CHUNK_MAX);
            let bs = u64::from(m.block_size());
            let sources = Self::sources(&*lock(&self.inner)?, volume, at, n, bs);
            let crcs = m.checksums(at, n)?;
            for (src, crc) in sources.iter().zip(crcs) {
                let s = match src {
                    Source::Ring(_) => Provisioning::Mapped,
                    Source::Discarded => Provisioning::Deallocated,
                    Source::Mirrors if crc == crate::media::mirror::DEALLOCATED => {
                        Provisioning::Deallocated
                    }
                    Source::Mirrors => Provisioning::Mapped,
                };
                match state {
                    None => state = Some(s),
                    Some(first) if first != s => return Ok((first, at - lba)),
                    Some(_) => {}
                }
                at += 1;
            }
        }
        Ok((state.unwrap_or(Provisioning::Mapped), at - lba))
    }
}
