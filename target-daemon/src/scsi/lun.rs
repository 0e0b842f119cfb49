//! The file operations unit: one logical unit over a [`BlockStore`], with the state SCSI
//! keeps per LUN (mode parameters, medium presence, removal prevention).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use super::pr::Reservations;
use super::target::LunSpec;
use super::xcopy::CopyResults;
use crate::media::BlockStore;

/// Largest transfer one command may ask for, advertised in the Block Limits VPD page.
pub(crate) const TRANSFER_BYTES_MAX: u64 = 32 << 20;

/// Mutable per-LUN state.
#[derive(Default)]
pub(crate) struct LunState {
    /// Control mode page D_SENSE: sense data in descriptor format.
    pub(crate) d_sense: bool,
    /// Control mode page SWP: software write protect, set by MODE SELECT.
    pub(crate) swp: bool,
    /// Removable medium ejected (START STOP UNIT with LOEJ).
    pub(crate) ejected: bool,
    /// Nexuses that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT set.
    pub(crate) prevent: HashSet<u64>,
}

/// One logical unit.
pub(crate) struct Lun {
    pub(crate) number: u64,
    pub(crate) store: Arc<dyn BlockStore>,
    pub(crate) read_only: bool,
    pub(crate) removable: bool,
    /// See [`LunSpec::physical_block_size`].
    physical_block_size: Option<u32>,
    /// LUN masking: the initiator names that see it; `None`: everyone.
    initiators: Option<Vec<Arc<str>>>,
    /// Unit serial number (VPD 0x80), stable across restarts.
    pub(crate) serial: String,
    /// NAA locally assigned identifier (VPD 0x83), stable across restarts.
    pub(crate) naa: [u8; 8],
    state: Mutex<LunState>,
    /// Persistent and SPC-2 reservations.
    pub(crate) reservations: Reservations,
    /// EXTENDED COPY results held for RECEIVE COPY RESULTS.
    pub(crate) copies: CopyResults,
    /// Media access order: the read-modify-write commands (COMPARE AND WRITE, ORWRITE,
    /// WRITE ATOMIC) hold it exclusively, every other read or write of the medium holds
    /// it shared, so nothing slips between their read and their write.
    media: RwLock<()>,
    /// Commands, bytes and latency by kind, for the metrics endpoint.
    pub(crate) metrics: crate::counters::LunMetrics,
}

/// FNV-1a: a stable hash (std's hasher is randomly seeded per process).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Lun {
    pub(crate) fn new(iqn: &str, spec: LunSpec) -> Self {
        let h = fnv1a(format!("{}/{}", iqn.to_ascii_lowercase(), spec.lun).as_bytes());
        // NAA 3 (locally assigned): the top nibble says so, 60 bits are ours.
        let naa = ((3u64 << 60) | (h & 0x0fff_ffff_ffff_ffff)).to_be_bytes();
        Self {
            number: spec.lun,
            store: spec.store,
            read_only: spec.read_only,
            removable: spec.removable,
            physical_block_size: spec.physical_block_size,
            initiators: spec
                .initiators
                .map(|v| v.into_iter().map(Arc::from).collect()),
            serial: format!("{h:016x}"),
            naa,
            state: Mutex::new(LunState::default()),
            reservations: Reservations::default(),
            copies: CopyResults::default(),
            media: RwLock::new(()),
            metrics: crate::counters::LunMetrics::default(),
        }
    }

    /// Whether LUN masking lets `initiator` see this LUN (names compare without case,
    /// as iSCSI names are normalized lower case).
    pub(crate) fn visible_to(&self, initiator: &str) -> bool {
        self.initiators
            .as_ref()
            .is_none_or(|v| v.iter().any(|n| n.eq_ignore_ascii_case(initiator)))
    }

    /// The masking list as configured; `None`: every initiator sees it.
    pub(crate) fn initiator_names(&self) -> Option<Vec<String>> {
        self.initiators
            .as_ref()
            .map(|v| v.iter().map(|n| n.to_string()).collect())
    }

    /// Shared media access: ordinary reads and writes run concurrently.
    pub(crate) fn media_shared(&self) -> RwLockReadGuard<'_, ()> {
        // The lock guards no data, so a panic while holding it leaves nothing torn.
        self.media
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`media_shared`](Self::media_shared) for a READ or WRITE, which may run inline
    /// ([`crate::media::inline`]): there it does not wait behind a command holding the
    /// lock exclusively (a COMPARE AND WRITE reading the mirrors) but refuses, and runs
    /// again on a blocking thread. `None` when refused.
    pub(crate) fn media_shared_or_refuse(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.media.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if crate::media::inline::refuse() => None,
            Err(TryLockError::WouldBlock) => Some(self.media_shared()),
        }
    }

    /// Exclusive media access, for a command that must read and write as one step.
    pub(crate) fn media_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.media
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LunState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn descriptor_sense(&self) -> bool {
        self.state().d_sense
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.store.block_size()
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.store.num_blocks()
    }

    /// Logical blocks per physical block as READ CAPACITY (16) carries it (LOGICAL BLOCKS
    /// PER PHYSICAL BLOCK EXPONENT, 4 bits). The configuration checks the physical block
    /// is a power-of-two multiple of the logical one; anything else reads as 0 rather
    /// than a physical block the medium does not have.
    pub(crate) fn physical_exponent(&self) -> u8 {
        let ratio = self.physical_block_size.unwrap_or(0) / self.block_size().max(1);
        if ratio.is_power_of_two() && ratio.trailing_zeros() <= 15 {
            ratio.trailing_zeros() as u8
        } else {
            0
        }
    }

    /// Most blocks one command may transfer.
    pub(crate) fn transfer_blocks_max(&self) -> u32 {
        (TRANSFER_BYTES_MAX / u64::from(self.block_size())) as u32
    }

    pub(crate) fn nexus_removed(&self, nexus: u64) {
        self.state().prevent.remove(&nexus);
        self.reservations.nexus_removed(nexus);
        self.copies.nexus_removed(nexus);
    }

    /// Writes are refused: a read-only LUN, or software write protect (SWP) set.
    pub(crate) fn write_protected(&self) -> bool {
        self.read_only || self.state().swp
    }

    /// LUN reset: mode parameters and removal prevention return to their defaults
    /// (SPC-4 7.5: mode pages without saved values revert).
    pub(crate) fn reset(&self) {
        let mut s = self.state();
        s.d_sense = false;
        s.swp = false;
        s.prevent.clear();
        self.reservations.reset();
    }
}
