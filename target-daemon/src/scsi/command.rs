//! What every command implementation sees and returns: its context ([`Ctx`]), its reply
//! ([`Reply`], or the sense data of a CHECK CONDITION), its entry in the opcode table
//! ([`Command`]), and the sense every command set shares for a bad CDB field, a media
//! error or an LBA range past the end. The bottom of the SCSI module: it imports none of
//! the command sets.

use ftss_proto::sense::{common, status, Sense};

use super::lun::Lun;
use super::target::ScsiTarget;
use super::{ItNexus, ScsiCommand};
use crate::media::MediaError;

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
    /// Unit attention clock when the command arrived (see [`ScsiTarget::arrival`]).
    pub(crate) arrived: u64,
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
    /// Whether `cdb` is this command (opcode, and service action where it has one).
    pub(crate) fn matches(&self, cdb: &[u8]) -> bool {
        cdb.first() == Some(&self.opcode)
            && self
                .sa
                .is_none_or(|sa| cdb.get(1).is_some_and(|b| b & 0x1f == sa))
    }
}

/// INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
pub(crate) fn field(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
}

/// The sense for a media error; `writing` picks WRITE ERROR over UNRECOVERED READ ERROR.
pub(crate) fn media(e: MediaError, writing: bool) -> Sense {
    match e {
        MediaError::OutOfRange { .. } => common::LBA_OUT_OF_RANGE,
        MediaError::Failed(_) => common::LOGICAL_UNIT_FAILURE,
        // A refused inline try never reaches the initiator (its outcome is discarded and
        // the command runs again); should one escape, the initiator retries.
        MediaError::Full | MediaError::WouldBlock => Sense::new(0x0b, 0x55, 0x03), // insufficient resources
        _ if writing => common::WRITE_ERROR,
        _ => common::UNRECOVERED_READ_ERROR,
    }
}

/// GOOD, no data-in, after a data-out command that used `len` bytes of its data-out.
pub(crate) fn reply_out(len: usize) -> Reply {
    Reply {
        status: status::GOOD,
        data: Vec::new(),
        data_out_len: Some(len as u32),
    }
}

/// LBA OUT OF RANGE unless `lba + blocks` fits the medium.
pub(crate) fn in_range(l: &Lun, lba: u64, blocks: u64) -> Result<(), Sense> {
    if lba.checked_add(blocks).is_none_or(|e| e > l.blocks()) {
        return Err(common::LBA_OUT_OF_RANGE);
    }
    Ok(())
}
