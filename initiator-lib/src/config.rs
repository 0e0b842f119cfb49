//! How to log in: names, CHAP credentials, digest preferences, ISID.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Digest preference for one direction of headers or data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Digest {
    /// Prefer no digest (CRC32C still accepted if the target insists).
    #[default]
    None,
    /// Prefer CRC32C (RFC 7143 13.1).
    Crc32c,
}

/// Our CHAP name and secret, and optionally what we expect of the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapCredentials {
    /// CHAP_N we present.
    pub username: String,
    /// The secret we prove knowledge of (12 bytes or more per RFC 7143 12.1.3).
    pub secret: Vec<u8>,
    /// Authenticate the target too (mutual CHAP).
    pub mutual: Option<MutualChap>,
}

/// The target's identity for mutual CHAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MutualChap {
    /// CHAP_N the target must present.
    pub target_username: String,
    /// The secret the target must prove; must differ from ours.
    pub secret: Vec<u8>,
}

/// How to log in.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our iSCSI name.
    pub initiator_name: String,
    /// Target to log in to; `None` opens a discovery session.
    pub target_name: Option<String>,
    /// CHAP credentials; `None` logs in without authentication.
    pub chap: Option<ChapCredentials>,
    /// Header digest preference.
    pub header_digest: Digest,
    /// Data digest preference.
    pub data_digest: Digest,
    /// Initiator session ID. Two sessions with the same name and ISID to one target are
    /// the same session to the target (the second reinstates the first).
    pub isid: [u8; 6],
    /// Offer ImmediateData=Yes (data in the command PDU). With it off, writes start with
    /// unsolicited Data-Out PDUs instead (InitialR2T is always offered No).
    pub immediate_data: bool,
    /// Limit for the login and for every request.
    pub timeout: Duration,
}

impl SessionConfig {
    /// A configuration without CHAP or digests and with an ISID unique in this process.
    #[must_use]
    pub fn new(initiator_name: &str, target_name: Option<&str>) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let pid = std::process::id().to_be_bytes();
        SessionConfig {
            initiator_name: initiator_name.to_owned(),
            target_name: target_name.map(str::to_owned),
            chap: None,
            header_digest: Digest::None,
            data_digest: Digest::None,
            // Type 0x80 ("random"): the remaining bytes only need to be unique for us.
            isid: [0x80, pid[2], pid[3], n[1], n[2], n[3]],
            immediate_data: true,
            timeout: Duration::from_secs(30),
        }
    }
}
