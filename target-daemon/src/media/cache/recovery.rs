//! Recovery at open: the committed records still in the ring are found from the
//! superblock's tail, checked record by record, and indexed again, up to the first torn or
//! stale one.

use super::*;

impl WriteCache {
    pub(super) fn recover(&self, name: &str) -> Result<(), MediaError> {
        let started = Instant::now();
        let (tail, tail_seq, sb_seq) = self.read_superblock().ok_or_else(|| {
            MediaError::Failed(format!(
                "{name}: no valid superblock: not an ftss write cache"
            ))
        })?;
        let (mut pos, mut seq, mut n) = (tail, tail_seq, 0u64);
        let mut touched = Vec::new();
        while let Some((kind, volume, lba, payload)) = self.parse_record(pos, seq) {
            let rec_len = align(HDR_LEN + payload.len() as u64);
            if kind == KIND_WRAP {
                // A wrap record never sits at the ring start, so this is the next lap.
                pos = pos.div_ceil(self.ring) * self.ring;
            } else {
                let m = self.volumes.get(&volume).ok_or_else(|| {
                    MediaError::Failed(format!("{name}: record for unknown volume {volume}"))
                })?;
                match kind {
                    KIND_BLOCKS => m.write(lba, &payload)?,
                    KIND_DISCARD => {
                        let blocks = <[u8; 8]>::try_from(payload.as_slice())
                            .map(u64::from_le_bytes)
                            .map_err(|_| {
                                MediaError::Failed(format!(
                                    "{name}: discard record {seq} with a {}-byte payload",
                                    payload.len()
                                ))
                            })?;
                        m.deallocate(lba, blocks)?;
                    }
                    // Its crc verified, so a newer build wrote it: applying it as
                    // something else, or skipping it, could lose acknowledged data.
                    _ => {
                        return Err(MediaError::Failed(format!(
                            "{name}: record {seq} of unknown kind {kind}: written by a newer \
                             version of ftss"
                        )))
                    }
                }
                if !touched.contains(&volume) {
                    touched.push(volume);
                }
                pos += rec_len;
                n += 1;
            }
            seq += 1;
            if pos - tail >= self.ring {
                break;
            }
        }
        for v in touched {
            if let Some(m) = self.volumes.get(&v) {
                m.sync()?;
            }
        }
        // Every replayed record is on the mirrors: start with an empty ring after them.
        // Records past the first bad one were never acknowledged, but some may be intact
        // on disk (the kernel writes back mapped pages in any order). Skipping sequence
        // numbers by more than the ring can hold keeps a later recovery from taking one of
        // them for a new record written at the same place with the same number.
        let seq = seq + self.ring / ALIGN + 1;
        self.write_superblock(pos, seq, sb_seq + 1)?;
        let mut g = lock(&self.inner)?;
        g.head = pos;
        g.tail = pos;
        g.durable_pos = pos;
        g.claimed_pos = pos;
        g.claimed_seq = seq - 1;
        g.next_seq = seq;
        g.appended_seq = seq - 1;
        g.durable_seq = seq - 1;
        g.sb_seq = sb_seq + 1;
        drop(g);
        let ms = started.elapsed().as_millis() as u64;
        self.recovered.store(n, Ordering::Relaxed);
        self.recovery_ms.store(ms, Ordering::Relaxed);
        info!(records = n, ms, "write cache recovered");
        Ok(())
    }
}
