//! Failure handling: which mirrors serve, and taking a failing one out of service for
//! good (until rebuilt) by raising the survivors' epoch. The set keeps serving degraded
//! while one mirror is healthy.

use std::sync::atomic::Ordering;

use tracing::error;

use super::format::header;
use super::{MirrorSet, MirrorState};
use crate::media::MediaError;

impl MirrorSet {
    pub(super) fn healthy(&self, i: usize) -> bool {
        *self.mirrors[i].state() == MirrorState::Healthy
    }

    /// Mirrors that take writes: healthy ones and the one being rebuilt.
    pub(super) fn writable(&self, i: usize) -> bool {
        matches!(
            *self.mirrors[i].state(),
            MirrorState::Healthy | MirrorState::Rebuilding(_)
        )
    }

    /// Takes mirror `i` out of service and raises the survivors' epoch, so it is not
    /// trusted again after a restart until rebuilt.
    pub(crate) fn fail(&self, i: usize, why: String) {
        {
            let mut s = self.mirrors[i].state();
            if matches!(*s, MirrorState::Failed(_)) {
                return;
            }
            *s = MirrorState::Failed(why.clone());
        }
        error!(mirror = %self.mirrors[i].path.display(), "mirror failed: {why}");
        let _g = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        for j in 0..self.mirrors.len() {
            if self.healthy(j) {
                let h = header(&self.set_id, j as u32, self.block_size, self.blocks, epoch);
                let m = &self.mirrors[j];
                if let Err(e) = m.write_at(&h, 0).and_then(|()| m.sync()) {
                    drop(_g);
                    self.fail(j, format!("header update failed: {e}"));
                    return;
                }
            }
        }
    }

    pub(super) fn any_healthy(&self) -> Result<(), MediaError> {
        if (0..self.mirrors.len()).any(|i| self.healthy(i)) {
            Ok(())
        } else {
            Err(MediaError::Failed("every mirror has failed".into()))
        }
    }
}
