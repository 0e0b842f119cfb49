//! The login phase (RFC 7143 section 6.3) on a fresh connection: the I/O shell around
//! `ftss_proto::login::InitiatorLogin`, which decides every request; this module only
//! writes them, reads the responses and maps the outcome to our [`Error`].

use ftss_proto::entropy::{Entropy, EntropyError};
use ftss_proto::login::{
    ChapCredentials as ProtoChap, InitiatorConfig, InitiatorLogin, InitiatorLoginError,
    LoginOutcome, Progress,
};
use ftss_proto::negotiate::Limits;
use ftss_proto::pdu::{Framing, Pdu};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{Digest, SessionConfig};
use crate::wire;
use crate::Error;

/// What we declare we can receive in the full feature phase.
pub(crate) const RECV_SEGMENT: u32 = 262_144;

fn digests(d: Digest) -> Vec<String> {
    match d {
        Digest::None => vec!["None".into(), "CRC32C".into()],
        Digest::Crc32c => vec!["CRC32C".into(), "None".into()],
    }
}

/// The machine's configuration from ours.
fn machine_config(cfg: &SessionConfig) -> InitiatorConfig {
    InitiatorConfig {
        initiator_name: cfg.initiator_name.clone(),
        target_name: cfg.target_name.clone(),
        isid: cfg.isid,
        chap: cfg.chap.as_ref().map(|c| ProtoChap {
            username: c.username.clone(),
            secret: c.secret.clone(),
            mutual: c
                .mutual
                .as_ref()
                .map(|m| (m.target_username.clone(), m.secret.clone())),
        }),
        limits: Limits {
            max_recv_data_segment_length: RECV_SEGMENT,
            max_burst_length: 1 << 20,
            first_burst_length: 256 << 10,
            immediate_data: cfg.immediate_data,
            initial_r2t: false,
            header_digest: digests(cfg.header_digest),
            data_digest: digests(cfg.data_digest),
            ..Limits::default()
        },
    }
}

impl From<InitiatorLoginError> for Error {
    fn from(e: InitiatorLoginError) -> Self {
        match e {
            InitiatorLoginError::Rejected { class, detail } => {
                Error::LoginRejected { class, detail }
            }
            InitiatorLoginError::Auth(s) => Error::Auth(s),
            InitiatorLoginError::Chap(e) => Error::from(e),
            InitiatorLoginError::Negotiation(e) => Error::Negotiation(e),
            InitiatorLoginError::Text(e) => Error::Text(e),
            InitiatorLoginError::Entropy(e) => Error::Io(std::io::Error::other(e)),
            other => Error::Protocol(other.to_string()),
        }
    }
}

/// Runs the whole login on `stream`.
pub(crate) async fn login(
    stream: &mut TcpStream,
    cfg: &SessionConfig,
) -> Result<LoginOutcome, Error> {
    let mut m = InitiatorLogin::new(machine_config(cfg), &mut UrandomEntropy)?;
    // Login PDUs are never digested and at most 8 KiB each way (RFC 7143 default).
    let framing = Framing::default();
    let mut frames = wire::PduReader::new(framing);
    loop {
        let Some(req) = m.poll_transmit() else {
            return Err(Error::Protocol("login machine stalled".into()));
        };
        stream
            .write_all(&wire::encode(&Pdu::LoginRequest(req), &framing))
            .await?;
        let pdu = frames.read_pdu(stream).await?;
        let Pdu::LoginResponse(r) = pdu else {
            return Err(Error::Protocol(format!(
                "expected a Login Response, got opcode {:#04x}",
                pdu.opcode()
            )));
        };
        match m.handle_response(&r)? {
            Progress::Continue => {}
            Progress::Done(outcome) => return Ok(outcome),
        }
    }
}

/// CHAP challenges must be unpredictable; the kernel's CSPRNG is the only source we
/// have without adding a crate.
struct UrandomEntropy;

impl Entropy for UrandomEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(buf))
            .map_err(|e| EntropyError(format!("/dev/urandom: {e}")))
    }
}
