//! Rebuild: copying a failed mirror back from a healthy one while I/O goes on, one
//! rebuild per set, ending with the metadata area and a header at the current epoch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::format::{encode_meta, header, DEALLOCATED, META_SLOT};
use super::{MirrorSet, MirrorState, RebuildTicket};
use crate::media::MediaError;

impl MirrorSet {
    /// Puts mirror `target` into service for a rebuild: writers reach it from now on and
    /// status shows it rebuilding, before the copy starts (on its own thread, for the
    /// admin interface) with [`run_rebuild`](Self::run_rebuild).
    ///
    /// Only a failed mirror is rebuilt, and only while another mirror is healthy to copy
    /// from; one rebuild per set at a time. The checks and the state change happen
    /// together under the set's rebuild lock and the mirror's state lock, so of two
    /// concurrent calls exactly one succeeds. Refusals are
    /// [`MediaError::RebuildRefused`].
    pub fn begin_rebuild(&self, target: usize) -> Result<RebuildTicket, MediaError> {
        let m = self
            .mirrors
            .get(target)
            .ok_or_else(|| MediaError::RebuildRefused(format!("no mirror {target}")))?;
        let refuse = |why: String| Err(MediaError::RebuildRefused(why));
        let mut running = self
            .rebuilding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *running {
            Some(r) if r == target => {
                return refuse(format!("mirror {target} is already being rebuilt"));
            }
            Some(r) => {
                return refuse(format!(
                    "mirror {r} of this set is already being rebuilt; one at a time"
                ));
            }
            None => {}
        }
        let sources = (0..self.mirrors.len())
            .filter(|&j| j != target && self.healthy(j))
            .count();
        {
            let mut state = m.state();
            match (&*state, sources) {
                (MirrorState::Healthy, 0) => {
                    return refuse(format!(
                        "mirror {target} is the last healthy mirror of the set: \
                         rebuilding it would leave no copy to read"
                    ));
                }
                (MirrorState::Healthy, _) => {
                    return refuse(format!(
                        "mirror {target} is healthy: only a failed mirror is rebuilt"
                    ));
                }
                (MirrorState::Rebuilding(_), _) => {
                    return refuse(format!("mirror {target} is already being rebuilt"));
                }
                (MirrorState::Failed(_), 0) => {
                    return refuse(format!("no healthy mirror to copy mirror {target} from"));
                }
                (MirrorState::Failed(_), _) => {}
            }
            // The replaced disk works before writers may reach it: cleared the other way
            // round, a write landing in between would fail the mirror again at once.
            m.inject_eio.store(false, Ordering::Relaxed);
            *state = MirrorState::Rebuilding(0);
        }
        *running = Some(target);
        info!(mirror = %m.path.display(), "rebuild started");
        Ok(RebuildTicket { target })
    }

    /// Gives up a rebuild that [`begin_rebuild`](Self::begin_rebuild) started but that
    /// will not run (its thread could not start): the mirror is failed again with `why`
    /// and the set is free for another rebuild.
    pub fn abandon_rebuild(&self, ticket: RebuildTicket, why: String) {
        self.fail(ticket.target, why);
        self.end_rebuild();
    }

    pub(super) fn end_rebuild(&self) {
        *self
            .rebuilding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// [`begin_rebuild`](Self::begin_rebuild) and [`run_rebuild`](Self::run_rebuild) in
    /// one call.
    pub fn rebuild(
        &self,
        target: usize,
        rate_bytes_s: u64,
        progress: impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let ticket = self.begin_rebuild(target)?;
        self.run_rebuild(ticket, rate_bytes_s, progress)
    }

    /// Copies every block from a healthy mirror onto the mirror of `ticket`,
    /// `rate_bytes_s` at most, while I/O continues, then the current metadata record;
    /// `progress(done, total)` is called per chunk. It ends healthy only if nothing
    /// failed it meanwhile: any write or sync error on it, from the copy or from the
    /// writes it takes alongside, leaves it failed until a new rebuild is started.
    pub fn run_rebuild(
        &self,
        ticket: RebuildTicket,
        rate_bytes_s: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let target = ticket.target;
        let r = self.copy_to(target, rate_bytes_s, &mut progress);
        let path = self.mirrors[target].path.display();
        match &r {
            Ok(()) => info!(mirror = %path, "rebuild complete"),
            Err(e) => {
                // A no-op when a write already failed it (its reason is kept).
                self.fail(target, format!("rebuild stopped: {e}"));
                warn!(mirror = %path, "rebuild failed: {e}");
            }
        }
        self.end_rebuild();
        r
    }

    /// Moves mirror `target` from rebuilding to `to`, only if it is still rebuilding:
    /// anything that failed it since (a write or sync error) wins.
    fn advance_rebuild(&self, target: usize, to: MirrorState) -> Result<(), MediaError> {
        let mut state = self.mirrors[target].state();
        match &*state {
            MirrorState::Rebuilding(_) => {
                *state = to;
                Ok(())
            }
            MirrorState::Failed(why) => Err(MediaError::Failed(format!(
                "mirror {target} failed during its rebuild: {why}"
            ))),
            MirrorState::Healthy => Err(MediaError::Failed(format!(
                "mirror {target} left its rebuild"
            ))),
        }
    }

    fn copy_to(
        &self,
        target: usize,
        rate_bytes_s: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), MediaError> {
        let bs = u64::from(self.block_size);
        let chunk = (1u64 << 20) / bs;
        let mut buf = vec![0u8; (chunk * bs) as usize];
        let mut crcs = Vec::new();
        let started = Instant::now();
        let mut lba = 0;
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let b = &mut buf[..(n * bs) as usize];
            {
                let _g = self
                    .io
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // No point copying onto a mirror a write has failed meanwhile.
                self.advance_rebuild(target, MirrorState::Rebuilding(lba))?;
                // Under the lock held exclusively: repairs may write.
                self.read_copies(lba, b, true, &mut crcs)?;
                if let Err(e) = self.copy_chunk(target, lba, b, &crcs) {
                    self.fail(target, format!("rebuild write failed: {e}"));
                    return Err(MediaError::Io(e));
                }
                lba += n;
                self.advance_rebuild(target, MirrorState::Rebuilding(lba))?;
            }
            progress(lba, self.blocks);
            if rate_bytes_s > 0 {
                let due = Duration::from_secs_f64((lba * bs) as f64 / rate_bytes_s as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        self.finish_rebuild(target)
    }

    /// Copies the metadata area onto mirror `target` and makes it current (its header at
    /// the set's epoch) and healthy.
    fn finish_rebuild(&self, target: usize) -> Result<(), MediaError> {
        let m = &self.mirrors[target];
        // The metadata area last, under the record lock so a concurrent write_meta
        // (which skips a mirror being rebuilt) either lands before this copy or after
        // the mirror is healthy again. The current record goes into its slot, the other
        // slot is zeroed: a mirror coming back from an old life may hold stale records
        // there, and the whole area is written so a truncated file regains its length.
        let rec = self.record();
        let mut area = vec![0u8; 2 * META_SLOT as usize];
        if let Some(r) = rec.as_ref() {
            let at = (self.slot_off(r.generation) - self.meta_off) as usize;
            let bytes = encode_meta(r.generation, &r.payload);
            area[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        let written = {
            // Held from the header write to the state change, so an epoch raised by
            // another mirror's failure either reaches this header or comes after the
            // mirror is healthy and rewrites it.
            let _g = self
                .meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let epoch = self.epoch.load(Ordering::SeqCst);
            // One fdatasync covers the copied chunks and the area; a second one orders
            // the header (which makes the mirror current after a restart) after them.
            let r = m
                .write_at(&area, self.meta_off)
                .and_then(|()| m.sync())
                .and_then(|()| {
                    m.write_at(
                        &header(
                            &self.set_id,
                            target as u32,
                            self.block_size,
                            self.blocks,
                            epoch,
                        ),
                        0,
                    )
                })
                .and_then(|()| m.sync());
            match r {
                Ok(()) => Ok(self.advance_rebuild(target, MirrorState::Healthy)),
                Err(e) => Err(e),
            }
        };
        drop(rec);
        match written {
            Ok(healthy) => healthy,
            Err(e) => {
                // After `meta` is released: failing takes it to raise the epoch.
                self.fail(target, format!("rebuild write failed: {e}"));
                Err(MediaError::Io(e))
            }
        }
    }

    /// Writes one rebuild chunk onto mirror `target`: the verified copy's blocks and
    /// checksums as they are, deallocated blocks as holes (so a rebuild keeps the set thin
    /// and every block's provisioning the same on every mirror).
    fn copy_chunk(
        &self,
        target: usize,
        lba: u64,
        data: &[u8],
        crcs: &[u32],
    ) -> std::io::Result<()> {
        let m = &self.mirrors[target];
        let bs = self.block_size as usize;
        let mut k = 0;
        while k < crcs.len() {
            let hole = crcs[k] == DEALLOCATED;
            let run = crcs[k..]
                .iter()
                .take_while(|&&c| (c == DEALLOCATED) == hole)
                .count();
            let off = self.data_off(lba + k as u64);
            if hole {
                m.punch(off, (run * bs) as u64)?;
            } else {
                m.write_at(&data[k * bs..(k + run) * bs], off)?;
            }
            k += run;
        }
        let raw: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        m.write_at(&raw, self.crc_off(lba))
    }
}
