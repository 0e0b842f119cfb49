//! How a [`PacketClient`](crate::PacketClient) reaches the target: anything that runs one
//! SCSI command and hands back status, sense and data.
//!
//! The packet API needs nothing of iSCSI beyond "run this CDB", so it is written against
//! [`Transport`]. [`IscsiTransport`] runs commands on one LUN of a userspace
//! [`Session`]; on Linux, `SgTransport` (`crate::sg`: an SG_IO `ioctl` on `/dev/sgN` of a
//! LUN the kernel initiator logged in to) fills an `sg_io_hdr` from the same three
//! arguments and builds the [`ScsiResult`] from the status, sense buffer and `resid` the
//! kernel returns.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::{Error, ScsiResult, Session};

/// Runs one SCSI command against the target and returns its completion.
///
/// A CHECK CONDITION is a completed command (`Ok`), not an error: the packet API reads
/// outcomes from sense data. `Err` means the command may not have reached the target or
/// its answer was lost (connection gone, timeout); such a command may still have been
/// carried out, which is why SEND is retried with the same packet ids.
///
/// The returned future is `Send` so that callers may `tokio::spawn` work that uses a
/// transport. The trait is generic rather than object safe; wrap it in an enum (or box
/// the future yourself) to choose a transport at run time.
pub trait Transport: Send + Sync {
    /// Runs `cdb`, writing `data_out` (if any) or reading up to `data_in_len` bytes.
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send;
}

// Sharing one transport between clients (e.g. a PacketClient and a Receiver on one
// session) should not need a wrapper type.
impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        (**self).execute(cdb, data_out, data_in_len)
    }
}

/// Commands on one LUN of an iSCSI [`Session`]. Vendor commands work on any LUN of the
/// session; the LUN only has to exist.
#[derive(Clone)]
pub struct IscsiTransport {
    /// The logged-in session; shared, since a session serves many tasks at once.
    pub session: Arc<Session>,
    /// LUN the commands are addressed to.
    pub lun: u16,
}

impl IscsiTransport {
    /// Commands on LUN `lun` of `session`.
    #[must_use]
    pub fn new(session: Arc<Session>, lun: u16) -> Self {
        IscsiTransport { session, lun }
    }
}

impl Transport for IscsiTransport {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        self.session.execute(self.lun, cdb, data_out, data_in_len)
    }
}
