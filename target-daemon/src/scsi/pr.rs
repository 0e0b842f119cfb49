//! Reservations (SPC-4 5.9 and 5.15): persistent reservations (PERSISTENT RESERVE IN and
//! OUT), the SPC-2 RESERVE/RELEASE reservations that older cluster software still sends,
//! and the check every command passes before it runs: may this I_T nexus use the LUN now?
//!
//! Registrations belong to an I_T nexus identified by its iSCSI initiator port (initiator
//! name plus ISID, the TransportID `name,i,0x<isid>`) and its target port (the portal
//! group), not to a session: a node that logs in again with the same ISID finds its key,
//! and one that logs in with a new ISID is a different I_T nexus. With APTPL the state is
//! kept where [`PrStore`] says (the metadata area of the LUN's mirror set, or a file of
//! its own for a LUN on a plain file) and survives a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ftss_proto::cdb::be;
use ftss_proto::sense::{common, key, Sense};

use super::command::{CmdResult, Ctx, Reply};
use super::lun::Lun;
use super::target::status;
use super::ItNexus;
use crate::media::mirror::MirrorSet;

/// Opcodes this module executes.
pub(crate) mod op {
    pub(crate) const RESERVE_6: u8 = 0x16;
    pub(crate) const RELEASE_6: u8 = 0x17;
    pub(crate) const RESERVE_10: u8 = 0x56;
    pub(crate) const RELEASE_10: u8 = 0x57;
    pub(crate) const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub(crate) const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
}

/// PERSISTENT RESERVE OUT service actions.
mod sa {
    pub(super) const REGISTER: u8 = 0x00;
    pub(super) const RESERVE: u8 = 0x01;
    pub(super) const RELEASE: u8 = 0x02;
    pub(super) const CLEAR: u8 = 0x03;
    pub(super) const PREEMPT: u8 = 0x04;
    pub(super) const PREEMPT_AND_ABORT: u8 = 0x05;
    pub(super) const REGISTER_AND_IGNORE: u8 = 0x06;
    pub(super) const REGISTER_AND_MOVE: u8 = 0x07;
}

/// Persistent reservation types (SPC-4 table 173).
mod ty {
    pub(super) const WE: u8 = 0x1;
    pub(super) const EA: u8 = 0x3;
    pub(super) const WE_RO: u8 = 0x5;
    pub(super) const EA_RO: u8 = 0x6;
    pub(super) const WE_AR: u8 = 0x7;
    pub(super) const EA_AR: u8 = 0x8;
}

const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x03);
const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x04);
const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x05);
const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);

/// Registrations a LUN keeps at most (each costs a TransportID in READ FULL STATUS).
const REGISTRATIONS_MAX: usize = 128;

fn all_registrants(t: u8) -> bool {
    matches!(t, ty::WE_AR | ty::EA_AR)
}

fn registrants_only(t: u8) -> bool {
    matches!(t, ty::WE_RO | ty::EA_RO)
}

/// An initiator port: iSCSI name (lower case: iSCSI names compare case-insensitively)
/// and ISID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Port {
    pub(crate) name: String,
    pub(crate) isid: [u8; 6],
}

impl Port {
    fn of(n: &ItNexus) -> Self {
        Port {
            name: n.initiator_name.to_ascii_lowercase(),
            isid: n.isid,
        }
    }

    /// iSCSI TransportID, format 01b (initiator port with ISID), SPC-4 7.6.4.6.
    fn transport_id(&self) -> Vec<u8> {
        let mut name = format!("{},i,0x", self.name).into_bytes();
        for b in self.isid {
            name.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        name.push(0);
        while !name.len().is_multiple_of(4) {
            name.push(0);
        }
        let mut t = vec![0x45, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend(name);
        t
    }
}

/// One registered I_T nexus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Registration {
    pub(crate) key: u64,
    pub(crate) port: Port,
    /// Target port (portal group tag) the registration was made through.
    pub(crate) tpgt: u16,
    /// Registered through every target port (ALL_TG_PT).
    pub(crate) all_tg_pt: bool,
}

impl Registration {
    fn covers(&self, n: &ItNexus) -> bool {
        self.port == Port::of(n) && (self.all_tg_pt || self.tpgt == n.tpgt)
    }
}

/// The persistent reservation, when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) kind: u8,
    /// The holder (index into the registrations) for types other than all registrants.
    pub(crate) holder: usize,
}

/// Persistent reservation state of one LUN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PrState {
    pub(crate) generation: u32,
    pub(crate) regs: Vec<Registration>,
    pub(crate) res: Option<Held>,
    /// Activate persist through power loss, from the last REGISTER.
    pub(crate) aptpl: bool,
}

impl PrState {
    fn find(&self, n: &ItNexus) -> Option<usize> {
        self.regs.iter().position(|r| r.covers(n))
    }

    /// Whether registration `i` holds the reservation.
    fn holds(&self, i: usize) -> bool {
        match &self.res {
            Some(h) if all_registrants(h.kind) => true,
            Some(h) => h.holder == i,
            None => false,
        }
    }

    /// Removes registration `i`, keeping the holder index right. Returns whether a
    /// reservation went away with it.
    fn unregister(&mut self, i: usize) -> bool {
        self.regs.remove(i);
        let mut released = false;
        if let Some(h) = &mut self.res {
            if all_registrants(h.kind) {
                // Released only with the last registrant (SPC-4 5.15.10.2).
                released = self.regs.is_empty();
            } else if h.holder == i {
                released = true;
            } else if h.holder > i {
                h.holder -= 1;
            }
        }
        if released {
            self.res = None;
        }
        released
    }
}

/// Where a LUN keeps its persistent reservation state while APTPL is set.
#[derive(Clone)]
pub(crate) enum PrStore {
    /// A file of its own, replaced atomically; removed when APTPL is cleared. For LUNs on
    /// a plain file, which is no fault-tolerant media either.
    File(PathBuf),
    /// The metadata area of the LUN's mirror set, so the state has the same redundancy
    /// as the data and survives losing a mirror. An empty record: no APTPL state.
    Mirror(Arc<MirrorSet>),
}

impl PrStore {
    /// Where the state is, for messages.
    fn describe(&self) -> String {
        match self {
            PrStore::File(f) => f.display().to_string(),
            PrStore::Mirror(set) => {
                let paths: Vec<String> = set
                    .status()
                    .iter()
                    .map(|m| m.path.display().to_string())
                    .collect();
                format!("metadata area of mirror set {}", paths.join(" + "))
            }
        }
    }

    /// What an earlier run saved; `None` if nothing.
    fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            PrStore::File(f) => match std::fs::read(f) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            // Read at open from the healthy mirrors; empty once APTPL was cleared.
            PrStore::Mirror(set) => Ok(set.read_meta().filter(|r| !r.is_empty())),
        }
    }

    /// Makes `state` durable, or with `None` durably forgets what was saved.
    fn save(&self, state: Option<&[u8]>) -> Result<(), String> {
        match (self, state) {
            (PrStore::File(f), Some(bytes)) => write_atomic(f, bytes).map_err(|e| e.to_string()),
            (PrStore::File(f), None) => remove_durable(f).map_err(|e| e.to_string()),
            (PrStore::Mirror(set), bytes) => set
                .write_meta(bytes.unwrap_or_default())
                .map_err(|e| e.to_string()),
        }
    }
}

/// Reservation state of one LUN: persistent, SPC-2, and where APTPL state is kept.
#[derive(Default)]
pub(crate) struct Reservations {
    pr: std::sync::Mutex<PrState>,
    /// SPC-2 reservation holder (nexus id).
    spc2: std::sync::Mutex<Option<u64>>,
    /// Where the state is kept while APTPL is set; `None`: no persistence available.
    store: std::sync::Mutex<Option<PrStore>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Updates are single assignments of a fully built state: consistent across a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Reservations {
    /// Keeps APTPL state in `store`, loading what a previous run left there. State that
    /// does not decode is an error: starting without it would silently drop reservations
    /// a cluster relies on.
    pub(crate) fn attach(&self, store: PrStore) -> Result<(), String> {
        let at = || store.describe();
        if let Some(bytes) = store.load().map_err(|e| format!("{}: {e}", at()))? {
            *lock(&self.pr) = decode(&bytes).map_err(|e| format!("{}: {e}", at()))?;
        }
        *lock(&self.store) = Some(store);
        Ok(())
    }

    /// A snapshot of the persistent reservation state.
    pub(crate) fn snapshot(&self) -> PrState {
        lock(&self.pr).clone()
    }

    /// The nexus is gone: its SPC-2 reservation goes with it (SPC-2 5.5.1). Persistent
    /// registrations stay: they belong to the initiator port, not the session.
    pub(crate) fn nexus_removed(&self, nexus: u64) {
        let mut s = lock(&self.spc2);
        if *s == Some(nexus) {
            *s = None;
        }
    }

    /// LOGICAL UNIT RESET and target resets release SPC-2 reservations (SPC-2
    /// 5.5.1); persistent reservations are unaffected (SPC-4 5.15.1).
    pub(crate) fn reset(&self) {
        *lock(&self.spc2) = None;
    }

    fn persist(&self, st: &PrState) -> Result<(), Sense> {
        let store = lock(&self.store).clone();
        let Some(store) = store else {
            return Ok(());
        };
        let bytes = st.aptpl.then(|| encode(st));
        store.save(bytes.as_deref()).map_err(|e| {
            tracing::error!(at = %store.describe(), "persistent reservation state: {e}");
            common::LOGICAL_UNIT_FAILURE
        })
    }

    fn can_persist(&self) -> bool {
        lock(&self.store).is_some()
    }
}

// ---- the reservation check every command passes ----

/// How a command relates to reservations (SPC-4 tables 66 and 67, SBC-3 table 13).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed whatever the reservation.
    Always,
    /// Reads medium or state: allowed under write exclusive, conflicts under exclusive
    /// access for non-holders (and unregistered nexuses under the RO/AR types).
    Read,
    /// Everything else conflicts for non-holders.
    Write,
    /// RESERVE/RELEASE and PERSISTENT RESERVE IN/OUT: they decide themselves.
    Own,
}

fn access(cdb: &[u8]) -> Access {
    let b = |i: usize| cdb.get(i).copied().unwrap_or(0);
    match b(0) {
        // TEST UNIT READY, REQUEST SENSE, INQUIRY, READ CAPACITY(10), REPORT LUNS, LOG SENSE
        0x00 | 0x03 | 0x12 | 0x25 | 0xa0 | 0x4d => Access::Always,
        // READ CAPACITY(16); GET LBA STATUS reads (SBC-3 table 13).
        0x9e => match b(1) & 0x1f {
            0x10 => Access::Always,
            _ => Access::Read,
        },
        // PREVENT ALLOW MEDIUM REMOVAL: allowing removal is always permitted.
        0x1e if b(4) & 0x03 == 0 => Access::Always,
        // START STOP UNIT with START set and power condition 0 (SBC-3 table 13).
        0x1b if b(4) & 0x01 != 0 && b(4) >> 4 == 0 => Access::Always,
        // READ(6/10/12/16), VERIFY(10/12/16), PRE-FETCH(10/16), READ DEFECT DATA(10/12),
        // MAINTENANCE IN (REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS).
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 | 0x37 | 0xb7 | 0xa3 => {
            Access::Read
        }
        op::RESERVE_6
        | op::RELEASE_6
        | op::RESERVE_10
        | op::RELEASE_10
        | op::PERSISTENT_RESERVE_IN
        | op::PERSISTENT_RESERVE_OUT => Access::Own,
        // Writes, WRITE AND VERIFY, SYNCHRONIZE CACHE, MODE SENSE/SELECT, EXTENDED COPY,
        // RECEIVE COPY RESULTS and anything not listed above.
        _ => Access::Write,
    }
}

/// Whether `nexus` may run `cdb` on `lun` now; `false` means RESERVATION CONFLICT.
pub(crate) fn admits(lun: &Lun, nexus: &ItNexus, cdb: &[u8]) -> bool {
    let a = access(cdb);
    if a == Access::Own {
        return true;
    }
    admits_access(lun, nexus, a, cdb)
}

/// For EXTENDED COPY: whether `nexus` may read (`write` false) or write `lun`.
pub(crate) fn admits_copy(lun: &Lun, nexus: &ItNexus, write: bool) -> bool {
    let a = if write { Access::Write } else { Access::Read };
    admits_access(lun, nexus, a, &[])
}

fn admits_access(lun: &Lun, nexus: &ItNexus, a: Access, cdb: &[u8]) -> bool {
    let r = &lun.reservations;
    if let Some(holder) = *lock(&r.spc2) {
        // SPC-2 5.5.1: a reserved LUN serves only its holder, but for the commands that
        // report state or cannot hurt it.
        let harmless = matches!(cdb.first(), Some(0x12 | 0x03 | 0xa0 | 0x4d))
            || (cdb.first() == Some(&0x1e) && cdb.get(4).is_some_and(|b| b & 3 == 0));
        if holder != nexus.id && !harmless {
            return false;
        }
    }
    if a == Access::Always {
        return true;
    }
    let st = lock(&r.pr);
    let Some(held) = &st.res else {
        return true;
    };
    let me = st.find(nexus);
    if me.is_some_and(|i| st.holds(i)) {
        return true;
    }
    let exclusive_access = matches!(held.kind, ty::EA | ty::EA_RO | ty::EA_AR);
    if registrants_only(held.kind) || all_registrants(held.kind) {
        // Registered nexuses have full access; the others are held to the type.
        if me.is_some() {
            return true;
        }
    }
    a == Access::Read && !exclusive_access
}

// ---- SPC-2 RESERVE / RELEASE ----

fn field(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
}

fn conflict() -> CmdResult {
    Ok(Reply {
        status: status::RESERVATION_CONFLICT,
        data: Vec::new(),
        data_out_len: None,
    })
}

/// RESERVE(6) and RESERVE(10): a whole-LUN reservation for this nexus. Third-party
/// reservations and extents are not supported.
pub(crate) fn reserve(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if cdb[1] & 0x10 != 0 {
        return Err(field(1, Some(4))); // 3RDPTY
    }
    if cdb[0] == op::RESERVE_6 && cdb[1] & 0x01 != 0 {
        return Err(field(1, Some(0))); // extents (obsolete)
    }
    if cdb[0] == op::RESERVE_10 && cdb[1] & 0x02 != 0 {
        return Err(field(1, Some(1))); // LONGID: only with third-party reservations
    }
    let r = &c.lun.reservations;
    // SPC-4 5.9.2 / SPC-3 5.6.3: with any registration, RESERVE and RELEASE conflict.
    if !lock(&r.pr).regs.is_empty() {
        return conflict();
    }
    let mut s = lock(&r.spc2);
    match *s {
        Some(h) if h != c.nexus.id => conflict(),
        _ => {
            *s = Some(c.nexus.id);
            Ok(Reply::none())
        }
    }
}

/// RELEASE(6) and RELEASE(10): ends this nexus's reservation; from any other nexus it
/// succeeds without effect (SPC-2 7.17).
pub(crate) fn release(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if cdb[1] & 0x10 != 0 {
        return Err(field(1, Some(4)));
    }
    if cdb[0] == op::RELEASE_6 && cdb[1] & 0x01 != 0 {
        return Err(field(1, Some(0)));
    }
    if cdb[0] == op::RELEASE_10 && cdb[1] & 0x02 != 0 {
        return Err(field(1, Some(1)));
    }
    let r = &c.lun.reservations;
    if !lock(&r.pr).regs.is_empty() {
        return conflict();
    }
    let mut s = lock(&r.spc2);
    if *s == Some(c.nexus.id) {
        *s = None;
    }
    Ok(Reply::none())
}

// ---- PERSISTENT RESERVE IN ----

/// Whether an SPC-2 reservation stands in the way of PERSISTENT RESERVE IN/OUT: SPC-3
/// 5.6.1 makes them conflict while any RESERVE is in effect, whoever sent them.
fn spc2_reserved(lun: &Lun) -> bool {
    lock(&lun.reservations.spc2).is_some()
}

pub(crate) fn persistent_reserve_in(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    if spc2_reserved(c.lun) {
        return conflict();
    }
    let alloc = be(cdb, 7, 2).unwrap_or(0) as usize;
    let st = c.lun.reservations.snapshot();
    let mut d = st.generation.to_be_bytes().to_vec();
    match cdb[1] & 0x1f {
        0x00 => {
            // READ KEYS
            d.extend_from_slice(&((st.regs.len() * 8) as u32).to_be_bytes());
            for r in &st.regs {
                d.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        0x01 => {
            // READ RESERVATION
            match &st.res {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(h) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants reservations report key 0 (SPC-4 6.16.3).
                    let k = if all_registrants(h.kind) {
                        0
                    } else {
                        st.regs.get(h.holder).map_or(0, |r| r.key)
                    };
                    d.extend_from_slice(&k.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, h.kind & 0x0f, 0, 0]);
                }
            }
        }
        0x02 => {
            // REPORT CAPABILITIES
            d.clear();
            d.extend_from_slice(&[0, 8]);
            // CRH (SPC-3 5.6.1 RESERVE handling), ATP_C; SIP_C clear: SPEC_I_PT is
            // refused; PTPL_C when a data directory keeps the state.
            let ptpl_c = u8::from(c.lun.reservations.can_persist());
            d.push(0x10 | 0x04 | ptpl_c);
            // TMV: the type mask is valid; PTPL_A: APTPL is in effect.
            d.push(0x80 | u8::from(st.aptpl));
            // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
            d.extend_from_slice(&[0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01]);
            d.extend_from_slice(&[0, 0]);
        }
        0x03 => {
            // READ FULL STATUS
            let mut descs = Vec::new();
            for (i, r) in st.regs.iter().enumerate() {
                descs.extend_from_slice(&r.key.to_be_bytes());
                descs.extend_from_slice(&[0; 4]);
                let holder = st.holds(i);
                descs.push(u8::from(r.all_tg_pt) << 1 | u8::from(holder));
                descs.push(match (&st.res, holder) {
                    (Some(h), true) => h.kind & 0x0f,
                    _ => 0,
                });
                descs.extend_from_slice(&[0; 4]);
                descs.extend_from_slice(&r.tpgt.to_be_bytes());
                let t = r.port.transport_id();
                descs.extend_from_slice(&(t.len() as u32).to_be_bytes());
                descs.extend(t);
            }
            d.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            d.extend(descs);
        }
        _ => return Err(field(1, Some(4))),
    }
    d.truncate(alloc);
    Ok(Reply::good(d))
}

// ---- PERSISTENT RESERVE OUT ----

fn param(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_PARAM_LIST.param_field(byte, bit)
}

/// Parses an iSCSI TransportID with ISID (format 01b), as REGISTER AND MOVE names its
/// destination.
fn parse_transport_id(t: &[u8], at: u16) -> Result<Port, Sense> {
    if t.len() < 4 || t[0] & 0x0f != 0x05 {
        return Err(param(at, None));
    }
    if t[0] >> 6 != 0x01 {
        // Format 00b names no ISID, so no initiator port.
        return Err(param(at, Some(6)));
    }
    let n = usize::from(u16::from_be_bytes([t[2], t[3]]));
    let body = t.get(4..4 + n).ok_or(param(at + 2, None))?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let text = std::str::from_utf8(&body[..end]).map_err(|_| param(at + 4, None))?;
    let (name, isid) = text
        .to_ascii_lowercase()
        .split_once(",i,0x")
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .ok_or(param(at + 4, None))?;
    if isid.len() != 12 || name.is_empty() {
        return Err(param(at + 4, None));
    }
    let mut id = [0u8; 6];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&isid[2 * i..2 * i + 2], 16).map_err(|_| param(at + 4, None))?;
    }
    Ok(Port { name, isid: id })
}

/// What a PERSISTENT RESERVE OUT did besides changing the state: unit attentions to
/// queue once the new state is in place.
#[derive(Default)]
struct Effects {
    /// (registration as it was, sense) for each I_T nexus to notify.
    ua: Vec<(Registration, Sense)>,
    /// Registrations a preempt removed (not the preempter's own): their I_T nexuses'
    /// tasks are what PREEMPT AND ABORT aborts.
    preempted: Vec<Registration>,
}

/// How long PREEMPT AND ABORT waits for the preempted nexuses' running tasks to end. A
/// task runs one command against the medium, so seconds are plenty; it stays below the
/// 30 s command timeout initiators commonly use, so the preempter hears back in time.
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

pub(crate) fn persistent_reserve_out(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let action = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let kind = cdb[2] & 0x0f;
    let len = be(cdb, 5, 4).unwrap_or(0) as usize;
    let mut reply = Reply::none();
    reply.data_out_len = Some(len as u32);
    if spc2_reserved(c.lun) {
        reply.status = status::RESERVATION_CONFLICT;
        return Ok(reply);
    }
    if action > sa::REGISTER_AND_MOVE {
        return Err(field(1, Some(4)));
    }
    let data = c.cmd.data_out.get(..len).unwrap_or(c.cmd.data_out);
    if data.len() < 24 {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let res_key = u64::from_be_bytes(data[0..8].try_into().unwrap_or_default());
    let sa_key = u64::from_be_bytes(data[8..16].try_into().unwrap_or_default());
    let flags = if action == sa::REGISTER_AND_MOVE {
        data[17]
    } else {
        data[20]
    };
    let uses_type = matches!(
        action,
        sa::RESERVE | sa::RELEASE | sa::PREEMPT | sa::PREEMPT_AND_ABORT
    );
    if uses_type || action == sa::REGISTER_AND_MOVE {
        if scope != 0 {
            return Err(field(2, Some(7))); // only LU_SCOPE
        }
        if uses_type
            && !matches!(
                kind,
                ty::WE | ty::EA | ty::WE_RO | ty::EA_RO | ty::WE_AR | ty::EA_AR
            )
        {
            return Err(field(2, Some(3)));
        }
    }
    if action != sa::REGISTER_AND_MOVE {
        if flags & 0x08 != 0 {
            // SPEC_I_PT: not supported (SIP_C is clear in REPORT CAPABILITIES).
            return Err(param(20, Some(3)));
        }
        if len != 24 {
            return Err(common::PARAM_LIST_LENGTH_ERROR);
        }
    }
    let aptpl = flags & 0x01 != 0;
    if aptpl
        && matches!(
            action,
            sa::REGISTER | sa::REGISTER_AND_IGNORE | sa::REGISTER_AND_MOVE
        )
        && !c.lun.reservations.can_persist()
    {
        let byte = if action == sa::REGISTER_AND_MOVE {
            17
        } else {
            20
        };
        return Err(param(byte, Some(0)));
    }
    let r = &c.lun.reservations;
    let mut st = lock(&r.pr);
    let mut new = st.clone();
    let mut fx = Effects::default();
    let request = Request {
        action,
        kind,
        res_key,
        sa_key,
        flags,
        data,
    };
    let outcome = apply(c, &mut new, &mut fx, &request)?;
    if !outcome {
        reply.status = status::RESERVATION_CONFLICT;
        return Ok(reply);
    }
    if new != *st {
        // Persist while the old state still stands: a failed write changes nothing.
        if new.aptpl || st.aptpl {
            r.persist(&new)?;
        }
        *st = new;
    }
    drop(st);
    for (reg, s) in fx.ua {
        for n in c.target.nexuses_where(|n| reg.covers(n)) {
            c.target.queue_ua(n, c.lun.number, s);
        }
    }
    if action == sa::PREEMPT_AND_ABORT && !fx.preempted.is_empty() {
        abort_preempted(c, &fx.preempted);
    }
    Ok(reply)
}

/// PREEMPT AND ABORT (SPC-4 5.15.11.2.6): every task of the preempted I_T nexuses on this
/// LUN is aborted, and the command completes only once they have ended, so none of them
/// can still change the medium after the preempter hears GOOD. Tasks not yet handed to
/// the device server (a write waiting for Data-Out) end at once; running ones finish
/// their execution first. How aborted tasks end (TASK ABORTED status, TAS=1) is the
/// transport's part; see the Control mode page in spc.rs for why TAS is one.
///
/// The unit attentions are already queued, so an initiator that retries an aborted
/// command hears REGISTRATIONS PREEMPTED first. The preempter's own tasks are left
/// alone: its registration stays even when it preempts its own key. Commands a
/// preempted nexus sends later, and those it sent that wait for CmdSN order, are not
/// aborted: they meet the new reservation when they run.
fn abort_preempted(c: &Ctx<'_>, preempted: &[Registration]) {
    // Nexuses whose connection closed but whose commands still execute count too.
    let pick = |n: &ItNexus| n.id != c.nexus.id && preempted.iter().any(|r| r.covers(n));
    let (asked, ended) = c.target.abort_tasks(pick, c.lun.number, ABORT_WAIT);
    tracing::info!(
        lun = c.lun.number,
        nexuses = asked,
        "PREEMPT AND ABORT: preempted nexuses' tasks aborted"
    );
    if !ended {
        // The reservation change already stands and is what the preempter asked for:
        // failing the command now would report it undone. Say loudly that a task of a
        // preempted nexus outlived the wait (a stuck backing store).
        tracing::error!(
            lun = c.lun.number,
            "PREEMPT AND ABORT: aborted tasks still running after {ABORT_WAIT:?}"
        );
    }
}

/// A PERSISTENT RESERVE OUT command, decoded: the service action, the TYPE, and the
/// parameter list (RESERVATION KEY, SERVICE ACTION RESERVATION KEY, the flags byte and
/// the whole list for REGISTER AND MOVE's transport ID).
struct Request<'a> {
    action: u8,
    kind: u8,
    res_key: u64,
    sa_key: u64,
    flags: u8,
    data: &'a [u8],
}

impl Request<'_> {
    /// APTPL: the registrations persist through a power loss.
    fn aptpl(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// Applies one service action to `st`. `Ok(false)`: RESERVATION CONFLICT.
fn apply(c: &Ctx<'_>, st: &mut PrState, fx: &mut Effects, r: &Request<'_>) -> Result<bool, Sense> {
    // persistent_reserve_out refused service actions past REGISTER AND MOVE.
    if matches!(r.action, sa::REGISTER | sa::REGISTER_AND_IGNORE) {
        return sa_register(c, st, fx, r);
    }
    // Every other service action needs the nexus registered under the key it names.
    let Some(i) = st.find(c.nexus).filter(|&i| st.regs[i].key == r.res_key) else {
        return Ok(false);
    };
    match r.action {
        sa::RESERVE => sa_reserve(st, i, r),
        sa::RELEASE => sa_release(st, i, fx, r),
        sa::CLEAR => sa_clear(st, i, fx),
        // The state change is the same; PREEMPT AND ABORT then aborts the preempted
        // nexuses' tasks once the new state stands (persistent_reserve_out).
        sa::PREEMPT | sa::PREEMPT_AND_ABORT => sa_preempt(st, i, fx, r),
        sa::REGISTER_AND_MOVE => sa_register_and_move(st, i, r),
        _ => Err(field(1, Some(4))),
    }
}

/// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 5.15.11.2.2): add, change or
/// (with a zero key) remove the nexus's registration.
fn sa_register(
    c: &Ctx<'_>,
    st: &mut PrState,
    fx: &mut Effects,
    r: &Request<'_>,
) -> Result<bool, Sense> {
    let me = st.find(c.nexus);
    let ignore = r.action == sa::REGISTER_AND_IGNORE;
    match me {
        None => {
            if !ignore && r.res_key != 0 {
                return Ok(false);
            }
            if r.sa_key == 0 {
                return Ok(true); // nothing to register
            }
            if st.regs.len() >= REGISTRATIONS_MAX {
                return Err(INSUFFICIENT_REGISTRATION_RESOURCES);
            }
            st.regs.push(Registration {
                key: r.sa_key,
                port: Port::of(c.nexus),
                tpgt: c.nexus.tpgt,
                all_tg_pt: r.flags & 0x04 != 0,
            });
        }
        Some(i) => {
            if !ignore && r.res_key != st.regs[i].key {
                return Ok(false);
            }
            if r.sa_key == 0 {
                let kind = st.res.as_ref().map(|h| h.kind);
                let was_holder = st.holds(i);
                let released = st.unregister(i);
                // Losing the holder of a registrants-only reservation releases
                // it for the remaining registrants (SPC-4 5.15.11.2.3).
                if released && was_holder && kind.is_some_and(registrants_only) {
                    for reg in &st.regs {
                        fx.ua.push((reg.clone(), RESERVATIONS_RELEASED));
                    }
                }
            } else {
                st.regs[i].key = r.sa_key;
            }
        }
    }
    st.aptpl = r.aptpl();
    st.generation = st.generation.wrapping_add(1);
    Ok(true)
}

/// RESERVE: the registered nexus takes the reservation, or already holds it.
fn sa_reserve(st: &mut PrState, i: usize, r: &Request<'_>) -> Result<bool, Sense> {
    match &st.res {
        None => {
            st.res = Some(Held {
                kind: r.kind,
                holder: i,
            })
        }
        // Reserving again what one holds is a no-op; anything else conflicts.
        Some(h) => {
            if !(st.holds(i) && h.kind == r.kind) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// RELEASE: the holder gives the reservation up.
fn sa_release(
    st: &mut PrState,
    i: usize,
    fx: &mut Effects,
    r: &Request<'_>,
) -> Result<bool, Sense> {
    let Some(h) = st.res.clone() else {
        return Ok(true);
    };
    if !st.holds(i) {
        return Ok(true); // SPC-4 5.15.11.2.2: not the holder, nothing happens
    }
    if h.kind != r.kind {
        return Err(INVALID_RELEASE);
    }
    st.res = None;
    if registrants_only(h.kind) || all_registrants(h.kind) {
        for (j, reg) in st.regs.iter().enumerate() {
            if j != i {
                fx.ua.push((reg.clone(), RESERVATIONS_RELEASED));
            }
        }
    }
    Ok(true)
}

/// CLEAR: every registration and the reservation go.
fn sa_clear(st: &mut PrState, i: usize, fx: &mut Effects) -> Result<bool, Sense> {
    for (j, reg) in st.regs.iter().enumerate() {
        if j != i {
            fx.ua.push((reg.clone(), RESERVATIONS_PREEMPTED));
        }
    }
    st.regs.clear();
    st.res = None;
    st.generation = st.generation.wrapping_add(1);
    Ok(true)
}

/// PREEMPT and PREEMPT AND ABORT: remove the registrations with the given key.
fn sa_preempt(
    st: &mut PrState,
    i: usize,
    fx: &mut Effects,
    r: &Request<'_>,
) -> Result<bool, Sense> {
    if !preempt(st, fx, i, r.kind, r.sa_key)? {
        return Ok(false);
    }
    st.generation = st.generation.wrapping_add(1);
    Ok(true)
}

/// REGISTER AND MOVE: the holder registers another I_T nexus and hands it the
/// reservation.
fn sa_register_and_move(st: &mut PrState, i: usize, r: &Request<'_>) -> Result<bool, Sense> {
    let Some(h) = st.res.clone() else {
        return Ok(false);
    };
    if all_registrants(h.kind) || !st.holds(i) {
        return Ok(false);
    }
    if r.sa_key == 0 {
        return Err(param(8, None));
    }
    let tpgt = u16::from_be_bytes([r.data[18], r.data[19]]);
    let tlen = u32::from_be_bytes([r.data[20], r.data[21], r.data[22], r.data[23]]) as usize;
    if r.data.len() < 24 + tlen {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let port = parse_transport_id(&r.data[24..24 + tlen], 24)?;
    if port == st.regs[i].port && tpgt == st.regs[i].tpgt {
        return Err(param(24, None)); // moving to itself
    }
    let dest = match st
        .regs
        .iter()
        .position(|r| r.port == port && (r.all_tg_pt || r.tpgt == tpgt))
    {
        Some(d) => {
            st.regs[d].key = r.sa_key;
            d
        }
        None => {
            if st.regs.len() >= REGISTRATIONS_MAX {
                return Err(INSUFFICIENT_REGISTRATION_RESOURCES);
            }
            st.regs.push(Registration {
                key: r.sa_key,
                port,
                tpgt,
                all_tg_pt: false,
            });
            st.regs.len() - 1
        }
    };
    st.res = Some(Held {
        kind: h.kind,
        holder: dest,
    });
    if r.flags & 0x02 != 0 {
        // UNREG: the source leaves; its reservation already moved.
        st.regs.remove(i);
        if let Some(hh) = &mut st.res {
            if hh.holder > i {
                hh.holder -= 1;
            }
        }
    }
    st.aptpl = r.aptpl();
    st.generation = st.generation.wrapping_add(1);
    Ok(true)
}

/// Removes the registrations `pick` selects; each preempted one but `me` gets
/// REGISTRATIONS PREEMPTED. The reservation follows its holder's registration: gone with
/// it, or with the last registrant for the all-registrants types. Returns how many went.
fn remove_where(
    st: &mut PrState,
    fx: &mut Effects,
    me: &Registration,
    pick: impl Fn(&Registration) -> bool,
) -> usize {
    let holder = st.res.as_ref().and_then(|h| st.regs.get(h.holder).cloned());
    let before = st.regs.len();
    let mut kept = Vec::with_capacity(before);
    for r in std::mem::take(&mut st.regs) {
        if pick(&r) {
            if r != *me {
                fx.preempted.push(r.clone());
                fx.ua.push((r, REGISTRATIONS_PREEMPTED));
            }
        } else {
            kept.push(r);
        }
    }
    st.regs = kept;
    if let Some(h) = &mut st.res {
        if all_registrants(h.kind) {
            h.holder = 0;
            if st.regs.is_empty() {
                st.res = None;
            }
        } else {
            match holder.and_then(|hr| st.regs.iter().position(|r| *r == hr)) {
                Some(i) => h.holder = i,
                None => st.res = None,
            }
        }
    }
    before - st.regs.len()
}

/// PREEMPT by registration `me` (SPC-4 5.15.11.2.4). `Ok(false)`: nothing to preempt,
/// RESERVATION CONFLICT.
fn preempt(
    st: &mut PrState,
    fx: &mut Effects,
    me: usize,
    kind: u8,
    sa_key: u64,
) -> Result<bool, Sense> {
    let me_reg = st.regs[me].clone();
    let position = |st: &PrState| st.regs.iter().position(|r| *r == me_reg);
    match st.res.clone() {
        Some(h) if all_registrants(h.kind) => {
            if sa_key == 0 {
                // Key 0 preempts an all-registrants reservation: every other registration
                // goes and the preempter holds a reservation of the requested type.
                remove_where(st, fx, &me_reg, |r| *r != me_reg);
                let holder = position(st).unwrap_or(0);
                st.res = Some(Held { kind, holder });
                Ok(true)
            } else {
                Ok(remove_where(st, fx, &me_reg, |r| r.key == sa_key) > 0)
            }
        }
        _ if sa_key == 0 => Err(param(8, None)),
        None => Ok(remove_where(st, fx, &me_reg, |r| r.key == sa_key) > 0),
        Some(h) => {
            let holder_key = st.regs.get(h.holder).map(|r| r.key);
            if holder_key != Some(sa_key) {
                // Not the holder: only registrations go; the reservation stays.
                return Ok(remove_where(st, fx, &me_reg, |r| r.key == sa_key) > 0);
            }
            // Preempting the holder: its key's registrations (but the preempter's own) go
            // and the preempter holds a new reservation of the requested type.
            remove_where(st, fx, &me_reg, |r| r.key == sa_key && *r != me_reg);
            let holder = position(st).unwrap_or(0);
            st.res = Some(Held { kind, holder });
            if h.kind != kind {
                for r in st.regs.iter().filter(|r| **r != me_reg) {
                    fx.ua.push((r.clone(), RESERVATIONS_RELEASED));
                }
            }
            Ok(true)
        }
    }
}

// ---- persistence ----

const MAGIC: &[u8; 8] = b"FTSSPR\r\n";
const VERSION: u16 = 1;

fn encode(st: &PrState) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&st.generation.to_be_bytes());
    p.push(u8::from(st.aptpl));
    match &st.res {
        Some(h) => {
            p.push(h.kind);
            p.extend_from_slice(&(h.holder as u32).to_be_bytes());
        }
        None => {
            p.push(0);
            p.extend_from_slice(&0u32.to_be_bytes());
        }
    }
    p.extend_from_slice(&(st.regs.len() as u32).to_be_bytes());
    for r in &st.regs {
        p.extend_from_slice(&r.key.to_be_bytes());
        p.extend_from_slice(&r.port.isid);
        p.extend_from_slice(&r.tpgt.to_be_bytes());
        p.push(u8::from(r.all_tg_pt));
        p.extend_from_slice(&(r.port.name.len() as u16).to_be_bytes());
        p.extend_from_slice(r.port.name.as_bytes());
    }
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&VERSION.to_be_bytes());
    f.extend_from_slice(&(p.len() as u32).to_be_bytes());
    f.extend(p);
    let crc = crc32c::crc32c(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

/// A cursor over the payload that reports truncation instead of panicking.
struct Rd<'a>(&'a [u8]);

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from(self.u32()?) << 32 | u64::from(self.u32()?))
    }
}

fn decode(f: &[u8]) -> Result<PrState, String> {
    if f.len() < MAGIC.len() + 10 || &f[..MAGIC.len()] != MAGIC {
        return Err("not a persistent reservation record (bad magic)".into());
    }
    let (body, crc) = f.split_at(f.len() - 4);
    let want = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != want {
        return Err("persistent reservation record damaged (crc32c mismatch)".into());
    }
    let mut rd = Rd(&body[MAGIC.len()..]);
    let version = rd.u16()?;
    if version != VERSION {
        return Err(format!(
            "persistent reservation record version {version} unsupported"
        ));
    }
    let len = rd.u32()? as usize;
    if rd.0.len() != len {
        return Err("persistent reservation record length mismatch".into());
    }
    let generation = rd.u32()?;
    let aptpl = rd.u8()? != 0;
    let kind = rd.u8()?;
    let holder = rd.u32()? as usize;
    let n = rd.u32()? as usize;
    if n > REGISTRATIONS_MAX {
        return Err(format!("{n} registrations: more than {REGISTRATIONS_MAX}"));
    }
    let mut regs = Vec::with_capacity(n);
    for _ in 0..n {
        let key = rd.u64()?;
        let mut isid = [0u8; 6];
        isid.copy_from_slice(rd.take(6)?);
        let tpgt = rd.u16()?;
        let all_tg_pt = rd.u8()? != 0;
        let nl = usize::from(rd.u16()?);
        let name = std::str::from_utf8(rd.take(nl)?)
            .map_err(|_| "initiator name not UTF-8".to_owned())?
            .to_owned();
        regs.push(Registration {
            key,
            port: Port { name, isid },
            tpgt,
            all_tg_pt,
        });
    }
    let res = match kind {
        0 => None,
        ty::WE | ty::EA | ty::WE_RO | ty::EA_RO | ty::WE_AR | ty::EA_AR if holder < regs.len() => {
            Some(Held { kind, holder })
        }
        _ => return Err(format!("bad reservation (type {kind}, holder {holder})")),
    };
    Ok(PrState {
        generation,
        regs,
        res,
        aptpl,
    })
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Temp file, fsync, rename over the old one, fsync the directory: a crash leaves either
/// the old state or the new one.
pub(crate) fn write_atomic(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = file.with_extension("tmp");
    {
        // Owner-only (the rename keeps the mode): the state names the initiators and
        // their reservation keys.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, file)?;
    sync_dir(file)
}

fn remove_durable(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file) {
        Ok(()) => sync_dir(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, key: u64) -> Registration {
        Registration {
            key,
            port: Port {
                name: name.into(),
                isid: [0x40, 0, 0, 0, 0, 1],
            },
            tpgt: 1,
            all_tg_pt: false,
        }
    }

    #[test]
    fn file_round_trip_and_damage() {
        let st = PrState {
            generation: 7,
            regs: vec![reg("iqn.a", 1), reg("iqn.b", 2)],
            res: Some(Held {
                kind: ty::WE_RO,
                holder: 1,
            }),
            aptpl: true,
        };
        let f = encode(&st);
        assert_eq!(decode(&f), Ok(st));
        let mut bad = f.clone();
        bad[20] ^= 1;
        assert!(decode(&bad).expect_err("damaged").contains("crc32c"));
        assert!(decode(&f[..f.len() - 1]).is_err());
        assert!(decode(b"nonsense").is_err());
    }

    #[test]
    fn the_state_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("ftss-pr-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        let f = d.join("lun.pr");
        write_atomic(&f, b"state").expect("write");
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn mirror_store_keeps_aptpl_state_and_clears_it_with_an_empty_record() {
        let d = std::env::temp_dir().join(format!("ftss-pr-mirror-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        let paths = vec![d.join("a.mir"), d.join("b.mir")];
        let open = || Arc::new(MirrorSet::open(&paths, 64, 512).expect("mirror set"));
        let st = PrState {
            generation: 3,
            regs: vec![reg("iqn.a", 9)],
            res: Some(Held {
                kind: ty::WE,
                holder: 0,
            }),
            aptpl: true,
        };
        let r = Reservations::default();
        r.attach(PrStore::Mirror(open()))
            .expect("attach to an empty set");
        assert_eq!(r.snapshot(), PrState::default());
        assert!(r.can_persist());
        r.persist(&st).expect("persist");
        drop(r);
        // A later run finds it on the set.
        let r = Reservations::default();
        let set = open();
        r.attach(PrStore::Mirror(Arc::clone(&set))).expect("attach");
        assert_eq!(r.snapshot(), st);
        // APTPL cleared: the record empties, the next run starts with nothing.
        r.persist(&PrState::default()).expect("clear");
        assert_eq!(set.read_meta(), Some(Vec::new()));
        drop((r, set));
        let r = Reservations::default();
        r.attach(PrStore::Mirror(open())).expect("attach");
        assert_eq!(r.snapshot(), PrState::default());
        // A record that is not reservation state stops the attach, naming where it is.
        open().write_meta(b"something else").expect("write");
        let e = Reservations::default()
            .attach(PrStore::Mirror(open()))
            .expect_err("refused");
        assert!(
            e.contains("metadata area") && e.contains("bad magic"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn transport_id_round_trip() {
        let p = Port {
            name: "iqn.2026-11.org.ftss:n1".into(),
            isid: [0x40, 0x00, 0x01, 0x37, 0x00, 0x02],
        };
        let t = p.transport_id();
        assert_eq!(t.len() % 4, 0);
        assert_eq!(t[0], 0x45);
        assert_eq!(parse_transport_id(&t, 24), Ok(p));
    }
}
