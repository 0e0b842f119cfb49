//! Scrub: verifying every copy of every block and the metadata record on every mirror,
//! repairing what does not match from a verified copy.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use super::format::{parse_meta, META_SLOT};
use super::{MirrorSet, ScrubReport};
use crate::media::MediaError;

/// Clears the scrub progress however the scrub ends.
struct ScrubRunning<'a>(&'a AtomicU64);

impl Drop for ScrubRunning<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

impl MirrorSet {
    /// Verifies every copy of every block, repairing bad copies from good ones.
    pub fn scrub(&self) -> Result<ScrubReport, MediaError> {
        let mut report = ScrubReport::default();
        self.scrubbed.store(1, Ordering::Relaxed);
        let _running = ScrubRunning(&self.scrubbed);
        let bs = self.block_size as usize;
        let chunk = ((1usize << 20) / bs) as u64;
        let mut lba = 0;
        let mut buf = vec![0u8; chunk as usize * bs];
        let mut other = vec![0u8; chunk as usize * bs];
        let (mut crcs, mut good_crcs) = (Vec::new(), Vec::new());
        while lba < self.blocks {
            let n = chunk.min(self.blocks - lba);
            let len = n as usize * bs;
            let _g = self
                .io
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if lba == 0 {
                // A file cut short reads back zeros with zero checksums ("never written")
                // once a later write extends it again; only its size gives it away.
                let want = self.file_len;
                for i in 0..self.mirrors.len() {
                    if self.healthy(i) {
                        match self.mirrors[i].file.size() {
                            Ok(len) if len >= want => {}
                            Ok(len) => {
                                self.fail(i, format!("holds {len} bytes of {want}: truncated"))
                            }
                            Err(e) => self.fail(i, format!("scrub cannot stat: {e}")),
                        }
                    }
                }
            }
            let healthy: Vec<usize> = (0..self.mirrors.len())
                .filter(|&i| self.healthy(i))
                .collect();
            let before = self.repairs.load(Ordering::Relaxed);
            for &i in &healthy {
                match self.read_from(i, lba, &mut buf[..len], &mut crcs) {
                    Ok(bad) => report.mismatches += bad.len() as u64,
                    Err(e) => self.fail(i, format!("scrub read error: {e}")),
                }
            }
            // A verified read repairs the bad copies it finds (the lock is held).
            self.read_copies(lba, &mut other[..len], true, &mut good_crcs)?;
            report.repaired += self.repairs.load(Ordering::Relaxed) - before;
            // Copies that each verify can still disagree (a crash between the writes to
            // two mirrors of a block no longer in the journal cannot leave this, so it
            // means a bug or tampering): count it and make every copy the verified one.
            // Equal data with different checksums is a zero block that one mirror holds
            // deallocated and another mapped: a disagreement about provisioning.
            for &i in &healthy {
                if !self.healthy(i) || self.read_from(i, lba, &mut buf[..len], &mut crcs).is_err() {
                    continue;
                }
                for k in 0..n as usize {
                    let (a, b) = (&buf[k * bs..(k + 1) * bs], &other[k * bs..(k + 1) * bs]);
                    if a != b || crcs[k] != good_crcs[k] {
                        report.mismatches += 1;
                        let at = lba + k as u64;
                        warn!(mirror = %self.mirrors[i].path.display(), lba = at, "copies differ");
                        if self.repair_one(i, at, b, good_crcs[k]) {
                            report.repaired += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            report.blocks += n;
            lba += n;
            self.scrubbed.store(lba + 1, Ordering::Relaxed);
        }
        self.scrub_meta(&mut report);
        Ok(report)
    }

    /// Checks that every healthy mirror holds the current metadata record in its slot and
    /// rewrites it where it does not (counted like a block copy). The older slot is not
    /// compared: it may hold a previous generation or nothing, and is never read while
    /// the current one verifies.
    fn scrub_meta(&self, report: &mut ScrubReport) {
        let rec = self.record();
        let Some(r) = rec.as_ref() else {
            return;
        };
        let mut buf = vec![0u8; META_SLOT as usize];
        for i in 0..self.mirrors.len() {
            if !self.healthy(i) {
                continue;
            }
            if let Err(e) = self.mirrors[i].read_at(&mut buf, self.slot_off(r.generation)) {
                self.fail(i, format!("scrub metadata read error: {e}"));
                continue;
            }
            if parse_meta(&buf).as_ref() == Some(r) {
                continue;
            }
            report.mismatches += 1;
            warn!(mirror = %self.mirrors[i].path.display(), generation = r.generation, "metadata record damaged");
            match self.write_record(i, r) {
                Ok(()) => {
                    report.repaired += 1;
                    self.repairs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.repair_failures.fetch_add(1, Ordering::Relaxed);
                    self.fail(i, format!("metadata write error: {e}"));
                }
            }
        }
    }
}
