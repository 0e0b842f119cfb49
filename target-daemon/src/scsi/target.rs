//! The SCSI target device: its LUNs, unit attentions per I_T nexus, and the dispatch of
//! each CDB to the command that executes it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use ftss_proto::cdb::op;
use ftss_proto::sense::{common, Sense};

use super::command::{Ctx, Reply};
use super::commands::{commands, SA_IN_BYTE_1};
use super::lun::Lun;
use super::pr::PrStore;
use super::{block_io, pr, spc, ItNexus, ScsiCommand, ScsiOutcome};
pub use crate::link_unit::VendorHandler;
use crate::link_unit::{LinkUnit, Routed};
use crate::media::mirror::MirrorSet;
use crate::media::BlockStore;

/// SCSI status codes.
pub use ftss_proto::sense::status;

/// Errors building a target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScsiError {
    /// Two LUNs with one number.
    #[error("LUN {0} configured twice")]
    DuplicateLun(u64),
    /// The LUN does not exist.
    #[error("LUN {0} does not exist")]
    NoSuchLun(u64),
    /// The LUN's store could not grow.
    #[error("LUN {lun}: cannot grow: {msg}")]
    Resize {
        /// The LUN.
        lun: u64,
        /// Why.
        msg: String,
    },
    /// Saved persistent reservation state could not be loaded.
    #[error("LUN {lun}: persistent reservations: {msg}")]
    Reservations {
        /// The LUN.
        lun: u64,
        /// What went wrong.
        msg: String,
    },
}

/// One LUN as the configuration gives it.
pub struct LunSpec {
    /// LUN number.
    pub lun: u64,
    /// Its storage.
    pub store: Arc<dyn BlockStore>,
    /// Write-protected.
    pub read_only: bool,
    /// Removable medium.
    pub removable: bool,
    /// LUN masking: the initiator names that see it; `None`: everyone.
    pub initiators: Option<Vec<String>>,
    /// Bytes per physical block, a power-of-two multiple of the logical block that READ
    /// CAPACITY (16) reports (`target.lun.physical_block_size`); `None`: the logical
    /// block.
    pub physical_block_size: Option<u32>,
}

/// Identity of the target device, for the device identification VPD page.
pub struct TargetIdentity {
    /// The iSCSI target name.
    pub iqn: String,
}

/// Held by every task an abort is waiting for, until that task has ended: the aborting
/// side waits until all its clones are gone, so a task signals its end just by dropping
/// its clone, even when it ends by unwinding or with its connection.
#[derive(Clone, Debug)]
pub struct AbortWait {
    /// Never sent on: only the drop of the last clone matters.
    _held: std::sync::mpsc::Sender<()>,
}

#[cfg(test)]
impl AbortWait {
    /// A wait as [`ScsiTarget`] makes one for an abort, with the receiver that reports
    /// (disconnected) once every clone is gone: for transport tests.
    pub(crate) fn for_tests() -> (Self, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (AbortWait { _held: tx }, rx)
    }
}

/// The transport side of one I_T nexus, through which the SCSI layer aborts that nexus's
/// tasks (PREEMPT AND ABORT from another nexus, SPC-4 5.15.11.2.6).
pub trait TaskAborter: Send + Sync {
    /// Aborts every task of the nexus for `lun`: tasks not yet handed to the device server
    /// end at once; running ones end when their execution returns. The transport keeps a
    /// clone of `wait` with each task until it has ended, then drops it.
    fn abort_lun_tasks(&self, lun: u64, wait: AbortWait);
}

/// A SCSI target device with its logical units.
pub struct ScsiTarget {
    pub(crate) identity: TargetIdentity,
    /// The logical units by number; LUNs come and go at run time (admin, reload), so
    /// a command holds its LUN by `Arc` for as long as it runs.
    luns: RwLock<BTreeMap<u64, Arc<Lun>>>,
    /// Pending unit attentions per (nexus id, LUN), ticked by [`Self::ua_clock`].
    ua: Mutex<HashMap<(u64, u64), UaQueue>>,
    /// Ticks once per unit attention established: a command reports only those older than
    /// its arrival.
    ua_clock: AtomicU64,
    /// Nexuses known to the target.
    nexuses: Mutex<HashMap<u64, ItNexus>>,
    /// How to reach each nexus's transport to abort its tasks, by nexus id. Kept past
    /// the nexus's removal while commands it sent still execute.
    aborters: Mutex<HashMap<u64, NexusAborter>>,
    /// Splits each command between this target's LUNs and the routing agent.
    link: LinkUnit,
}

/// A nexus and the way to abort its tasks.
type NexusAborter = (ItNexus, Arc<dyn TaskAborter>);

/// Pending unit attentions of one nexus on one LUN, oldest first, with the clock tick
/// that established each.
type UaQueue = VecDeque<(Sense, u64)>;

/// CAPACITY DATA HAS CHANGED (SBC-3): READ CAPACITY answers differently now.
const CAPACITY_DATA_CHANGED: Sense = Sense::new(0x06, 0x2a, 0x09);

/// REPORTED LUNS DATA HAS CHANGED (SPC-4): the LUN inventory changed.
const REPORTED_LUNS_DATA_CHANGED: Sense = Sense::new(0x06, 0x3f, 0x0e);

/// Unit attentions kept per nexus and LUN; older ones are dropped past this.
const UA_QUEUE_MAX: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind these locks stays consistent across a panic (single-step updates).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ScsiTarget {
    /// A target with these LUNs.
    pub fn new(identity: TargetIdentity, luns: Vec<LunSpec>) -> Result<Self, ScsiError> {
        let mut map = BTreeMap::new();
        for l in luns {
            let n = l.lun;
            let lun = Lun::new(&identity.iqn, l);
            if map.insert(n, Arc::new(lun)).is_some() {
                return Err(ScsiError::DuplicateLun(n));
            }
        }
        Ok(Self {
            identity,
            luns: RwLock::new(map),
            ua: Mutex::new(HashMap::new()),
            ua_clock: AtomicU64::new(0),
            nexuses: Mutex::new(HashMap::new()),
            aborters: Mutex::new(HashMap::new()),
            link: LinkUnit::default(),
        })
    }

    /// Routes vendor opcodes (0xC0-0xFF) to `h`, the routing agent (see [`LinkUnit`]).
    pub fn set_vendor_handler(&self, h: Arc<dyn VendorHandler>) {
        self.link.attach_routing_agent(h);
    }

    /// Whether `lun` exists.
    pub fn lun_exists(&self, lun: u64) -> bool {
        self.luns_now().contains_key(&lun)
    }

    fn luns_now(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Lun>>> {
        // Only whole entries are inserted or removed under this lock.
        self.luns
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a LUN while the target serves (admin, reload): its APTPL reservations are
    /// kept in a file in `dir` named by its serial. Every nexus hears REPORTED LUNS DATA
    /// HAS CHANGED (3Fh/0Eh) on the LUNs it sees, so initiators rescan, and POWER ON
    /// on the new LUN as if it had just logged in.
    pub fn add_lun(&self, spec: LunSpec, dir: &std::path::Path) -> Result<(), ScsiError> {
        let n = spec.lun;
        let lun = Arc::new(Lun::new(&self.identity.iqn, spec));
        lun.reservations
            .attach(PrStore::File(dir.join(format!("pr-{}.state", lun.serial))))
            .map_err(|msg| ScsiError::Reservations { lun: n, msg })?;
        {
            let mut g = self
                .luns
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if g.contains_key(&n) {
                return Err(ScsiError::DuplicateLun(n));
            }
            g.insert(n, Arc::clone(&lun));
        }
        let nexuses: Vec<ItNexus> = lock(&self.nexuses).values().cloned().collect();
        for nx in nexuses {
            for other in self.lun_numbers_for(&nx) {
                if other == n {
                    self.queue_ua(nx.id, n, common::POWER_ON_RESET);
                } else {
                    self.queue_ua(nx.id, other, REPORTED_LUNS_DATA_CHANGED);
                }
            }
        }
        Ok(())
    }

    /// Removes a LUN while the target serves; commands already holding it finish on it.
    /// Every nexus hears REPORTED LUNS DATA HAS CHANGED on the LUNs it still sees.
    pub fn remove_lun(&self, n: u64) -> Result<(), ScsiError> {
        let gone = self
            .luns
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&n);
        if gone.is_none() {
            return Err(ScsiError::NoSuchLun(n));
        }
        lock(&self.ua).retain(|(_, l), _| *l != n);
        let nexuses: Vec<ItNexus> = lock(&self.nexuses).values().cloned().collect();
        for nx in nexuses {
            for other in self.lun_numbers_for(&nx) {
                self.queue_ua(nx.id, other, REPORTED_LUNS_DATA_CHANGED);
            }
        }
        Ok(())
    }

    /// Grows LUN `n` to `blocks` blocks; every nexus that sees it hears CAPACITY DATA
    /// HAS CHANGED (2Ah/09h) there.
    pub fn grow_lun(&self, n: u64, blocks: u64) -> Result<(), ScsiError> {
        let lun = self.lun(n).ok_or(ScsiError::NoSuchLun(n))?;
        lun.store.grow(blocks).map_err(|e| ScsiError::Resize {
            lun: n,
            msg: e.to_string(),
        })?;
        let nexuses: Vec<ItNexus> = lock(&self.nexuses).values().cloned().collect();
        for nx in nexuses.iter().filter(|x| lun.visible_to(&x.initiator_name)) {
            self.queue_ua(nx.id, n, CAPACITY_DATA_CHANGED);
        }
        Ok(())
    }

    /// Every LUN now, by number.
    pub(crate) fn luns(&self) -> Vec<Arc<Lun>> {
        self.luns_now().values().cloned().collect()
    }

    /// LUN `lun`, whoever asks.
    pub(crate) fn lun(&self, lun: u64) -> Option<Arc<Lun>> {
        self.luns_now().get(&lun).cloned()
    }

    /// The first LUN `f` selects.
    pub(crate) fn lun_where(&self, f: impl Fn(&Lun) -> bool) -> Option<Arc<Lun>> {
        self.luns_now().values().find(|l| f(l)).cloned()
    }

    /// Keeps each LUN's persistent reservations while APTPL is set, loading what an
    /// earlier run saved: a LUN found in `mirrored` (by LUN number) keeps them in the
    /// metadata area of that mirror set, with the same redundancy as its data; any other
    /// LUN in a file in `dir` named by its serial number. Without this call APTPL is
    /// refused (REPORT CAPABILITIES clears PTPL_C).
    pub fn persist_reservations(
        &self,
        dir: &std::path::Path,
        mirrored: &HashMap<u64, Arc<MirrorSet>>,
    ) -> Result<(), ScsiError> {
        for l in self.luns() {
            let store = match mirrored.get(&l.number) {
                Some(set) => PrStore::Mirror(Arc::clone(set)),
                None => PrStore::File(dir.join(format!("pr-{}.state", l.serial))),
            };
            l.reservations
                .attach(store)
                .map_err(|msg| ScsiError::Reservations { lun: l.number, msg })?;
        }
        Ok(())
    }

    /// Ids of the current nexuses `f` selects (reservation unit attentions go to every
    /// nexus of a registered initiator port).
    pub(crate) fn nexuses_where(&self, f: impl Fn(&ItNexus) -> bool) -> Vec<u64> {
        lock(&self.nexuses)
            .values()
            .filter(|n| f(n))
            .map(|n| n.id)
            .collect()
    }

    /// A new I_T nexus: it starts with a power-on unit attention on every LUN.
    pub fn nexus_added(&self, nexus: &ItNexus) {
        self.link.nexus_added(nexus);
        lock(&self.nexuses).insert(nexus.id, nexus.clone());
        let numbers: Vec<u64> = self.luns_now().keys().copied().collect();
        for l in numbers {
            lock(&self.ua).remove(&(nexus.id, l));
            self.queue_ua(nexus.id, l, common::POWER_ON_RESET);
        }
    }

    /// Registers how to abort `nexus`'s tasks (its connection). It outlives
    /// [`Self::nexus_removed`] on purpose: commands of a closed connection may still be
    /// executing, and an abort must wait for them too. The transport removes it with
    /// [`Self::remove_task_aborter`] once they have ended.
    pub fn set_task_aborter(&self, nexus: &ItNexus, aborter: Arc<dyn TaskAborter>) {
        lock(&self.aborters).insert(nexus.id, (nexus.clone(), aborter));
    }

    /// Nothing of `nexus` is left to abort.
    pub fn remove_task_aborter(&self, nexus: u64) {
        lock(&self.aborters).remove(&nexus);
    }

    /// Aborts the tasks for `lun` of every nexus `pick` selects, live or closed with
    /// commands still executing, and waits, at most `timeout`, until each of them has
    /// ended. Returns how many nexuses were asked and whether all their tasks ended in
    /// time.
    pub(crate) fn abort_tasks(
        &self,
        pick: impl Fn(&ItNexus) -> bool,
        lun: u64,
        timeout: Duration,
    ) -> (usize, bool) {
        let aborters: Vec<_> = lock(&self.aborters)
            .values()
            .filter(|(n, _)| pick(n))
            .map(|(_, a)| Arc::clone(a))
            .collect();
        let asked = aborters.len();
        let (tx, rx) = std::sync::mpsc::channel();
        for a in aborters {
            a.abort_lun_tasks(lun, AbortWait { _held: tx.clone() });
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                // Nothing sends; tolerate it anyway.
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return (asked, true),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return (asked, false),
            }
        }
    }

    /// The nexus is gone.
    pub fn nexus_removed(&self, nexus: &ItNexus) {
        self.link.nexus_removed(nexus);
        lock(&self.nexuses).remove(&nexus.id);
        lock(&self.ua).retain(|(n, _), _| *n != nexus.id);
        for l in self.luns() {
            l.nexus_removed(nexus.id);
        }
    }

    /// LUN `lun` as `nexus` sees it: masked LUNs do not exist for other initiators.
    pub(crate) fn lun_for(&self, nexus: &ItNexus, lun: u64) -> Option<Arc<Lun>> {
        self.lun(lun)
            .filter(|l| l.visible_to(&nexus.initiator_name))
    }

    /// LUN numbers `nexus` sees, ascending.
    pub(crate) fn lun_numbers_for(&self, nexus: &ItNexus) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .luns_now()
            .values()
            .filter(|l| l.visible_to(&nexus.initiator_name))
            .map(|l| l.number)
            .collect();
        v.sort_unstable();
        v
    }

    /// LOGICAL UNIT RESET: every nexus, the requester's included, sees BUS DEVICE RESET
    /// FUNCTION OCCURRED (SAM-4 6.6).
    pub fn lun_reset(&self, nexus: &ItNexus, lun: u64) -> Result<(), ScsiError> {
        let l = self.lun_for(nexus, lun).ok_or(ScsiError::NoSuchLun(lun))?;
        l.reset();
        let all: Vec<u64> = lock(&self.nexuses).keys().copied().collect();
        for n in all {
            self.queue_ua(n, lun, Sense::new(0x06, 0x29, 0x03));
        }
        Ok(())
    }

    /// TARGET WARM/COLD RESET: every nexus sees a reset unit attention on every LUN:
    /// TARGET RESET (29h/02h), or POWER ON (29h/01h) for a cold reset (SAM-4 6.7).
    pub fn target_reset(&self, _nexus: &ItNexus, cold: bool) {
        let sense = if cold {
            Sense::new(0x06, 0x29, 0x01)
        } else {
            Sense::new(0x06, 0x29, 0x02)
        };
        let all: Vec<u64> = lock(&self.nexuses).keys().copied().collect();
        let luns = self.luns();
        for l in &luns {
            l.reset();
        }
        for n in all {
            for lun in luns.iter().map(|l| l.number) {
                self.queue_ua(n, lun, sense);
            }
        }
    }

    pub(crate) fn queue_ua(&self, nexus: u64, lun: u64, s: Sense) {
        let mut ua = lock(&self.ua);
        let q = ua.entry((nexus, lun)).or_default();
        if !q.iter().any(|(p, _)| *p == s) {
            if q.len() == UA_QUEUE_MAX {
                q.pop_front();
            }
            // Ticked under the lock, so each queue stays in clock order.
            let tick = self.ua_clock.fetch_add(1, Ordering::SeqCst) + 1;
            q.push_back((s, tick));
        }
    }

    /// The unit attention clock now: what the transport records when a command arrives
    /// (is delivered in CmdSN order) and later gives to [`Self::execute_arrived`]. SAM-5
    /// reports a unit attention to commands received after it was established; a write
    /// that waits for its data meanwhile must not take it (the next command does).
    pub fn arrival(&self) -> u64 {
        self.ua_clock.load(Ordering::SeqCst)
    }

    /// Unit attention for every nexus but `except` on `lun` (e.g. mode parameters changed).
    pub(crate) fn ua_others(&self, except: u64, lun: u64, s: Sense) {
        let all: Vec<u64> = lock(&self.nexuses)
            .keys()
            .copied()
            .filter(|&n| n != except)
            .collect();
        for n in all {
            self.queue_ua(n, lun, s);
        }
    }

    /// The oldest unit attention pending for `nexus` on `lun` that a command which
    /// arrived at clock `arrived` may report, now reported (cleared).
    pub(crate) fn take_ua(&self, nexus: u64, lun: u64, arrived: u64) -> Option<Sense> {
        let mut ua = lock(&self.ua);
        let q = ua.get_mut(&(nexus, lun))?;
        match q.front() {
            Some(&(_, tick)) if tick <= arrived => q.pop_front().map(|(s, _)| s),
            _ => None,
        }
    }

    fn fail(&self, lun: Option<&Lun>, s: Sense) -> ScsiOutcome {
        let desc = lun.is_some_and(Lun::descriptor_sense);
        ScsiOutcome {
            status: status::CHECK_CONDITION,
            sense: Some(s.encode(desc)),
            ..ScsiOutcome::default()
        }
    }

    /// Whether the command may run on the connection's async worker rather than a
    /// blocking thread (see [`crate::media::inline::run_inline`]): on a LUN whose writes
    /// are copies into the write cache, a plain WRITE of at most `INLINE_BYTES_MAX`, or a
    /// SYNCHRONIZE CACHE, which there only notes the commit to wait for (the wait itself
    /// is asynchronous); on a LUN whose reads come from memory or are refused, a READ of
    /// at most `INLINE_BYTES_MAX`. A database's write-then-flush, or a small read from
    /// memory, pays a thread handoff per command otherwise, which at queue depth 1 is most
    /// of what ftss adds. Whatever would wait inside the command (a full ring, a block
    /// not in the page cache, a lock held) refuses, and the command runs again on a
    /// blocking thread. The bound keeps a large copy off the worker that serves the
    /// connection's other commands.
    pub fn runs_inline(&self, lun: u64, cdb: &[u8], data_len: usize) -> bool {
        const INLINE_BYTES_MAX: u64 = 128 << 10;
        match cdb.first() {
            Some(&(op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16)) => {
                data_len as u64 <= INLINE_BYTES_MAX
                    && self.lun(lun).is_some_and(|l| l.store.writes_in_memory())
            }
            Some(&(op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16)) => {
                data_len == 0 && self.lun(lun).is_some_and(|l| l.store.writes_in_memory())
            }
            Some(&(op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16)) => {
                // A CDB that does not decode runs on the ordinary path, which answers it.
                let Ok(r) = ftss_proto::cdb::block_range(cdb) else {
                    return false;
                };
                data_len == 0
                    && self.lun(lun).is_some_and(|l| {
                        l.store.reads_in_memory()
                            && u64::from(r.blocks) * u64::from(l.block_size()) <= INLINE_BYTES_MAX
                    })
            }
            _ => false,
        }
    }

    /// Counts a command of `lun` that ran inline ([`Self::runs_inline`]): `served` when it
    /// completed there, else refused and run again on a blocking thread. What the command
    /// itself did is counted once, when its response goes out
    /// ([`Self::record_completion`]).
    pub fn record_inline(&self, lun: u64, cdb: &[u8], served: bool) {
        let (Some(&opcode), Some(l)) = (cdb.first(), self.lun(lun)) else {
            return;
        };
        l.metrics
            .record_inline(crate::counters::OpKind::of(opcode), served);
    }

    /// The outcome of a command whose writes did not commit (see
    /// [`crate::media::cache::defer_commits`]): it must not report GOOD.
    pub fn commit_failed(&self, lun: u64, e: crate::media::MediaError) -> ScsiOutcome {
        self.fail(self.lun(lun).as_deref(), super::command::media(e, true))
    }

    /// Counts a command of `lun` whose response went out `latency` after it arrived,
    /// having moved `bytes` of data, in that LUN's metrics. Vendor (packet) commands and
    /// unknown LUNs are not counted: the routing agent keeps its own figures.
    pub fn record_completion(&self, lun: u64, cdb: &[u8], bytes: u64, latency: Duration) {
        let Some(&opcode) = cdb.first() else {
            return;
        };
        if crate::link_unit::unit_for(opcode) == crate::link_unit::Unit::RoutingAgent {
            return;
        }
        if let Some(l) = self.lun(lun) {
            l.metrics
                .record(crate::counters::OpKind::of(opcode), bytes, latency);
        }
    }

    /// Executes one command that arrives now. Blocking; many may run at once.
    pub fn execute(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> ScsiOutcome {
        self.execute_arrived(nexus, cmd, u64::MAX)
    }

    /// Executes one command that arrived when [`Self::arrival`] said `arrived`: unit
    /// attentions established since are left for later commands. Blocking.
    pub fn execute_arrived(
        &self,
        nexus: &ItNexus,
        cmd: &ScsiCommand<'_>,
        arrived: u64,
    ) -> ScsiOutcome {
        let Some(&opcode) = cmd.cdb.first() else {
            return self.fail(None, common::INVALID_OPCODE);
        };
        match self.link.route(nexus, cmd) {
            Routed::FileOperations => {}
            Routed::RoutingAgent(o) => return o,
            Routed::NoRoutingAgent => {
                return self.fail(self.lun(cmd.lun).as_deref(), common::INVALID_OPCODE)
            }
        }
        let Some(held) = self.lun_for(nexus, cmd.lun) else {
            return match opcode {
                op::INQUIRY => match spc::inquiry_no_lun(cmd) {
                    Ok(r) => outcome(r),
                    Err(s) => self.fail(None, s),
                },
                op::REPORT_LUNS => match spc::report_luns(self, nexus, cmd) {
                    Ok(r) => outcome(r),
                    Err(s) => self.fail(None, s),
                },
                op::REQUEST_SENSE => {
                    match spc::request_sense(None, cmd, Some(common::LUN_NOT_SUPPORTED)) {
                        Ok(r) => outcome(r),
                        Err(s) => self.fail(None, s),
                    }
                }
                _ => self.fail(None, common::LUN_NOT_SUPPORTED),
            };
        };
        let lun: &Lun = &held;
        let Some(entry) = commands().find(|c| c.matches(cmd.cdb)) else {
            // An unsupported service action of a supported command is an invalid CDB
            // field (SPC-4); limited to the reservation and copy commands so the others
            // keep answering as before.
            if SA_IN_BYTE_1.contains(&opcode) {
                let s = common::INVALID_FIELD_IN_CDB.cdb_field(1, Some(4));
                return self.fail(Some(lun), s);
            }
            return self.fail(Some(lun), common::INVALID_OPCODE);
        };
        if cmd.cdb.len() < usize::from(entry.cdb_len) {
            return self.fail(Some(lun), common::INVALID_FIELD_IN_CDB.cdb_field(0, None));
        }
        // NACA and the obsolete LINK bit: no ACA support (SAM-5 5.9).
        let control = cmd.cdb[usize::from(entry.cdb_len) - 1];
        if control & 0x05 != 0 {
            let bit = if control & 0x04 != 0 { 2 } else { 0 };
            return self.fail(
                Some(lun),
                common::INVALID_FIELD_IN_CDB.cdb_field(u16::from(entry.cdb_len) - 1, Some(bit)),
            );
        }
        if !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) {
            if let Some(ua) = self.take_ua(nexus.id, cmd.lun, arrived) {
                return self.fail(Some(lun), ua);
            }
        }
        if !pr::admits(lun, nexus, cmd.cdb) {
            return ScsiOutcome {
                status: status::RESERVATION_CONFLICT,
                data_out_len: block_io::data_out_len(lun, cmd.cdb),
                ..ScsiOutcome::default()
            };
        }
        let ctx = Ctx {
            target: self,
            nexus,
            lun,
            cmd,
            arrived,
        };
        match (entry.run)(&ctx) {
            Ok(r) => outcome(r),
            Err(s) => {
                let mut o = self.fail(Some(lun), s);
                o.data_out_len = block_io::data_out_len(lun, cmd.cdb);
                o
            }
        }
    }
}

fn outcome(r: Reply) -> ScsiOutcome {
    ScsiOutcome {
        status: r.status,
        sense: None,
        data_in: r.data,
        data_out_len: r.data_out_len,
        ..ScsiOutcome::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Ends its "task" on a thread of its own, flagging the end just before it lets go
    /// of the wait.
    struct EndsLater(Arc<AtomicBool>);

    impl TaskAborter for EndsLater {
        fn abort_lun_tasks(&self, _lun: u64, wait: AbortWait) {
            let ended = Arc::clone(&self.0);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                ended.store(true, Ordering::SeqCst);
                drop(wait);
            });
        }
    }

    /// Never lets go of the wait: a task stuck in its backing store.
    struct Stuck(Mutex<Vec<AbortWait>>);

    impl TaskAborter for Stuck {
        fn abort_lun_tasks(&self, _lun: u64, wait: AbortWait) {
            lock(&self.0).push(wait);
        }
    }

    fn target() -> ScsiTarget {
        let id = TargetIdentity {
            iqn: "iqn.2026-11.org.ftss:t".into(),
        };
        ScsiTarget::new(id, Vec::new()).expect("target")
    }

    #[test]
    fn a_lun_added_at_run_time_is_reported_with_a_unit_attention() {
        let dir = std::env::temp_dir().join(format!("ftss-addlun-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let spec = |lun: u64| LunSpec {
            lun,
            store: Arc::new(
                crate::media::file::FileStore::open(&dir.join(format!("{lun}.img")), 64 * 512, 512)
                    .expect("store"),
            ),
            read_only: false,
            removable: false,
            initiators: None,
            physical_block_size: None,
        };
        let t = ScsiTarget::new(
            TargetIdentity {
                iqn: "iqn.2026-11.org.ftss:t".into(),
            },
            vec![spec(0)],
        )
        .expect("target");
        let a = ItNexus {
            id: 1,
            initiator_name: Arc::from("iqn.2026-11.org.ftss:a"),
            isid: [0x40, 0, 0, 0, 0, 1],
            tpgt: 1,
        };
        t.nexus_added(&a);
        let run = |lun: u64, cdb: &[u8], len: u32| {
            t.execute(
                &a,
                &ScsiCommand {
                    lun,
                    cdb,
                    data_out: &[],
                    expected_len: len,
                    attr: crate::scsi::TaskAttr::Simple,
                    resume_until: None,
                },
            )
        };
        let tur = [0u8; 6];
        let asc = |o: &ScsiOutcome| o.sense.as_ref().map(|s| (s[2] & 0x0f, s[12], s[13]));
        assert_eq!(
            asc(&run(0, &tur, 0)),
            Some((6, 0x29, 0x00)),
            "power on first"
        );
        assert_eq!(run(0, &tur, 0).status, status::GOOD);
        t.add_lun(spec(5), &dir).expect("LUN 5 added");
        assert!(matches!(
            t.add_lun(spec(5), &dir),
            Err(ScsiError::DuplicateLun(5))
        ));
        assert_eq!(
            asc(&run(0, &tur, 0)),
            Some((6, 0x3f, 0x0e)),
            "inventory changed"
        );
        let report = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let o = run(0, &report, 256);
        assert_eq!(o.status, status::GOOD);
        assert_eq!(&o.data_in[0..4], &[0, 0, 0, 16], "two LUNs");
        assert_eq!(o.data_in[8 + 8 + 1], 5, "LUN 5 listed");
        assert_eq!(asc(&run(5, &tur, 0)), Some((6, 0x29, 0x00)));
        assert_eq!(run(5, &tur, 0).status, status::GOOD);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_masked_lun_does_not_exist_for_other_initiators() {
        let dir = std::env::temp_dir().join(format!("ftss-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let spec = |lun: u64, initiators: Option<Vec<String>>| LunSpec {
            lun,
            store: Arc::new(
                crate::media::file::FileStore::open(&dir.join(format!("{lun}.img")), 64 * 512, 512)
                    .expect("store"),
            ),
            read_only: false,
            removable: false,
            initiators,
            physical_block_size: None,
        };
        let t = ScsiTarget::new(
            TargetIdentity {
                iqn: "iqn.2026-11.org.ftss:t".into(),
            },
            vec![
                spec(0, None),
                spec(1, Some(vec!["IQN.2026-11.org.ftss:A".into()])),
            ],
        )
        .expect("target");
        let nexus = |id: u64, name: &str| ItNexus {
            id,
            initiator_name: Arc::from(name),
            isid: [0x40, 0, 0, 0, 0, id as u8],
            tpgt: 1,
        };
        let (a, b) = (
            nexus(1, "iqn.2026-11.org.ftss:a"),
            nexus(2, "iqn.2026-11.org.ftss:b"),
        );
        let run = |n: &ItNexus, lun: u64, cdb: &[u8], len: u32| {
            t.execute(
                n,
                &ScsiCommand {
                    lun,
                    cdb,
                    data_out: &[],
                    expected_len: len,
                    attr: crate::scsi::TaskAttr::Simple,
                    resume_until: None,
                },
            )
        };
        let report = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let luns = |n: &ItNexus| {
            let o = run(n, 0, &report, 256);
            assert_eq!(o.status, status::GOOD);
            let len = u32::from_be_bytes([o.data_in[0], o.data_in[1], o.data_in[2], o.data_in[3]]);
            len / 8
        };
        assert_eq!(luns(&a), 2, "A sees LUN 0 and its LUN 1");
        assert_eq!(luns(&b), 1, "B sees LUN 0 only");
        // B: LUN 1 answers as a LUN that does not exist, for every command.
        let inquiry = [0x12, 0, 0, 0, 96, 0];
        assert_eq!(run(&b, 1, &inquiry, 96).data_in[0], 0x7f);
        assert_eq!(run(&a, 1, &inquiry, 96).data_in[0], 0x00);
        let read_capacity = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let o = run(&b, 1, &read_capacity, 8);
        assert_eq!(o.status, status::CHECK_CONDITION);
        let sense = o.sense.expect("sense");
        assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x05, 0x25, 0x00));
        assert!(matches!(t.lun_reset(&b, 1), Err(ScsiError::NoSuchLun(1))));
        assert!(t.lun_reset(&a, 1).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn abort_waits_for_every_task_and_gives_up_after_the_timeout() {
        let t = target();
        let nexus = |id: u64| ItNexus {
            id,
            initiator_name: Arc::from("iqn.2026-11.org.ftss:i"),
            isid: [0x40, 0, 0, 0, 0, id as u8],
            tpgt: 1,
        };
        let ended = Arc::new(AtomicBool::new(false));
        t.set_task_aborter(&nexus(1), Arc::new(EndsLater(Arc::clone(&ended))));
        t.set_task_aborter(&nexus(2), Arc::new(Stuck(Mutex::new(Vec::new()))));
        let secs = Duration::from_secs(5);
        assert_eq!(t.abort_tasks(|n| n.id == 7, 0, secs), (0, true), "nobody");
        assert_eq!(t.abort_tasks(|n| n.id == 1, 0, secs), (1, true));
        assert!(
            ended.load(Ordering::SeqCst),
            "returned before the task ended"
        );
        let short = Duration::from_millis(100);
        assert_eq!(t.abort_tasks(|_| true, 0, short), (2, false), "stuck");
        t.remove_task_aborter(2);
        // The stuck one is gone; the other ends after its 50 ms, which a loaded machine
        // may stretch past `short`: give it the long timeout.
        assert_eq!(t.abort_tasks(|_| true, 0, secs), (1, true));
    }

    #[test]
    fn a_unit_attention_waits_for_commands_that_arrive_after_it() {
        let t = target();
        let before = t.arrival();
        t.queue_ua(1, 0, common::POWER_ON_RESET);
        assert_eq!(t.take_ua(1, 0, before), None, "older command");
        let after = t.arrival();
        assert_eq!(t.take_ua(1, 0, after), Some(common::POWER_ON_RESET));
        assert_eq!(t.take_ua(1, 0, u64::MAX), None, "reported once");
    }
}
