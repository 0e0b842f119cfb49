//! Transport-free SCSI: `execute(nexus, lun, cdb, data-out) -> status, sense, data-in`.
//!
//! The iSCSI layer collects a command's data-out, calls [`ScsiTarget::execute`] on a
//! blocking thread, and turns the [`ScsiOutcome`] into Data-In and SCSI Response PDUs,
//! computing residuals from the lengths here against the Expected Data Transfer Length.

use std::sync::Arc;
use std::time::Instant;

/// Identity of an I_T nexus (one iSCSI session): unit attentions and reservations are
/// kept per nexus.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// Unique for the daemon's lifetime; never reused.
    pub id: u64,
    /// iSCSI initiator name (InitiatorName key).
    pub initiator_name: Arc<str>,
    /// Initiator session ID from the login.
    pub isid: [u8; 6],
    /// Target portal group tag the session logged in through.
    pub tpgt: u16,
}

/// SAM task attribute of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttr {
    /// SIMPLE
    Simple,
    /// ORDERED
    Ordered,
    /// HEAD OF QUEUE
    HeadOfQueue,
    /// ACA
    Aca,
}

/// One SCSI command as the transport hands it over.
#[derive(Debug)]
pub struct ScsiCommand<'a> {
    /// LUN number decoded from the 8-byte LUN field (SAM-5 flat or peripheral addressing).
    pub lun: u64,
    /// The CDB (6 to 16 bytes, more with an extended-CDB AHS).
    pub cdb: &'a [u8],
    /// Data-out the initiator sent: at most `expected_len` bytes.
    pub data_out: &'a [u8],
    /// Expected Data Transfer Length from the transport.
    pub expected_len: u32,
    /// Task attribute.
    pub attr: TaskAttr,
    /// `Some` when the transport runs the command again after parking it (see
    /// [`ScsiOutcome::park`]): the end of the wait the first run chose.
    pub resume_until: Option<Instant>,
}

/// Asks the transport to park a command that has nothing to answer yet (a long-poll
/// RECEIVE) instead of holding a thread: it runs the command again, with
/// [`ScsiCommand::resume_until`] set to `until`, once `wake` changes or `until` passes,
/// whichever is first, and drops it at once if the task is aborted meanwhile. A transport
/// that cannot park sends the outcome's own answer, as if the command had not waited.
#[derive(Debug)]
pub struct Park {
    /// Changes when running the command again may find something.
    pub wake: tokio::sync::watch::Receiver<()>,
    /// When the wait ends: the last run answers whatever there is.
    pub until: Instant,
}

/// Told how many bytes of a command's data-in reached the initiator, once the transport
/// knows: [`Self::sent`] after the response went out, 0 when dropped unused (the task was
/// aborted, the connection went before the response was written).
pub struct DataInSent(Option<Box<dyn FnOnce(usize) + Send>>);

impl DataInSent {
    /// A hook that calls `f` with the bytes sent, exactly once.
    pub fn new(f: impl FnOnce(usize) + Send + 'static) -> Self {
        DataInSent(Some(Box::new(f)))
    }

    /// The response went out carrying the first `bytes` bytes of the data-in.
    pub fn sent(mut self, bytes: usize) {
        if let Some(f) = self.0.take() {
            f(bytes);
        }
    }
}

impl Drop for DataInSent {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(0);
        }
    }
}

impl std::fmt::Debug for DataInSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataInSent")
    }
}

/// What a command produced.
#[derive(Debug, Default)]
pub struct ScsiOutcome {
    /// SCSI status byte (0x00 GOOD, 0x02 CHECK CONDITION, 0x08 BUSY, 0x18 RESERVATION
    /// CONFLICT, 0x28 TASK SET FULL).
    pub status: u8,
    /// Sense data (fixed or descriptor format, as the LUN's D_SENSE selects) when
    /// `status` is CHECK CONDITION.
    pub sense: Option<Vec<u8>>,
    /// Data-in the command would return, before the transport clips it to the expected
    /// length (the transport reports the difference as a residual).
    pub data_in: Vec<u8>,
    /// For data-out commands: bytes of data-out the CDB called for, so the transport can
    /// report a residual against the expected length.
    pub data_out_len: Option<u32>,
    /// Park the command rather than answer now (see [`Park`]).
    pub park: Option<Park>,
    /// To be told how much of `data_in` was sent (see [`DataInSent`]).
    pub on_sent: Option<DataInSent>,
}

pub(crate) mod atomic_io;
pub(crate) mod block_io;
pub(crate) mod command;
pub(crate) mod commands;
pub(crate) mod defect;
#[cfg(test)]
mod inline_tests;
pub(crate) mod lun;
pub(crate) mod medium;
pub(crate) mod pr;
pub(crate) mod provisioning;
pub(crate) mod spc;
pub mod target;
pub(crate) mod xcopy;

pub use target::{
    AbortWait, LunSpec, ScsiError, ScsiTarget, TargetIdentity, TaskAborter, VendorHandler,
};
