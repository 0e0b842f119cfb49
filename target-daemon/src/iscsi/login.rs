//! The login phase of one connection (RFC 7143 section 6.3): security negotiation (CHAP
//! or none), operational negotiation, and the move to the full feature phase.
//!
//! [`LoginMachine`] holds the state and turns each Login Request into Login Responses
//! without touching the socket; [`run`] is the thin loop that reads and writes for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ftss_proto::pdu::{Framing, LoginRequest, LoginResponse, Pdu, Stage};
use ftss_proto::serial::{CmdSn, StatSn};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tracing::{info, warn};

use super::connection::{ConnParams, FrameReader};
use super::session::{RegisterError, SessionKind, Shared, TargetEntry};
use super::transfer::XferLimits;
use crate::config::{ChapConfig, Config};
use crate::scsi::ItNexus;
use ftss_proto::chap::{ChapSecrets, ChapStep, ChapTarget};
use ftss_proto::negotiate::{Limits, Negotiator, Role, SessionType};

/// The whole login must finish within this time.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Login text one login may accumulate across continuation PDUs.
const LOGIN_TEXT_BYTES_MAX: usize = 64 << 10;
/// MaxRecvDataSegmentLength during login (RFC 7143 default).
const LOGIN_SEGMENT_MAX: u32 = 8192;
/// What we declare as our MaxRecvDataSegmentLength for the full feature phase.
const RECV_SEGMENT_MAX: u32 = 256 << 10;

/// Login status class/detail pairs (RFC 7143 11.13.5).
mod status {
    pub(super) const AUTH_FAILED: (u8, u8) = (0x02, 0x01);
    pub(super) const FORBIDDEN: (u8, u8) = (0x02, 0x02);
    pub(super) const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub(super) const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub(super) const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub(super) const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub(super) const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub(super) const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub(super) const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub(super) const OUT_OF_RESOURCES: (u8, u8) = (0x03, 0x02);
    pub(super) const SERVICE_UNAVAILABLE: (u8, u8) = (0x03, 0x01);
}

/// Why a login ended without a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("login did not finish within {LOGIN_TIMEOUT:?}")]
    Timeout,
    #[error("first PDU is not a Login Request")]
    NotLogin,
    #[error("undecodable PDU during login: {0}")]
    Decode(#[from] ftss_proto::pdu::DecodeError),
}

/// A login that reached the full feature phase.
pub(crate) struct LoginDone {
    pub(crate) kind: SessionKind,
    pub(crate) target_iqn: Option<String>,
    pub(crate) nexus: ItNexus,
    pub(crate) tsih: u16,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) params: ConnParams,
    pub(crate) exp_cmd_sn: CmdSn,
    pub(crate) stat_sn: StatSn,
}

/// Runs the login phase on a fresh connection.
pub(crate) async fn run(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    shared: &Arc<Shared>,
    _local: SocketAddr,
) -> Result<Option<LoginDone>, LoginError> {
    tokio::time::timeout(LOGIN_TIMEOUT, async {
        let mut m = LoginMachine::new(Arc::clone(shared));
        let framing = Framing {
            max_recv_data_segment: LOGIN_SEGMENT_MAX,
            ..Framing::default()
        };
        // Any framing error ends the login: nothing has been agreed that a Reject could
        // rely on.
        let mut frames = FrameReader::new(framing);
        loop {
            let frame = frames
                .read_frame(rd)
                .await?
                .map_err(ftss_proto::pdu::DecodeError::from)?;
            let Pdu::LoginRequest(req) = frame.decode()? else {
                return Err(LoginError::NotLogin);
            };
            let step = m.handle(&req);
            let mut out = BytesMut::new();
            for r in &m.take_output() {
                Pdu::LoginResponse(r.clone()).encode(&mut out, &Framing::default());
            }
            wr.write_all(&out).await?;
            match step {
                Step::Continue => {}
                Step::Failed => return Ok(None),
                Step::Done => return Ok(m.into_done()),
            }
        }
    })
    .await
    .map_err(|_| LoginError::Timeout)?
}

/// What the connection does after a Login Request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send the responses and read the next request.
    Continue,
    /// Send the responses; the connection enters the full feature phase.
    Done,
    /// Send the (failure) response and close.
    Failed,
}

enum Auth {
    /// Security stage not begun, or no CHAP required and none chosen yet.
    Pending,
    /// CHAP exchange under way.
    Chap(Box<ChapTarget>),
    /// Authenticated (or no authentication required and AuthMethod=None agreed).
    Done,
}

/// Login state for one connection.
pub(crate) struct LoginMachine {
    shared: Arc<Shared>,
    /// The configuration as the login began: a reload during it does not mix two
    /// configurations' ACLs and secrets in one decision.
    live: Arc<Config>,
    first: Option<LoginRequest>,
    /// Declarations owed in the first response of a normal session.
    leading_declarations: Vec<(String, String)>,
    stat_sn: StatSn,
    text_in: Vec<u8>,
    /// Response text not yet sent because it exceeded the initiator's segment size.
    text_out: Bytes,
    /// Transit bit and next stage of the answer `text_out` finishes.
    text_out_transit: (bool, Stage),
    initiator: String,
    session_type: SessionType,
    target: Option<Arc<TargetEntry>>,
    auth: Auth,
    negotiator: Option<Negotiator>,
    out: Vec<LoginResponse>,
    done: Option<LoginDone>,
}

impl LoginMachine {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            live: shared.in_force(),
            shared,
            first: None,
            leading_declarations: Vec::new(),
            stat_sn: StatSn(1),
            text_in: Vec::new(),
            text_out: Bytes::new(),
            text_out_transit: (false, Stage::Security),
            initiator: String::new(),
            session_type: SessionType::Normal,
            target: None,
            auth: Auth::Pending,
            negotiator: None,
            out: Vec::new(),
            done: None,
        }
    }

    /// Responses produced by the last [`handle`](Self::handle).
    pub(crate) fn take_output(&mut self) -> Vec<LoginResponse> {
        std::mem::take(&mut self.out)
    }

    /// The session, once [`Step::Done`] was returned.
    pub(crate) fn into_done(self) -> Option<LoginDone> {
        self.done
    }

    fn respond(&mut self, req: &LoginRequest, transit: bool, nsg: Stage, text: Bytes, cont: bool) {
        let first = self.first.as_ref().unwrap_or(req);
        let stat_sn = self.stat_sn;
        self.stat_sn = stat_sn.next();
        let window = self.shared.config.server.cmd_window;
        self.out.push(LoginResponse {
            transit,
            continue_: cont,
            csg: req.csg,
            nsg: if transit { nsg } else { req.csg },
            version_max: 0,
            version_active: 0,
            isid: first.isid,
            tsih: self.done.as_ref().map_or(0, |d| d.tsih),
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn.add(window - 1),
            status_class: 0,
            status_detail: 0,
            data: text,
        });
    }

    fn fail(&mut self, req: &LoginRequest, (class, detail): (u8, u8), why: &str) -> Step {
        warn!(initiator = %self.initiator, class, detail, "login refused: {why}");
        let first = self.first.as_ref().unwrap_or(req);
        let stat_sn = self.stat_sn;
        self.out.push(LoginResponse {
            transit: false,
            continue_: false,
            csg: req.csg,
            nsg: req.csg,
            version_max: 0,
            version_active: 0,
            isid: first.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn,
            exp_cmd_sn: req.cmd_sn,
            max_cmd_sn: req.cmd_sn,
            status_class: class,
            status_detail: detail,
            data: Bytes::new(),
        });
        Step::Failed
    }

    /// Handles one Login Request.
    pub(crate) fn handle(&mut self, req: &LoginRequest) -> Step {
        if self.first.is_none() {
            if req.version_min > 0 {
                return self.fail(req, status::UNSUPPORTED_VERSION, "version-min above 0");
            }
            self.first = Some(req.clone());
        }
        if req.csg == Stage::FullFeature {
            return self.fail(
                req,
                status::INVALID_DURING_LOGIN,
                "CSG is full feature phase",
            );
        }
        // Our own long answer in progress: the initiator sends empty requests for the rest.
        if !self.text_out.is_empty() {
            let rest = std::mem::take(&mut self.text_out);
            let (transit, nsg) = self.text_out_transit;
            self.send_text(req, rest, transit, nsg);
            return if self.done.is_some() && self.text_out.is_empty() {
                Step::Done
            } else {
                Step::Continue
            };
        }
        if self.text_in.len() + req.data.len() > LOGIN_TEXT_BYTES_MAX {
            return self.fail(req, status::INITIATOR_ERROR, "login text too long");
        }
        self.text_in.extend_from_slice(&req.data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response, no transit.
            self.respond(req, false, req.csg, Bytes::new(), false);
            return Step::Continue;
        }
        let text = std::mem::take(&mut self.text_in);
        let pairs = match ftss_proto::text::parse(&text) {
            Ok(p) => p,
            Err(e) => {
                return self.fail(
                    req,
                    status::INITIATOR_ERROR,
                    &format!("bad login text: {e}"),
                )
            }
        };
        if self.negotiator.is_none() {
            if let Some(step) = self.leading(req, &pairs) {
                return step;
            }
        }
        let mut answer: Vec<(String, String)> = std::mem::take(&mut self.leading_declarations);
        let mut operational: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias" => {}
                "AuthMethod" => match self.choose_auth(&v) {
                    Some(m) => answer.push((k, m.to_owned())),
                    None => return self.fail(req, status::AUTH_FAILED, "no acceptable AuthMethod"),
                },
                _ if k.starts_with("CHAP_") => operational.push((k, v)),
                _ => operational.push((k, v)),
            }
        }
        // CHAP keys go to the CHAP machine; the rest to the operational negotiator.
        let (chap_keys, op_keys): (Vec<_>, Vec<_>) = operational
            .into_iter()
            .partition(|(k, _)| k.starts_with("CHAP_"));
        if req.csg == Stage::Security {
            if !chap_keys.is_empty() {
                let Auth::Chap(chap) = &mut self.auth else {
                    return self.fail(
                        req,
                        status::AUTH_FAILED,
                        "CHAP keys without AuthMethod=CHAP",
                    );
                };
                match chap.handle(&chap_keys) {
                    Ok(ChapStep::Send(keys)) => answer.extend(keys),
                    Ok(ChapStep::Done(keys)) => {
                        answer.extend(keys);
                        self.auth = Auth::Done;
                        info!(initiator = %self.initiator, "CHAP authentication succeeded");
                    }
                    Err(e) => return self.fail(req, status::AUTH_FAILED, &format!("CHAP: {e}")),
                }
            }
        } else if !chap_keys.is_empty() {
            return self.fail(
                req,
                status::INITIATOR_ERROR,
                "CHAP keys outside the security stage",
            );
        }
        if req.csg == Stage::Operational && !matches!(self.auth, Auth::Done) {
            if self.auth_required() {
                return self.fail(req, status::AUTH_FAILED, "authentication required");
            }
            self.auth = Auth::Done;
        }
        if !op_keys.is_empty() || req.csg == Stage::Operational {
            let neg = self
                .negotiator
                .as_mut()
                .expect("set up by the leading request");
            match neg.respond(&op_keys) {
                Ok(keys) => answer.extend(keys),
                Err(e) => {
                    let st = e.login_status();
                    return self.fail(req, st, &format!("negotiation: {e}"));
                }
            }
        }
        // Transit only when the initiator asks and the current stage is complete.
        let mut transit = req.transit;
        if transit && req.csg == Stage::Security && !matches!(self.auth, Auth::Done) {
            transit = false;
        }
        let mut nsg = req.nsg;
        if transit && nsg == Stage::FullFeature {
            if let Some(neg) = self.negotiator.as_mut() {
                // Keys we must still declare (e.g. our MaxRecvDataSegmentLength).
                answer.extend(neg.pending_declarations());
            }
            if let Err(st) = self.enter_full_feature(req) {
                return self.fail(req, st, "cannot create the session");
            }
        } else if transit && nsg == Stage::Security {
            transit = false;
            nsg = req.csg;
        }
        let mut out = Vec::new();
        ftss_proto::text::encode(&answer, &mut out);
        self.send_text(req, Bytes::from(out), transit, nsg);
        if self.done.is_some() && self.text_out.is_empty() {
            Step::Done
        } else {
            // Not done, or the final answer did not fit and goes out in continuations.
            Step::Continue
        }
    }

    fn send_text(&mut self, req: &LoginRequest, text: Bytes, transit: bool, nsg: Stage) {
        let seg = LOGIN_SEGMENT_MAX as usize;
        if text.len() > seg {
            self.text_out = text.slice(seg..);
            self.text_out_transit = (transit, nsg);
            // A response with C=1 must not transit (RFC 7143 11.13.2); the last part of
            // the answer carries the transit.
            self.respond(req, false, nsg, text.slice(..seg), true);
        } else {
            self.respond(req, transit, nsg, text, false);
        }
    }

    /// Reads the session-wide keys from the leading request and checks the target.
    fn leading(&mut self, req: &LoginRequest, pairs: &[(String, String)]) -> Option<Step> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(initiator) = get("InitiatorName") else {
            return Some(self.fail(req, status::MISSING_PARAMETER, "no InitiatorName"));
        };
        self.initiator = initiator.to_owned();
        self.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Some(self.fail(req, (0x02, 0x09), "unknown SessionType")),
        };
        if req.tsih != 0 {
            // MaxConnections is 1: a connection cannot join an existing session.
            let st = if self.shared.registry.contains(req.tsih) {
                status::TOO_MANY_CONNECTIONS
            } else {
                status::SESSION_DOES_NOT_EXIST
            };
            return Some(self.fail(req, st, "adding a connection to a session"));
        }
        if self.session_type == SessionType::Normal {
            let Some(name) = get("TargetName") else {
                return Some(self.fail(req, status::MISSING_PARAMETER, "no TargetName"));
            };
            let Some(t) = self.shared.target(name).cloned() else {
                return Some(self.fail(req, status::NOT_FOUND, "unknown target"));
            };
            if !self.live.target_allows(&t.iqn, initiator) {
                return Some(self.fail(
                    req,
                    status::FORBIDDEN,
                    "initiator not in the target's ACL",
                ));
            }
            // RFC 7143 13.9: the first response of a normal session names the portal
            // group; the alias helps administrators.
            self.leading_declarations
                .push(("TargetPortalGroupTag".into(), "1".into()));
            if let Some(a) = &t.alias {
                self.leading_declarations
                    .push(("TargetAlias".into(), a.clone()));
            }
            self.target = Some(t);
        }
        self.negotiator = Some(Negotiator::new(
            Role::Target,
            self.session_type,
            true,
            limits(),
        ));
        None
    }

    /// The CHAP credentials this login must prove. An initiator with its own
    /// (`[node.chap]`) uses them whatever it logs in to: its name is then authenticated,
    /// not just asserted, and no other initiator can log in under it without the secret.
    fn chap_config(&self) -> Option<&ChapConfig> {
        if let Some(c) = self.live.node_chap(&self.initiator) {
            return Some(c);
        }
        match self.session_type {
            SessionType::Discovery => self.live.server.discovery_chap.as_ref(),
            SessionType::Normal => self
                .target
                .as_ref()
                .and_then(|t| self.live.target(&t.iqn))
                .and_then(|t| t.chap.as_ref()),
        }
    }

    fn auth_required(&self) -> bool {
        self.chap_config().is_some()
    }

    /// Picks our AuthMethod from the initiator's list; sets up CHAP when chosen.
    fn choose_auth(&mut self, offered: &str) -> Option<&'static str> {
        let list: Vec<&str> = offered.split(',').collect();
        match self.chap_config().cloned() {
            Some(c) if list.contains(&"CHAP") => {
                let mut challenge = [0u8; 32];
                random_bytes(&mut challenge);
                let mut id = [0u8; 1];
                random_bytes(&mut id);
                let secrets = ChapSecrets {
                    username: c.username,
                    secret: c.secret.into_bytes(),
                    mutual: c
                        .mutual_username
                        .zip(c.mutual_secret)
                        .map(|(u, s)| (u, s.into_bytes())),
                };
                self.auth = Auth::Chap(Box::new(ChapTarget::new(
                    secrets,
                    id[0],
                    challenge.to_vec(),
                )));
                Some("CHAP")
            }
            Some(_) => None,
            None if list.contains(&"None") => {
                self.auth = Auth::Done;
                Some("None")
            }
            None => None,
        }
    }

    fn enter_full_feature(&mut self, req: &LoginRequest) -> Result<(), (u8, u8)> {
        let first = self.first.clone().unwrap_or_else(|| req.clone());
        let nexus_id = self.shared.next_nexus_id();
        let target_iqn = self.target.as_ref().map(|t| t.iqn.clone());
        let (tsih, shutdown) = self
            .shared
            .registry
            .register(
                &self.initiator,
                first.isid,
                target_iqn.as_deref(),
                nexus_id,
                self.shared.config.server.sessions_max,
            )
            .map_err(|e| match e {
                RegisterError::TooMany => status::OUT_OF_RESOURCES,
                RegisterError::ShuttingDown => status::SERVICE_UNAVAILABLE,
            })?;
        let neg = self
            .negotiator
            .as_ref()
            .expect("set up by the leading request");
        let p = neg.params();
        let params = ConnParams {
            framing: Framing {
                header_digest: p.header_digest,
                data_digest: p.data_digest,
                max_recv_data_segment: RECV_SEGMENT_MAX,
            },
            xfer: XferLimits {
                send_segment_max: p.peer_max_recv_data_segment_length,
                burst_max: p.max_burst_length,
                first_burst: p.first_burst_length,
                initial_r2t: p.initial_r2t,
                immediate_data: p.immediate_data,
                outstanding_r2t_max: p.max_outstanding_r2t,
            },
        };
        let kind = match &self.target {
            Some(t) => SessionKind::Normal(Arc::clone(&t.scsi)),
            None => SessionKind::Discovery,
        };
        info!(initiator = %self.initiator, target = ?target_iqn, tsih, "login complete");
        self.done = Some(LoginDone {
            kind,
            target_iqn,
            nexus: ItNexus {
                id: nexus_id,
                initiator_name: Arc::from(self.initiator.as_str()),
                isid: first.isid,
                tpgt: 1,
            },
            tsih,
            shutdown,
            params,
            exp_cmd_sn: req.cmd_sn,
            // The next response after the last login response.
            stat_sn: self.stat_sn.next(),
        });
        Ok(())
    }
}

/// Our side of the operational negotiation.
fn limits() -> Limits {
    Limits {
        max_recv_data_segment_length: RECV_SEGMENT_MAX,
        max_burst_length: 1 << 20,
        first_burst_length: 256 << 10,
        max_outstanding_r2t: 16,
        ..Limits::default()
    }
}

/// Fills `buf` from the kernel's CSPRNG (CHAP challenges must be unpredictable).
fn random_bytes(buf: &mut [u8]) {
    use std::io::Read;
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if ok.is_err() {
        // No /dev/urandom: fall back to the clock and the address of the buffer, and say so;
        // CHAP stays correct, only weaker against an active attacker.
        warn!("/dev/urandom unavailable: CHAP challenges are weaker");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(151);
        }
    }
}
