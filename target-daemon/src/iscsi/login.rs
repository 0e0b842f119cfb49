//! The login phase of one connection (RFC 7143 section 6.3): security negotiation (CHAP
//! or none), operational negotiation, and the move to the full feature phase.
//!
//! [`LoginMachine`] holds the state and turns each Login Request into Login Responses
//! without touching the socket, the clock or the kernel's randomness: `now` and an
//! [`Entropy`] come in with each call. It does not register the session either: when a
//! login may complete it returns [`Step::Register`], and the shell registers the session
//! and tells it the result ([`LoginMachine::registered`]), which decides the final
//! response. [`run`] is the thin loop that reads, writes and registers for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ftss_proto::entropy::Entropy;
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

mod os_entropy;
#[cfg(test)]
mod pair;
#[cfg(test)]
mod rfc7143;

use os_entropy::OsEntropy;

/// The whole login must finish within this time.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Login text one login may accumulate across continuation PDUs.
const LOGIN_TEXT_BYTES_MAX: usize = 64 << 10;
/// MaxRecvDataSegmentLength during login (RFC 7143 default).
const LOGIN_SEGMENT_MAX: u32 = 8192;
/// What we declare as our MaxRecvDataSegmentLength for the full feature phase.
const RECV_SEGMENT_MAX: u32 = 256 << 10;
/// Bytes of a CHAP challenge we send (RFC 7143 12.1.3 asks for at least as long as the
/// digest; 32 covers SHA-256).
const CHAP_CHALLENGE_BYTES: usize = 32;

/// Login status class/detail pairs (RFC 7143 11.13.5).
mod status {
    pub(super) const AUTH_FAILED: (u8, u8) = (0x02, 0x01);
    pub(super) const FORBIDDEN: (u8, u8) = (0x02, 0x02);
    pub(super) const NOT_FOUND: (u8, u8) = (0x02, 0x03);
    pub(super) const UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
    pub(super) const TOO_MANY_CONNECTIONS: (u8, u8) = (0x02, 0x06);
    pub(super) const MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
    pub(super) const SESSION_TYPE_UNSUPPORTED: (u8, u8) = (0x02, 0x09);
    pub(super) const SESSION_DOES_NOT_EXIST: (u8, u8) = (0x02, 0x0a);
    pub(super) const INVALID_DURING_LOGIN: (u8, u8) = (0x02, 0x0b);
    pub(super) const INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
    pub(super) const TARGET_ERROR: (u8, u8) = (0x03, 0x00);
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

/// A login that reached the full feature phase, with its session registered.
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

/// What the machine accepted: everything the session needs except what registering it
/// gives (the TSIH, the shutdown signal, the nexus id).
pub(crate) struct Accepted {
    pub(crate) kind: SessionKind,
    pub(crate) target_iqn: Option<String>,
    pub(crate) initiator: Arc<str>,
    pub(crate) isid: [u8; 6],
    pub(crate) params: ConnParams,
    pub(crate) exp_cmd_sn: CmdSn,
    /// The StatSN of the first response after the final login response.
    pub(crate) stat_sn: StatSn,
}

/// Runs the login phase on a fresh connection.
pub(crate) async fn run(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    shared: &Arc<Shared>,
    _local: SocketAddr,
) -> Result<Option<LoginDone>, LoginError> {
    let mut m = LoginMachine::new(Arc::clone(shared), Instant::now());
    let deadline = tokio::time::Instant::from_std(m.poll_timeout());
    let framing = Framing {
        max_recv_data_segment: LOGIN_SEGMENT_MAX,
        ..Framing::default()
    };
    let io = async {
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
            let mut done = None;
            let step = match m.handle(&req, Instant::now(), &mut OsEntropy) {
                Step::Register(acc) => {
                    let (step, d) = register(shared, &mut m, acc);
                    done = d;
                    step
                }
                step => step,
            };
            let mut out = BytesMut::new();
            for r in &m.take_output() {
                Pdu::LoginResponse(r.clone()).encode(&mut out, &Framing::default());
            }
            wr.write_all(&out).await?;
            match step {
                Step::Continue => {}
                Step::FullFeature => return Ok(done),
                Step::Failed | Step::Register(_) => return Ok(None),
                Step::TimedOut => return Err(LoginError::Timeout),
            }
        }
    };
    tokio::time::timeout_at(deadline, io)
        .await
        .map_err(|_| LoginError::Timeout)?
}

/// Registers the session `acc` describes (reinstating an older one with the same
/// initiator, ISID and target, RFC 7143 6.3.5) and tells the machine the outcome, which
/// prepares the final response or the failure response. The session comes back only when
/// the final response says the login succeeded.
pub(crate) fn register(
    shared: &Shared,
    m: &mut LoginMachine,
    acc: Accepted,
) -> (Step, Option<LoginDone>) {
    let nexus_id = shared.next_nexus_id();
    let reg = shared.registry.register(
        &acc.initiator,
        acc.isid,
        acc.target_iqn.as_deref(),
        nexus_id,
        shared.config.server.sessions_max,
    );
    match reg {
        Ok((tsih, shutdown)) => {
            info!(initiator = %acc.initiator, target = ?acc.target_iqn, tsih, "login complete");
            let step = m.registered(Ok(tsih));
            let done = LoginDone {
                kind: acc.kind,
                target_iqn: acc.target_iqn,
                nexus: ItNexus {
                    id: nexus_id,
                    initiator_name: acc.initiator,
                    isid: acc.isid,
                    tpgt: 1,
                },
                tsih,
                shutdown,
                params: acc.params,
                exp_cmd_sn: acc.exp_cmd_sn,
                stat_sn: acc.stat_sn,
            };
            (step, Some(done))
        }
        Err(e) => (m.registered(Err(e)), None),
    }
}

/// What the connection does after a Login Request.
#[must_use]
pub(crate) enum Step {
    /// Send the responses and read the next request.
    Continue,
    /// The login may complete: register the session (see [`register`]) and pass the
    /// result to [`LoginMachine::registered`], which prepares the final response.
    Register(Accepted),
    /// Send the responses; the connection enters the full feature phase.
    FullFeature,
    /// Send the (failure) response and close.
    Failed,
    /// The login took too long: close without an answer.
    TimedOut,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Continue => "Continue",
            Step::Register(_) => "Register",
            Step::FullFeature => "FullFeature",
            Step::Failed => "Failed",
            Step::TimedOut => "TimedOut",
        })
    }
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
    /// The request the final response answers and its text, held while the session is
    /// registered.
    pending_final: Option<(LoginRequest, Bytes)>,
    /// Set by a successful registration; only the final response carries it (RFC 7143
    /// 11.13.4).
    tsih: u16,
    deadline: Instant,
    /// Accepted, failed or timed out: nothing more is answered.
    over: bool,
}

impl LoginMachine {
    /// A login that began at `now`.
    pub(crate) fn new(shared: Arc<Shared>, now: Instant) -> Self {
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
            pending_final: None,
            tsih: 0,
            deadline: now + LOGIN_TIMEOUT,
            over: false,
        }
    }

    /// When the login times out.
    pub(crate) fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// Whether the login has run out of time at `now`; once it has, the login is over.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        if now >= self.deadline && !self.over {
            warn!(initiator = %self.initiator, "login did not finish within {LOGIN_TIMEOUT:?}");
            self.over = true;
            self.pending_final = None;
            return true;
        }
        false
    }

    /// Responses produced by the last [`handle`](Self::handle).
    pub(crate) fn take_output(&mut self) -> Vec<LoginResponse> {
        std::mem::take(&mut self.out)
    }

    /// The outcome of registering the session [`Step::Register`] asked for: the final
    /// response with the TSIH ([`Step::FullFeature`]), or a failure response
    /// ([`Step::Failed`]).
    pub(crate) fn registered(&mut self, result: Result<u16, RegisterError>) -> Step {
        let Some((req, text)) = self.pending_final.take() else {
            // Nothing was accepted: a shell bug, not the initiator's; refuse rather than
            // enter the full feature phase.
            self.over = true;
            return Step::Failed;
        };
        match result {
            Ok(tsih) => {
                self.tsih = tsih;
                self.respond(&req, true, Stage::FullFeature, text, false);
                Step::FullFeature
            }
            Err(e) => {
                let st = match e {
                    RegisterError::TooMany => status::OUT_OF_RESOURCES,
                    RegisterError::ShuttingDown => status::SERVICE_UNAVAILABLE,
                };
                self.fail(&req, st, "cannot create the session")
            }
        }
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
            tsih: self.tsih,
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
        self.over = true;
        self.pending_final = None;
        Step::Failed
    }

    /// Handles one Login Request that arrived at `now`; `rng` supplies CHAP challenges.
    pub(crate) fn handle(
        &mut self,
        req: &LoginRequest,
        now: Instant,
        rng: &mut dyn Entropy,
    ) -> Step {
        if self.handle_timeout(now) {
            return Step::TimedOut;
        }
        if self.over {
            // A request after the end (or while the session is being registered): the
            // shell has closed or is about to; answer nothing twice.
            return Step::Failed;
        }
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
            return self.send_text(req, rest, transit, nsg);
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
                "AuthMethod" => match self.choose_auth(&v, rng) {
                    Ok(Some(m)) => answer.push((k, m.to_owned())),
                    Ok(None) => {
                        return self.fail(req, status::AUTH_FAILED, "no acceptable AuthMethod")
                    }
                    Err(e) => {
                        return self.fail(
                            req,
                            status::TARGET_ERROR,
                            &format!("CHAP challenge: {e}"),
                        )
                    }
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
        } else if transit && nsg == Stage::Security {
            transit = false;
            nsg = req.csg;
        }
        let mut out = Vec::new();
        ftss_proto::text::encode(&answer, &mut out);
        self.send_text(req, Bytes::from(out), transit, nsg)
    }

    /// Answers `req` with `text`, in continuations when it exceeds the segment size. The
    /// final response of a successful login is held until the session is registered.
    fn send_text(&mut self, req: &LoginRequest, text: Bytes, transit: bool, nsg: Stage) -> Step {
        let seg = LOGIN_SEGMENT_MAX as usize;
        if text.len() > seg {
            self.text_out = text.slice(seg..);
            self.text_out_transit = (transit, nsg);
            // A response with C=1 must not transit (RFC 7143 11.13.2); the last part of
            // the answer carries the transit.
            self.respond(req, false, nsg, text.slice(..seg), true);
            return Step::Continue;
        }
        if transit && nsg == Stage::FullFeature {
            return match self.accepted(req) {
                Some(acc) => {
                    self.pending_final = Some((req.clone(), text));
                    self.over = true;
                    Step::Register(acc)
                }
                None => self.fail(req, status::TARGET_ERROR, "no negotiation to finish"),
            };
        }
        self.respond(req, transit, nsg, text, false);
        Step::Continue
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
            Some(_) => {
                return Some(self.fail(
                    req,
                    status::SESSION_TYPE_UNSUPPORTED,
                    "unknown SessionType",
                ))
            }
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

    /// Picks our AuthMethod from the initiator's list; sets up CHAP when chosen. Fails
    /// only when no randomness is to be had for the challenge.
    fn choose_auth(
        &mut self,
        offered: &str,
        rng: &mut dyn Entropy,
    ) -> Result<Option<&'static str>, ftss_proto::entropy::EntropyError> {
        let list: Vec<&str> = offered.split(',').collect();
        Ok(match self.chap_config().cloned() {
            Some(c) if list.contains(&"CHAP") => {
                let mut challenge = [0u8; CHAP_CHALLENGE_BYTES];
                rng.fill(&mut challenge)?;
                let mut id = [0u8; 1];
                rng.fill(&mut id)?;
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
        })
    }

    /// What a login that enters the full feature phase with `req` leaves the session.
    fn accepted(&self, req: &LoginRequest) -> Option<Accepted> {
        let first = self.first.as_ref().unwrap_or(req);
        let p = self.negotiator.as_ref()?.params();
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
        Some(Accepted {
            kind,
            target_iqn: self.target.as_ref().map(|t| t.iqn.clone()),
            initiator: Arc::from(self.initiator.as_str()),
            isid: first.isid,
            params,
            exp_cmd_sn: req.cmd_sn,
            // The final response takes the current StatSN; the connection goes on after it.
            stat_sn: self.stat_sn.next(),
        })
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
