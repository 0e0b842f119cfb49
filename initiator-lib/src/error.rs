//! The one error type of the initiator.

use ftss_proto::sense::Sense;

/// Everything that can go wrong between `connect` and `logout`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The target sent a frame that does not decode (digest error, bad field).
    #[error("undecodable PDU: {0}")]
    Decode(#[from] ftss_proto::pdu::DecodeError),
    /// Login or text keys that do not parse.
    #[error("bad text keys: {0}")]
    Text(#[from] ftss_proto::text::TextError),
    /// The target's answers to our operational keys are unacceptable.
    #[error("negotiation: {0}")]
    Negotiation(#[from] ftss_proto::negotiate::NegotiationError),
    /// The target ended the login with a non-zero status (RFC 7143 11.13.5); class 2
    /// detail 1 is an authentication failure, class 1 a redirection we do not follow.
    #[error("login rejected: status class {class:#04x} detail {detail:#04x}")]
    LoginRejected {
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
    },
    /// CHAP failed on our side: the target did not choose CHAP, sent malformed CHAP keys,
    /// or failed mutual authentication.
    #[error("authentication: {0}")]
    Auth(String),
    /// The target broke the protocol in a way that leaves no sensible recovery.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The target answered a request of ours with a Reject PDU.
    #[error("request rejected by the target, reason {reason:#04x}")]
    Rejected {
        /// Reject reason code (RFC 7143 11.17.1).
        reason: u8,
    },
    /// The target could not complete the command at the transport level (SCSI Response
    /// with a non-zero iSCSI response code).
    #[error("target failure, iSCSI response {response:#04x}")]
    TargetFailure {
        /// Response code.
        response: u8,
    },
    /// A SCSI helper got a status other than GOOD.
    #[error("SCSI status {status:#04x}, sense {sense:?}")]
    ScsiStatus {
        /// SCSI status byte.
        status: u8,
        /// Decoded sense, when the target sent any.
        sense: Option<Sense>,
    },
    /// The connection is gone (EOF, a fatal error in the reader, or after logout).
    #[error("connection closed")]
    ConnectionClosed,
    /// No answer within the configured time.
    #[error("timed out")]
    Timeout,
    /// The caller asked for something this initiator cannot express.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The target's media is full (SEND answered TASK SET FULL or BUSY): nothing of the
    /// SEND was stored. Retry later; the same packet ids are safe to reuse.
    #[error("target busy: media full, nothing stored")]
    Busy,
    /// A vendor command's data-in list does not decode.
    #[error("vendor data: {0}")]
    Vendor(#[from] ftss_proto::vendor::VendorError),
    /// The kernel's SCSI layer could not complete an SG_IO command (a host adapter or
    /// driver error, e.g. the iSCSI session is being recovered): the command may or may
    /// not have reached the target.
    #[error("SG_IO: host status {host_status:#04x}, driver status {driver_status:#04x}")]
    Passthrough {
        /// `host_status` of the `sg_io_hdr` (`DID_*`).
        host_status: u16,
        /// `driver_status` of the `sg_io_hdr` (`DRIVER_*`).
        driver_status: u16,
    },
    /// No SCSI device to talk to (e.g. no LUN of an ftss target is visible).
    #[error("{0}")]
    NoDevice(String),
}

impl Error {
    /// Whether this is the target refusing our credentials (or us refusing the target's).
    #[must_use]
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Error::Auth(_)
                | Error::LoginRejected {
                    class: 2,
                    detail: 1
                }
        )
    }
}

impl Error {
    /// Whether the command may have been lost with its connection or its answer: the
    /// connection failed or closed, or no answer came in time. A SEND that fails this
    /// way may or may not have been stored; send it again with the same packet ids
    /// (after reconnecting, when the session is closed).
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Io(_)
                | Error::Decode(_)
                | Error::ConnectionClosed
                | Error::Timeout
                | Error::Passthrough { .. }
        )
    }
}

impl Error {
    /// The same error for another caller: one coalesced SEND's failure is the failure of
    /// every caller whose packets it carried. `std::io::Error` is not `Clone`, so an I/O
    /// error is rebuilt from its kind and text (it stays a connection error); the rest
    /// are copies. No wildcard arm: a new variant must decide here how it is shared.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
            Error::Decode(e) => Error::Decode(e.clone()),
            Error::Text(e) => Error::Text(e.clone()),
            Error::Negotiation(e) => Error::Negotiation(e.clone()),
            Error::LoginRejected { class, detail } => Error::LoginRejected {
                class: *class,
                detail: *detail,
            },
            Error::Auth(s) => Error::Auth(s.clone()),
            Error::Protocol(s) => Error::Protocol(s.clone()),
            Error::Rejected { reason } => Error::Rejected { reason: *reason },
            Error::TargetFailure { response } => Error::TargetFailure {
                response: *response,
            },
            Error::ScsiStatus { status, sense } => Error::ScsiStatus {
                status: *status,
                sense: *sense,
            },
            Error::ConnectionClosed => Error::ConnectionClosed,
            Error::Timeout => Error::Timeout,
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::Busy => Error::Busy,
            Error::Vendor(e) => Error::Vendor(e.clone()),
            Error::Passthrough {
                host_status,
                driver_status,
            } => Error::Passthrough {
                host_status: *host_status,
                driver_status: *driver_status,
            },
            Error::NoDevice(s) => Error::NoDevice(s.clone()),
        }
    }
}

impl From<ftss_proto::chap::ChapError> for Error {
    fn from(e: ftss_proto::chap::ChapError) -> Self {
        Error::Auth(e.to_string())
    }
}
