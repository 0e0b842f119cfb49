//! The metadata area: one small record (a LUN's persistent reservations) kept as durable
//! as the data, in two alternating slots so a torn write leaves the previous one.

use std::sync::MutexGuard;

use tracing::warn;

use super::format::{encode_meta, parse_meta, MetaRecord, META_MAX, META_SLOT};
use super::MirrorSet;
use crate::media::MediaError;

impl MirrorSet {
    pub(super) fn record(&self) -> MutexGuard<'_, Option<MetaRecord>> {
        // Updated by a single assignment after the I/O: consistent across a panic.
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads both slots of mirror `i`.
    fn read_slots(&self, i: usize) -> std::io::Result<[Option<MetaRecord>; 2]> {
        let mut buf = vec![0u8; META_SLOT as usize];
        let mut out = [None, None];
        for (k, slot) in out.iter_mut().enumerate() {
            self.mirrors[i].read_at(&mut buf, self.meta_off + k as u64 * META_SLOT)?;
            *slot = parse_meta(&buf);
        }
        Ok(out)
    }

    /// Writes `rec` into its slot on mirror `i` and syncs it.
    pub(super) fn write_record(&self, i: usize, rec: &MetaRecord) -> std::io::Result<()> {
        let m = &self.mirrors[i];
        m.write_at(
            &encode_meta(rec.generation, &rec.payload),
            self.slot_off(rec.generation),
        )?;
        m.sync()
    }

    /// At open: the newest whole record across the healthy mirrors becomes the current
    /// one, and every healthy mirror that lacks it (a crash during `write_meta` reached
    /// only some) gets it now, so losing the mirror that had it cannot bring back an
    /// older record later.
    pub(super) fn load_meta(&self) {
        let mut rec = self.record();
        let mut seen: Vec<(usize, [Option<MetaRecord>; 2])> = Vec::new();
        for i in 0..self.mirrors.len() {
            if !self.healthy(i) {
                continue;
            }
            match self.read_slots(i) {
                Ok(slots) => seen.push((i, slots)),
                Err(e) => self.fail(i, format!("metadata read error: {e}")),
            }
        }
        let best = seen
            .iter()
            .flat_map(|(_, slots)| slots.iter().flatten())
            .max_by_key(|r| r.generation)
            .cloned();
        if let Some(b) = &best {
            for (i, slots) in &seen {
                if slots[(b.generation % 2) as usize].as_ref() == Some(b) || !self.healthy(*i) {
                    continue;
                }
                warn!(mirror = %self.mirrors[*i].path.display(), generation = b.generation, "metadata record missing: copied from another mirror");
                if let Err(e) = self.write_record(*i, b) {
                    self.fail(*i, format!("metadata write error: {e}"));
                }
            }
        }
        *rec = best;
    }

    /// Stores `payload` as the set's metadata record (at most [`META_MAX`] bytes) on every
    /// healthy mirror and syncs it there: the next generation goes into the slot that does
    /// not hold the current one, so a crash midway leaves the current record readable.
    /// A mirror that fails the write or the sync is taken out of service, as a failed
    /// data write takes it; the call fails only if no mirror took the record.
    pub fn write_meta(&self, payload: &[u8]) -> Result<(), MediaError> {
        if payload.len() > META_MAX {
            return Err(MediaError::MetaTooLarge {
                len: payload.len(),
                max: META_MAX,
            });
        }
        let mut rec = self.record();
        let new = MetaRecord {
            generation: rec.as_ref().map_or(1, |r| r.generation + 1),
            payload: payload.to_vec(),
        };
        let bytes = encode_meta(new.generation, payload);
        let off = self.slot_off(new.generation);
        // Only healthy mirrors: one being rebuilt gets the area at the end of its
        // rebuild, under this lock.
        let targets: Vec<usize> = (0..self.mirrors.len())
            .filter(|&i| self.healthy(i))
            .collect();
        for &i in &targets {
            if let Err(e) = self.mirrors[i].write_at(&bytes, off) {
                self.fail(i, format!("metadata write error: {e}"));
            }
        }
        let mut took = 0;
        for &i in &targets {
            if !self.healthy(i) {
                continue;
            }
            match self.mirrors[i].sync() {
                Ok(()) => took += 1,
                // Never retried, like a data sync (docs/design.md).
                Err(e) => self.fail(i, format!("metadata sync failed: {e}")),
            }
        }
        if took == 0 {
            return Err(MediaError::Failed(
                "no mirror took the metadata record".into(),
            ));
        }
        *rec = Some(new);
        Ok(())
    }

    /// The newest metadata record [`write_meta`](Self::write_meta) stored (found at open
    /// on the healthy mirrors, a torn newest slot falling back to the older one), or
    /// `None` if there is none.
    pub fn read_meta(&self) -> Option<Vec<u8>> {
        self.record().as_ref().map(|r| r.payload.clone())
    }
}
