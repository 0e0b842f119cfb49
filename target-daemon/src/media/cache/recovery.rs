//! Recovery at open: the committed records still in the ring are found from the
//! superblock's tail, checked record by record, and indexed again, up to the first torn or
//! stale one. They stay in the ring, as they were before the crash, and destage moves them
//! to the mirrors in the background: opening costs one read of the ring, not a copy of it
//! to every mirror and a sync.

use super::*;

/// A record recovery found, in the form the queue and the index hold it.
struct Found {
    /// Sequence number the queue entry carries (a jump's: the last number it skips).
    last: u64,
    end: u64,
    volume: u32,
    lba: u64,
    op: Op,
}

impl WriteCache {
    pub(super) fn recover(&self, name: &str) -> Result<(), MediaError> {
        let started = Instant::now();
        let (tail, tail_seq, sb_seq) = self.read_superblock().ok_or_else(|| {
            MediaError::Failed(format!(
                "{name}: no valid superblock: not an ftss write cache"
            ))
        })?;
        let mut g = lock(&self.inner)?;
        g.tail = tail;
        g.sb_seq = sb_seq;
        let (mut pos, mut seq, mut n) = (tail, tail_seq, 0u64);
        while pos - tail < self.ring {
            let Some((kind, volume, lba, payload)) = self.parse_record(pos, seq) else {
                break;
            };
            let f = self.found(name, pos, seq, kind, volume, lba, &payload)?;
            match f.op {
                Op::Blocks { len } => {
                    let bs = self.block_size_of(volume);
                    g.index
                        .insert(volume, lba, u64::from(len) / bs, pos + HDR_LEN, bs);
                    n += 1;
                }
                Op::Discard { blocks } => {
                    g.index
                        .remove(volume, lba, blocks, self.block_size_of(volume));
                    g.discards.push_back(Discard {
                        seq,
                        volume,
                        lba,
                        blocks,
                    });
                    n += 1;
                }
                Op::Wrap | Op::Jump { .. } => {}
            }
            g.queue.push_back(Pending {
                seq: f.last,
                pos,
                end: f.end,
                volume: f.volume,
                lba: f.lba,
                op: f.op,
            });
            pos = f.end;
            seq = f.last + 1;
        }
        // Everything found is durable: it is on the media, and nothing after it counts.
        let last = seq - 1;
        g.head = pos;
        g.durable_pos = pos;
        g.claimed_pos = pos;
        g.claimed_seq = last;
        g.durable_seq = last;
        g.appended_seq = last;
        g.next_seq = seq;
        drop(g);
        self.durable_tx.send_replace(last);
        self.restart_numbering(name, seq)?;
        let ms = started.elapsed().as_millis() as u64;
        self.recovered.store(n, Ordering::Relaxed);
        self.recovery_ms.store(ms, Ordering::Relaxed);
        info!(records = n, ms, "write cache recovered");
        Ok(())
    }

    /// Checks one record recovery found (its crc verified) and says what it is. A record
    /// the mirrors could not take, or of a kind this build does not know, is an error:
    /// skipping it, or applying it as something else, could lose acknowledged data.
    #[allow(clippy::too_many_arguments)]
    fn found(
        &self,
        name: &str,
        pos: u64,
        seq: u64,
        kind: u16,
        volume: u32,
        lba: u64,
        payload: &[u8],
    ) -> Result<Found, MediaError> {
        let bad = |what: &str| MediaError::Failed(format!("{name}: record {seq} {what}"));
        let u64_payload = || {
            <[u8; 8]>::try_from(payload)
                .map(u64::from_le_bytes)
                .map_err(|_| bad(&format!("has a {}-byte payload", payload.len())))
        };
        let end = pos + align(HDR_LEN + payload.len() as u64);
        let mut f = Found {
            last: seq,
            end,
            volume,
            lba,
            op: Op::Wrap,
        };
        match kind {
            // A wrap record never sits at the ring start, so this is the next lap.
            KIND_WRAP => f.end = pos.div_ceil(self.ring) * self.ring,
            KIND_JUMP => {
                let to = u64_payload()?;
                // Forward only, and far from overflow: the numbers after it must count up.
                if to <= seq || to > u64::MAX / 2 {
                    return Err(bad(&format!("jumps to sequence number {to}")));
                }
                f.last = to - 1;
                f.op = Op::Jump { to };
            }
            KIND_BLOCKS | KIND_DISCARD => {
                let m = self
                    .volumes
                    .get(&volume)
                    .ok_or_else(|| bad(&format!("is for unknown volume {volume}")))?;
                let blocks = if kind == KIND_DISCARD {
                    u64_payload()?
                } else {
                    let bs = u64::from(m.block_size());
                    if payload.is_empty() || !(payload.len() as u64).is_multiple_of(bs) {
                        return Err(bad(&format!("holds {} bytes", payload.len())));
                    }
                    payload.len() as u64 / bs
                };
                if lba.checked_add(blocks).is_none_or(|e| e > m.blocks()) {
                    return Err(bad(&format!("is outside its volume ({blocks} at {lba})")));
                }
                f.op = if kind == KIND_DISCARD {
                    Op::Discard { blocks }
                } else {
                    Op::Blocks {
                        len: payload.len() as u32,
                    }
                };
            }
            _ => {
                return Err(bad(&format!(
                    "of unknown kind {kind}: written by a newer version of ftss"
                )))
            }
        }
        Ok(f)
    }

    /// Writes and commits a jump record where the log ended, before any new record.
    ///
    /// After a crash the ring may hold intact records past the first missing one, never
    /// acknowledged. A new record written at the same place with the same number would
    /// let a later recovery walk past the new records into those stale ones, so numbering
    /// restarts `ring / 64 + 1` above `next`: more records than the ring can hold were
    /// ever numbered from `next` on, so no stale record can carry an expected number. The
    /// jump is committed here, before the cache takes a write: if it is lost, the next
    /// recovery stops at the same place and writes it again.
    fn restart_numbering(&self, name: &str, next: u64) -> Result<(), MediaError> {
        let to = next
            .checked_add(self.ring / ALIGN + 1)
            .filter(|&t| t <= u64::MAX / 2)
            .ok_or_else(|| {
                MediaError::Failed(format!("{name}: sequence numbers exhausted at {next}"))
            })?;
        let payload = to.to_le_bytes();
        let seq = match self.append_record(u32::MAX, 0, Op::Jump { to }, &payload) {
            Ok(seq) => seq,
            // No room behind a ring full of recovered records: move them to the mirrors
            // first (no destage thread runs yet), which frees all of it.
            Err(MediaError::Full) => {
                self.destage_committed()?;
                self.append_record(u32::MAX, 0, Op::Jump { to }, &payload)?
            }
            Err(e) => return Err(e),
        };
        self.wait_commit(seq)
    }
}
