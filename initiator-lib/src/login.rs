//! The login phase (RFC 7143 section 6.3) on a fresh connection: the security stage with
//! CHAP when credentials are configured, then operational negotiation, then the full
//! feature phase.

use bytes::Bytes;
use ftss_proto::chap::ChapInitiator;
use ftss_proto::negotiate::{Limits, Negotiator, Params, Role, SessionType};
use ftss_proto::pdu::{Framing, Itt, LoginRequest, LoginResponse, Pdu, Stage};
use ftss_proto::serial::{CmdSn, StatSn};
use ftss_proto::text;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{Digest, SessionConfig};
use crate::wire;
use crate::Error;

/// The segment size both sides must respect until the login ends (RFC 7143 default).
const LOGIN_SEGMENT: usize = 8192;
/// What we declare we can receive in the full feature phase.
pub(crate) const RECV_SEGMENT: u32 = 262_144;
/// Login text we accept in one response across continuations.
const LOGIN_TEXT_MAX: usize = 64 << 10;
/// A login that takes more round trips than this is going in circles.
const ROUNDS_MAX: usize = 16;
/// The first CmdSN of the session; any value works, 1 reads well in traces.
const INITIAL_CMD_SN: CmdSn = CmdSn(1);

/// What the rest of the session needs from the login.
pub(crate) struct LoginOutcome {
    pub(crate) params: Params,
    pub(crate) tsih: u16,
    pub(crate) cmd_sn: CmdSn,
    pub(crate) exp_cmd_sn: CmdSn,
    pub(crate) max_cmd_sn: CmdSn,
    pub(crate) exp_stat_sn: StatSn,
}

/// Where the CHAP exchange stands.
enum Chap {
    /// No CHAP configured: the login starts in the operational stage.
    Off,
    /// AuthMethod=CHAP offered.
    MethodOffered(ChapInitiator),
    /// CHAP_A offered.
    AlgorithmOffered(ChapInitiator),
    /// CHAP_N/CHAP_R sent (and our challenge, for mutual CHAP).
    Responded(ChapInitiator),
    /// Authenticated both ways as configured.
    Done,
}

struct Login<'a> {
    stream: &'a mut TcpStream,
    cfg: &'a SessionConfig,
    framing: Framing,
    frames: wire::PduReader,
    exp_stat_sn: StatSn,
    tsih: u16,
    last: Option<LoginResponse>,
}

fn digests(d: Digest) -> Vec<String> {
    match d {
        Digest::None => vec!["None".into(), "CRC32C".into()],
        Digest::Crc32c => vec!["CRC32C".into(), "None".into()],
    }
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

/// Runs the whole login on `stream`.
pub(crate) async fn login(
    stream: &mut TcpStream,
    cfg: &SessionConfig,
) -> Result<LoginOutcome, Error> {
    let session_type = if cfg.target_name.is_some() {
        SessionType::Normal
    } else {
        SessionType::Discovery
    };
    let limits = Limits {
        max_recv_data_segment_length: RECV_SEGMENT,
        max_burst_length: 1 << 20,
        first_burst_length: 256 << 10,
        immediate_data: cfg.immediate_data,
        initial_r2t: false,
        header_digest: digests(cfg.header_digest),
        data_digest: digests(cfg.data_digest),
        ..Limits::default()
    };
    let mut neg = Negotiator::new(Role::Initiator, session_type, true, limits);
    let mut keys = vec![pair("InitiatorName", &cfg.initiator_name)];
    match &cfg.target_name {
        Some(t) => keys.extend([pair("TargetName", t), pair("SessionType", "Normal")]),
        None => keys.push(pair("SessionType", "Discovery")),
    }
    let (mut csg, mut chap) = match &cfg.chap {
        Some(c) => {
            let mutual = match &c.mutual {
                Some(m) => {
                    let mut r = [0u8; 33];
                    random_bytes(&mut r)?;
                    Some((
                        m.target_username.clone(),
                        m.secret.clone(),
                        r[0],
                        r[1..].to_vec(),
                    ))
                }
                None => None,
            };
            keys.push(pair("AuthMethod", "CHAP"));
            let ini = ChapInitiator::new(c.username.clone(), c.secret.clone(), mutual);
            (Stage::Security, Chap::MethodOffered(ini))
        }
        None => {
            keys.extend(neg.offer());
            (Stage::Operational, Chap::Off)
        }
    };
    let mut l = Login {
        stream,
        cfg,
        framing: Framing::default(),
        frames: wire::PduReader::new(Framing::default()),
        exp_stat_sn: StatSn(0),
        tsih: 0,
        last: None,
    };
    for _ in 0..ROUNDS_MAX {
        let (transit, nsg) = match csg {
            Stage::Security => (matches!(chap, Chap::Responded(_)), Stage::Operational),
            _ => (true, Stage::FullFeature),
        };
        let (resp, answers) = l.exchange(csg, transit, nsg, &keys).await?;
        let moved = resp.transit && resp.nsg != csg;
        if csg == Stage::Security {
            if let Some(m) = get(&answers, "AuthMethod") {
                if m != "CHAP" {
                    return Err(Error::Auth(format!("target chose AuthMethod={m}")));
                }
            }
            chap = match chap {
                Chap::MethodOffered(ini) => {
                    if get(&answers, "AuthMethod").is_none() {
                        return Err(Error::Auth("target did not answer AuthMethod".into()));
                    }
                    keys = ini.offer();
                    Chap::AlgorithmOffered(ini)
                }
                Chap::AlgorithmOffered(mut ini) => {
                    keys = ini.respond(&answers)?;
                    Chap::Responded(ini)
                }
                Chap::Responded(ini) if moved => {
                    // The target proves itself (mutual CHAP) in the response that ends
                    // the security stage; a target that skips the proof fails here.
                    ini.verify(&answers)?;
                    Chap::Done
                }
                other => {
                    keys = Vec::new();
                    other
                }
            };
            if moved {
                if !matches!(chap, Chap::Done) {
                    return Err(Error::Auth(
                        "target left the security stage before CHAP completed".into(),
                    ));
                }
                if resp.nsg != Stage::Operational {
                    return Err(Error::Protocol(
                        "target skipped the operational stage".into(),
                    ));
                }
                csg = Stage::Operational;
                keys = neg.offer();
            }
        } else {
            let more = neg.handle_answers(&answers)?;
            if moved && resp.nsg == Stage::FullFeature {
                let p = neg.params().clone();
                return Ok(l.finish(p));
            }
            keys = more;
        }
    }
    Err(Error::Protocol(format!(
        "login did not finish in {ROUNDS_MAX} round trips"
    )))
}

impl Login<'_> {
    /// Sends `keys` in as many Login Requests as the segment size needs (C bit) and
    /// collects the target's answer across its continuation responses.
    async fn exchange(
        &mut self,
        csg: Stage,
        transit: bool,
        nsg: Stage,
        keys: &[(String, String)],
    ) -> Result<(LoginResponse, Vec<(String, String)>), Error> {
        let mut out = Vec::new();
        text::encode(keys, &mut out);
        let chunks = text::split(&out, LOGIN_SEGMENT);
        let n = chunks.len();
        let mut resp = None;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let last = i + 1 == n;
            // T and C are never both set in a request (RFC 7143 11.12.2).
            let t = last && transit;
            let r = self
                .round(csg, t, nsg, !last, Bytes::copy_from_slice(chunk))
                .await?;
            if !last && (r.continue_ || !r.data.is_empty()) {
                return Err(Error::Protocol(
                    "target answered a partial login text with keys".into(),
                ));
            }
            resp = Some(r);
        }
        let mut resp = resp.ok_or_else(|| Error::Protocol("empty login exchange".into()))?;
        let mut text_in = resp.data.to_vec();
        while resp.continue_ {
            // The target's answer continues: empty requests pull the rest.
            resp = self.round(csg, false, csg, false, Bytes::new()).await?;
            text_in.extend_from_slice(&resp.data);
            if text_in.len() > LOGIN_TEXT_MAX {
                return Err(Error::Protocol("login response text too long".into()));
            }
        }
        let pairs = text::parse(&text_in)?;
        Ok((resp, pairs))
    }

    /// One Login Request and its Login Response.
    async fn round(
        &mut self,
        csg: Stage,
        transit: bool,
        nsg: Stage,
        continue_: bool,
        data: Bytes,
    ) -> Result<LoginResponse, Error> {
        let req = Pdu::LoginRequest(LoginRequest {
            transit,
            continue_,
            csg,
            nsg: if transit { nsg } else { csg },
            version_max: 0,
            version_min: 0,
            isid: self.cfg.isid,
            tsih: self.tsih,
            itt: Itt(0),
            cid: 1,
            cmd_sn: INITIAL_CMD_SN,
            exp_stat_sn: self.exp_stat_sn,
            data,
        });
        self.stream
            .write_all(&wire::encode(&req, &self.framing))
            .await?;
        let pdu = self.frames.read_pdu(self.stream).await?;
        let Pdu::LoginResponse(r) = pdu else {
            return Err(Error::Protocol(format!(
                "expected a Login Response, got opcode {:#04x}",
                pdu.opcode()
            )));
        };
        if r.status_class != 0 {
            return Err(Error::LoginRejected {
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.isid != self.cfg.isid {
            return Err(Error::Protocol("login response for another ISID".into()));
        }
        if r.version_active != 0 {
            return Err(Error::Protocol(format!(
                "unsupported iSCSI version {}",
                r.version_active
            )));
        }
        self.exp_stat_sn = r.stat_sn.next();
        self.tsih = r.tsih;
        self.last = Some(r.clone());
        Ok(r)
    }

    fn finish(self, params: Params) -> LoginOutcome {
        let (exp_cmd_sn, max_cmd_sn) = self
            .last
            .as_ref()
            .map_or((INITIAL_CMD_SN, INITIAL_CMD_SN), |r| {
                (r.exp_cmd_sn, r.max_cmd_sn)
            });
        LoginOutcome {
            params,
            tsih: self.tsih,
            // Login requests do not consume CmdSNs: the first command reuses it.
            cmd_sn: INITIAL_CMD_SN,
            exp_cmd_sn,
            max_cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        }
    }
}

/// CHAP challenges must be unpredictable; the kernel's CSPRNG is the only source we
/// have without adding a crate.
fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}
