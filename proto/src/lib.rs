//! Sans-IO wire formats for ftss.
//!
//! This crate decodes and encodes the bytes that cross an iSCSI connection (RFC 7143):
//! PDUs with their AHS and digests, login/text key negotiation, CHAP, SCSI CDBs and
//! sense data, and the vendor packet records that carry network traffic. It holds the
//! protocol state machines as plain objects fed with bytes and polled for output.
//!
//! It does **not** own sockets, files, clocks or tasks: the daemon and the initiator
//! library do. Nothing here panics on input from the wire; every decoder returns an
//! error value and never allocates more than the input it was handed.
#![forbid(unsafe_code)]

pub mod cdb;
pub mod chap;
pub mod cmdsn;
pub mod digest;
pub mod entropy;
pub mod frame;
pub mod initiator;
pub mod login;
pub mod negotiate;
pub mod pdu;
pub mod sense;
pub mod serial;
pub mod text;
pub mod vendor;
