//! The SCSI target device: its LUNs, unit attentions per I_T nexus, and the dispatch of
//! each CDB to the command that executes it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use ftss_proto::cdb::op;
use ftss_proto::sense::{common, Sense};

use super::lun::Lun;
use super::pr::PrStore;
use super::{defect, pr, sbc, spc, xcopy, ItNexus, ScsiCommand, ScsiOutcome};
use crate::media::mirror::MirrorSet;
use crate::media::BlockStore;

/// SCSI status codes.
pub mod status {
    #![allow(missing_docs)]
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

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
}

/// Identity of the target device, for the device identification VPD page.
pub struct TargetIdentity {
    /// The iSCSI target name.
    pub iqn: String,
}

/// Handles vendor-specific opcodes (0xC0-0xFF): the link unit sends them here instead
/// of to the LUN.
pub trait VendorHandler: Send + Sync {
    /// Executes a vendor command.
    fn execute(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> ScsiOutcome;

    /// A session logged in.
    fn nexus_added(&self, _nexus: &ItNexus) {}

    /// A session ended.
    fn nexus_removed(&self, _nexus: &ItNexus) {}
}

/// What a command returns before the transport sees it.
pub(crate) struct Reply {
    pub(crate) status: u8,
    pub(crate) data: Vec<u8>,
    pub(crate) data_out_len: Option<u32>,
}

impl Reply {
    pub(crate) fn good(data: Vec<u8>) -> Self {
        Reply {
            status: status::GOOD,
            data,
            data_out_len: None,
        }
    }
    pub(crate) fn none() -> Self {
        Self::good(Vec::new())
    }
}

pub(crate) type CmdResult = Result<Reply, Sense>;

/// Context one command runs with.
pub(crate) struct Ctx<'a> {
    pub(crate) target: &'a ScsiTarget,
    pub(crate) nexus: &'a ItNexus,
    pub(crate) lun: &'a Lun,
    pub(crate) cmd: &'a ScsiCommand<'a>,
}

/// A SCSI target device with its logical units.
pub struct ScsiTarget {
    pub(crate) identity: TargetIdentity,
    pub(crate) luns: BTreeMap<u64, Lun>,
    /// Pending unit attentions per (nexus id, LUN), oldest first.
    ua: Mutex<HashMap<(u64, u64), VecDeque<Sense>>>,
    /// Nexuses known to the target.
    nexuses: Mutex<HashMap<u64, ItNexus>>,
    vendor: Mutex<Option<Arc<dyn VendorHandler>>>,
}

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
            if map.insert(n, lun).is_some() {
                return Err(ScsiError::DuplicateLun(n));
            }
        }
        Ok(Self {
            identity,
            luns: map,
            ua: Mutex::new(HashMap::new()),
            nexuses: Mutex::new(HashMap::new()),
            vendor: Mutex::new(None),
        })
    }

    /// Routes vendor opcodes (0xC0-0xFF) to `h` (the link unit's vendor side).
    pub fn set_vendor_handler(&self, h: Arc<dyn VendorHandler>) {
        *lock(&self.vendor) = Some(h);
    }

    /// Whether `lun` exists.
    pub fn lun_exists(&self, lun: u64) -> bool {
        self.luns.contains_key(&lun)
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
        for l in self.luns.values() {
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
        if let Some(h) = lock(&self.vendor).clone() {
            h.nexus_added(nexus);
        }
        lock(&self.nexuses).insert(nexus.id, nexus.clone());
        let mut ua = lock(&self.ua);
        for &l in self.luns.keys() {
            ua.insert((nexus.id, l), VecDeque::from([common::POWER_ON_RESET]));
        }
    }

    /// The nexus is gone.
    pub fn nexus_removed(&self, nexus: &ItNexus) {
        if let Some(h) = lock(&self.vendor).clone() {
            h.nexus_removed(nexus);
        }
        lock(&self.nexuses).remove(&nexus.id);
        lock(&self.ua).retain(|(n, _), _| *n != nexus.id);
        for l in self.luns.values() {
            l.nexus_removed(nexus.id);
        }
    }

    /// LOGICAL UNIT RESET: every nexus, the requester's included, sees BUS DEVICE RESET
    /// FUNCTION OCCURRED (SAM-4 6.6).
    pub fn lun_reset(&self, _nexus: &ItNexus, lun: u64) -> Result<(), ScsiError> {
        let l = self.luns.get(&lun).ok_or(ScsiError::NoSuchLun(lun))?;
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
        for l in self.luns.values() {
            l.reset();
        }
        for n in all {
            for &lun in self.luns.keys() {
                self.queue_ua(n, lun, sense);
            }
        }
    }

    pub(crate) fn queue_ua(&self, nexus: u64, lun: u64, s: Sense) {
        let mut ua = lock(&self.ua);
        let q = ua.entry((nexus, lun)).or_default();
        if !q.contains(&s) {
            if q.len() == UA_QUEUE_MAX {
                q.pop_front();
            }
            q.push_back(s);
        }
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

    pub(crate) fn take_ua(&self, nexus: u64, lun: u64) -> Option<Sense> {
        lock(&self.ua)
            .get_mut(&(nexus, lun))
            .and_then(VecDeque::pop_front)
    }

    fn fail(&self, lun: Option<&Lun>, s: Sense) -> ScsiOutcome {
        let desc = lun.is_some_and(Lun::descriptor_sense);
        ScsiOutcome {
            status: status::CHECK_CONDITION,
            sense: Some(s.encode(desc)),
            data_in: Vec::new(),
            data_out_len: None,
        }
    }

    /// The outcome of a command whose writes did not commit (see
    /// [`crate::media::cache::defer_commits`]): it must not report GOOD.
    pub fn commit_failed(&self, lun: u64, e: crate::media::MediaError) -> ScsiOutcome {
        self.fail(self.luns.get(&lun), super::sbc::media(e, true))
    }

    /// Executes one command. Blocking; many may run at once.
    pub fn execute(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> ScsiOutcome {
        let Some(&opcode) = cmd.cdb.first() else {
            return self.fail(None, common::INVALID_OPCODE);
        };
        if crate::link_unit::unit_for(opcode) == crate::link_unit::Unit::RoutingAgent {
            let h = lock(&self.vendor).clone();
            return match h {
                Some(h) => h.execute(nexus, cmd),
                None => self.fail(self.luns.get(&cmd.lun), common::INVALID_OPCODE),
            };
        }
        let Some(lun) = self.luns.get(&cmd.lun) else {
            return match opcode {
                op::INQUIRY => match spc::inquiry_no_lun(cmd) {
                    Ok(r) => outcome(r),
                    Err(s) => self.fail(None, s),
                },
                op::REPORT_LUNS => match spc::report_luns(self, cmd) {
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
            if let Some(ua) = self.take_ua(nexus.id, cmd.lun) {
                return self.fail(Some(lun), ua);
            }
        }
        if !pr::admits(lun, nexus, cmd.cdb) {
            return ScsiOutcome {
                status: status::RESERVATION_CONFLICT,
                data_out_len: sbc::data_out_len(lun, cmd.cdb),
                ..ScsiOutcome::default()
            };
        }
        let ctx = Ctx {
            target: self,
            nexus,
            lun,
            cmd,
        };
        match (entry.run)(&ctx) {
            Ok(r) => outcome(r),
            Err(s) => {
                let mut o = self.fail(Some(lun), s);
                o.data_out_len = sbc::data_out_len(lun, cmd.cdb);
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
    }
}

/// One supported command: how to recognise it, what REPORT SUPPORTED OPERATION CODES
/// says about it, and the function that runs it.
pub(crate) struct Command {
    pub(crate) opcode: u8,
    /// Service action (in byte 1, low 5 bits), for commands that have them.
    pub(crate) sa: Option<u8>,
    pub(crate) cdb_len: u8,
    /// CDB usage map: which bits of each byte the command looks at.
    pub(crate) usage: &'static [u8],
    pub(crate) run: fn(&Ctx<'_>) -> CmdResult,
}

impl Command {
    fn matches(&self, cdb: &[u8]) -> bool {
        cdb.first() == Some(&self.opcode)
            && self
                .sa
                .is_none_or(|sa| cdb.get(1).is_some_and(|b| b & 0x1f == sa))
    }
}

/// Every command this target executes: the table below, then the SBC-3 extensions kept
/// in their own module's table.
pub(crate) fn commands() -> impl Iterator<Item = &'static Command> {
    COMMANDS.iter().chain(super::sbc_ext::COMMANDS)
}

/// The SPC and basic SBC commands.
pub(crate) static COMMANDS: &[Command] = &[
    Command {
        opcode: op::TEST_UNIT_READY,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: spc::test_unit_ready,
    },
    Command {
        opcode: op::REQUEST_SENSE,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0, 0, 0xff, 0x04],
        run: spc::request_sense_cmd,
    },
    Command {
        opcode: op::READ_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x1f, 0xff, 0xff, 0xff, 0x04],
        run: sbc::read,
    },
    Command {
        opcode: op::WRITE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x1f, 0xff, 0xff, 0xff, 0x04],
        run: sbc::write,
    },
    Command {
        opcode: op::INQUIRY,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0xff, 0xff, 0xff, 0x04],
        run: spc::inquiry,
    },
    Command {
        opcode: op::MODE_SELECT_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x11, 0, 0, 0xff, 0x04],
        run: spc::mode_select,
    },
    Command {
        opcode: op::MODE_SENSE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x08, 0xff, 0xff, 0xff, 0x04],
        run: spc::mode_sense,
    },
    Command {
        opcode: op::START_STOP_UNIT,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0, 0x0f, 0xf7, 0x04],
        run: sbc::start_stop_unit,
    },
    Command {
        opcode: op::PREVENT_ALLOW,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0x03, 0x04],
        run: sbc::prevent_allow,
    },
    Command {
        opcode: op::READ_CAPACITY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04],
        run: sbc::read_capacity_10,
    },
    Command {
        opcode: op::READ_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::read,
    },
    Command {
        opcode: op::WRITE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::write_verify,
    },
    Command {
        opcode: op::VERIFY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::verify,
    },
    Command {
        opcode: op::PRE_FETCH_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::pre_fetch,
    },
    Command {
        opcode: op::SYNCHRONIZE_CACHE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x06, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: sbc::synchronize_cache,
    },
    Command {
        opcode: op::MODE_SELECT_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: spc::mode_select,
    },
    Command {
        opcode: op::MODE_SENSE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
        run: spc::mode_sense,
    },
    Command {
        opcode: op::READ_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::read,
    },
    Command {
        opcode: op::WRITE_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::write_verify,
    },
    Command {
        opcode: op::VERIFY_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::verify,
    },
    Command {
        opcode: op::PRE_FETCH_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::pre_fetch,
    },
    Command {
        opcode: op::SYNCHRONIZE_CACHE_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: sbc::synchronize_cache,
    },
    Command {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SA_READ_CAPACITY_16),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: sbc::read_capacity_16,
    },
    Command {
        opcode: op::REPORT_LUNS,
        sa: None,
        cdb_len: 12,
        usage: &[0xff, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: spc::report_luns_cmd,
    },
    Command {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::SA_REPORT_SUPPORTED_OPCODES),
        cdb_len: 12,
        usage: &[
            0xff, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: spc::report_supported_opcodes,
    },
    Command {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::SA_REPORT_SUPPORTED_TMFS),
        cdb_len: 12,
        usage: &[0xff, 0x1f, 0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: spc::report_supported_tmfs,
    },
    Command {
        opcode: op::READ_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: sbc::read,
    },
    Command {
        opcode: op::WRITE_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: sbc::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: sbc::write_verify,
    },
    Command {
        opcode: op::VERIFY_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: sbc::verify,
    },
    // ---- reservations (pr.rs), copy manager (xcopy.rs), defect data (defect.rs) ----
    Command {
        opcode: pr::op::RESERVE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: pr::reserve,
    },
    Command {
        opcode: pr::op::RELEASE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: pr::release,
    },
    Command {
        opcode: pr::op::RESERVE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x04],
        run: pr::reserve,
    },
    Command {
        opcode: pr::op::RELEASE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x04],
        run: pr::release,
    },
    pr_in(0x00),  // READ KEYS
    pr_in(0x01),  // READ RESERVATION
    pr_in(0x02),  // REPORT CAPABILITIES
    pr_in(0x03),  // READ FULL STATUS
    pr_out(0x00), // REGISTER
    pr_out(0x01), // RESERVE
    pr_out(0x02), // RELEASE
    pr_out(0x03), // CLEAR
    pr_out(0x04), // PREEMPT
    pr_out(0x05), // PREEMPT AND ABORT
    pr_out(0x06), // REGISTER AND IGNORE EXISTING KEY
    pr_out(0x07), // REGISTER AND MOVE
    Command {
        opcode: xcopy::op::EXTENDED_COPY,
        sa: Some(xcopy::op::SA_EXTENDED_COPY_LID1),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::extended_copy,
    },
    Command {
        opcode: xcopy::op::RECEIVE_COPY_RESULTS,
        sa: Some(xcopy::op::SA_COPY_STATUS),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0xff, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::receive_copy_results,
    },
    Command {
        opcode: xcopy::op::RECEIVE_COPY_RESULTS,
        sa: Some(xcopy::op::SA_OPERATING_PARAMETERS),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::receive_copy_results,
    },
    Command {
        opcode: defect::READ_DEFECT_DATA_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: defect::read_defect_data,
    },
    Command {
        opcode: defect::READ_DEFECT_DATA_12,
        sa: None,
        cdb_len: 12,
        usage: &[0xff, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: defect::read_defect_data,
    },
];

/// Commands whose service action field (byte 1, bits 4-0) selects among the table's
/// entries: an unlisted service action is an invalid CDB field, not an unknown opcode.
const SA_IN_BYTE_1: [u8; 5] = [
    pr::op::PERSISTENT_RESERVE_IN,
    pr::op::PERSISTENT_RESERVE_OUT,
    xcopy::op::EXTENDED_COPY,
    xcopy::op::RECEIVE_COPY_RESULTS,
    super::sbc_ext::SANITIZE,
];

/// PERSISTENT RESERVE IN with service action `sa`.
const fn pr_in(sa: u8) -> Command {
    Command {
        opcode: pr::op::PERSISTENT_RESERVE_IN,
        sa: Some(sa),
        cdb_len: 10,
        usage: &[0xff, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: pr::persistent_reserve_in,
    }
}

/// PERSISTENT RESERVE OUT with service action `sa`.
const fn pr_out(sa: u8) -> Command {
    Command {
        opcode: pr::op::PERSISTENT_RESERVE_OUT,
        sa: Some(sa),
        cdb_len: 10,
        usage: &[0xff, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
        run: pr::persistent_reserve_out,
    }
}
