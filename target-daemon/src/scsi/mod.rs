//! Transport-free SCSI: `execute(nexus, lun, cdb, data-out) -> status, sense, data-in`.
//!
//! The iSCSI layer collects a command's data-out, calls [`ScsiTarget::execute`] on a
//! blocking thread, and turns the [`ScsiOutcome`] into Data-In and SCSI Response PDUs,
//! computing residuals from the lengths here against the Expected Data Transfer Length.

use std::sync::Arc;

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
}

pub(crate) mod defect;
pub(crate) mod lun;
pub(crate) mod pr;
pub(crate) mod sbc;
pub(crate) mod sbc_ext;
pub(crate) mod spc;
pub mod target;
pub(crate) mod xcopy;

pub use target::{
    AbortWait, LunSpec, ScsiError, ScsiTarget, TargetIdentity, TaskAborter, VendorHandler,
};
