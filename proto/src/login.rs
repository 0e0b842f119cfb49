//! The initiator's side of the login phase (RFC 7143 section 6.3) as a state machine:
//! the security stage with CHAP when credentials are given, then operational
//! negotiation, then the full feature phase.
//!
//! [`InitiatorLogin`] is polled for Login Requests ([`InitiatorLogin::poll_transmit`])
//! and fed the target's Login Responses ([`InitiatorLogin::handle_response`]); it reads
//! no socket and no clock, and takes its randomness (the mutual CHAP challenge) from the
//! caller. Long texts go out in several requests (C bit) and long answers are pulled in
//! with empty requests.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::chap::{ChapError, ChapInitiator};
use crate::entropy::{Entropy, EntropyError};
use crate::negotiate::{Limits, NegotiationError, Negotiator, Params, Role, SessionType};
use crate::pdu::{Itt, LoginRequest, LoginResponse, Stage};
use crate::serial::{CmdSn, StatSn};
use crate::text::{self, TextError};

/// The segment size both sides must respect until the login ends (RFC 7143 default).
pub const LOGIN_SEGMENT_BYTES: usize = 8192;
/// Login text we accept in one answer across continuations.
const LOGIN_TEXT_BYTES_MAX: usize = 64 << 10;
/// A login that takes more exchanges than this is going in circles.
const EXCHANGES_MAX: usize = 16;
/// The first CmdSN of the session; any value works, 1 reads well in traces.
const INITIAL_CMD_SN: CmdSn = CmdSn(1);
/// Bytes of the mutual CHAP challenge we send.
const CHALLENGE_BYTES: usize = 32;

/// Our CHAP credentials.
#[derive(Clone, Debug)]
pub struct ChapCredentials {
    /// CHAP_N we send.
    pub username: String,
    /// The secret we prove.
    pub secret: Vec<u8>,
    /// For mutual CHAP: the name the target must answer with and the secret it proves.
    pub mutual: Option<(String, Vec<u8>)>,
}

/// What the initiator asks for.
#[derive(Clone, Debug)]
pub struct InitiatorConfig {
    /// InitiatorName.
    pub initiator_name: String,
    /// TargetName; `None` for a discovery session.
    pub target_name: Option<String>,
    /// ISID of the session.
    pub isid: [u8; 6],
    /// CHAP credentials; `None` logs in without authentication.
    pub chap: Option<ChapCredentials>,
    /// Our side of the operational negotiation.
    pub limits: Limits,
}

/// Why the login failed on the initiator's side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitiatorLoginError {
    /// The target ended the login with a non-zero status (RFC 7143 11.13.5).
    #[error("login rejected: status class {class:#04x} detail {detail:#04x}")]
    Rejected {
        /// Status-Class.
        class: u8,
        /// Status-Detail.
        detail: u8,
    },
    /// CHAP failed on our side: the target did not choose it, or failed to prove itself.
    #[error("authentication: {0}")]
    Auth(String),
    /// The CHAP exchange broke (malformed keys, reflected challenge, wrong answer).
    #[error("authentication: {0}")]
    Chap(#[from] ChapError),
    /// The target's answers to our operational keys are unacceptable.
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    /// Login text that does not parse.
    #[error("bad text keys: {0}")]
    Text(#[from] TextError),
    /// The target broke the login protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No randomness for the mutual CHAP challenge.
    #[error(transparent)]
    Entropy(#[from] EntropyError),
}

/// What the rest of the session needs from the login.
#[derive(Clone, Debug)]
pub struct LoginOutcome {
    /// The negotiated parameters.
    pub params: Params,
    /// The session's TSIH, from the final response.
    pub tsih: u16,
    /// The CmdSN of the first command (login requests do not consume one).
    pub cmd_sn: CmdSn,
    /// ExpCmdSN of the final response.
    pub exp_cmd_sn: CmdSn,
    /// MaxCmdSN of the final response.
    pub max_cmd_sn: CmdSn,
    /// The StatSN we expect next.
    pub exp_stat_sn: StatSn,
}

/// What a Login Response led to.
#[derive(Debug)]
#[must_use]
pub enum Progress {
    /// More requests follow: poll them with [`InitiatorLogin::poll_transmit`].
    Continue,
    /// The full feature phase is reached.
    Done(LoginOutcome),
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
    /// The login ended (or failed): nothing more to do.
    Over,
}

/// One exchange: our keys in one or more requests, the target's answer in one or more
/// responses.
struct Exchange {
    transit: bool,
    nsg: Stage,
    /// Text parts not yet sent.
    parts: VecDeque<Bytes>,
    /// The request with the last part has been sent: responses now carry the answer.
    answering: bool,
    text_in: Vec<u8>,
}

/// The initiator's login state; see the module documentation.
pub struct InitiatorLogin {
    isid: [u8; 6],
    csg: Stage,
    chap: Chap,
    neg: Negotiator,
    exchange: Exchange,
    exchanges: usize,
    /// A request is owed (the previous one was answered, or none was sent yet).
    owe: Option<LoginRequest>,
    /// A request was polled and its response has not come yet.
    awaiting: bool,
    exp_stat_sn: StatSn,
    tsih: u16,
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

impl InitiatorLogin {
    /// Starts a login; the first request is ready to poll. `rng` supplies the mutual
    /// CHAP challenge.
    pub fn new(cfg: InitiatorConfig, rng: &mut dyn Entropy) -> Result<Self, InitiatorLoginError> {
        let session_type = if cfg.target_name.is_some() {
            SessionType::Normal
        } else {
            SessionType::Discovery
        };
        let mut neg = Negotiator::new(Role::Initiator, session_type, true, cfg.limits);
        let mut keys = vec![pair("InitiatorName", &cfg.initiator_name)];
        match &cfg.target_name {
            Some(t) => keys.extend([pair("TargetName", t), pair("SessionType", "Normal")]),
            None => keys.push(pair("SessionType", "Discovery")),
        }
        let (csg, chap) = match cfg.chap {
            Some(c) => {
                let mutual = match c.mutual {
                    Some((name, secret)) => {
                        let mut r = [0u8; 1 + CHALLENGE_BYTES];
                        rng.fill(&mut r)?;
                        Some((name, secret, r[0], r[1..].to_vec()))
                    }
                    None => None,
                };
                keys.push(pair("AuthMethod", "CHAP"));
                let ini = ChapInitiator::new(c.username, c.secret, mutual);
                (Stage::Security, Chap::MethodOffered(ini))
            }
            None => {
                keys.extend(neg.offer());
                (Stage::Operational, Chap::Off)
            }
        };
        let mut l = InitiatorLogin {
            isid: cfg.isid,
            csg,
            chap,
            neg,
            exchange: Exchange {
                transit: false,
                nsg: csg,
                parts: VecDeque::new(),
                answering: false,
                text_in: Vec::new(),
            },
            exchanges: 0,
            owe: None,
            awaiting: false,
            exp_stat_sn: StatSn(0),
            tsih: 0,
        };
        l.start_exchange(&keys)?;
        Ok(l)
    }

    /// The next Login Request to send, if one is owed. One request is outstanding at a
    /// time: the next is owed once the response to this one is handled.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<LoginRequest> {
        let r = self.owe.take();
        self.awaiting |= r.is_some();
        r
    }

    /// Handles the target's Login Response to our last request.
    pub fn handle_response(&mut self, r: &LoginResponse) -> Result<Progress, InitiatorLoginError> {
        let res = self.response(r);
        if res.is_err() {
            self.chap = Chap::Over;
            self.owe = None;
        }
        res
    }

    fn response(&mut self, r: &LoginResponse) -> Result<Progress, InitiatorLoginError> {
        if matches!(self.chap, Chap::Over) || !self.awaiting {
            return Err(InitiatorLoginError::Protocol(
                "login response without a request".into(),
            ));
        }
        self.awaiting = false;
        if r.status_class != 0 {
            return Err(InitiatorLoginError::Rejected {
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.isid != self.isid {
            return Err(InitiatorLoginError::Protocol(
                "login response for another ISID".into(),
            ));
        }
        if r.version_active != 0 {
            return Err(InitiatorLoginError::Protocol(format!(
                "unsupported iSCSI version {}",
                r.version_active
            )));
        }
        self.exp_stat_sn = r.stat_sn.next();
        self.tsih = r.tsih;
        if !self.exchange.answering {
            // A part of our text that is not the last: the target only acknowledges it.
            if r.continue_ || !r.data.is_empty() {
                return Err(InitiatorLoginError::Protocol(
                    "target answered a partial login text with keys".into(),
                ));
            }
            self.send_next_part();
            return Ok(Progress::Continue);
        }
        self.exchange.text_in.extend_from_slice(&r.data);
        if self.exchange.text_in.len() > LOGIN_TEXT_BYTES_MAX {
            return Err(InitiatorLoginError::Protocol(
                "login response text too long".into(),
            ));
        }
        if r.continue_ {
            // The target's answer continues: an empty request pulls the rest.
            self.owe = Some(self.request(false, self.csg, false, Bytes::new()));
            return Ok(Progress::Continue);
        }
        let answers = text::parse(&std::mem::take(&mut self.exchange.text_in))?;
        self.answered(r, &answers)
    }

    /// The whole answer to one exchange is in: decide the next one.
    fn answered(
        &mut self,
        resp: &LoginResponse,
        answers: &[(String, String)],
    ) -> Result<Progress, InitiatorLoginError> {
        let moved = resp.transit && resp.nsg != self.csg;
        let keys;
        if self.csg == Stage::Security {
            if let Some(m) = get(answers, "AuthMethod") {
                if m != "CHAP" {
                    return Err(InitiatorLoginError::Auth(format!(
                        "target chose AuthMethod={m}"
                    )));
                }
            }
            let mut next = Vec::new();
            self.chap = match std::mem::replace(&mut self.chap, Chap::Over) {
                Chap::MethodOffered(ini) => {
                    if get(answers, "AuthMethod").is_none() {
                        return Err(InitiatorLoginError::Auth(
                            "target did not answer AuthMethod".into(),
                        ));
                    }
                    next = ini.offer();
                    Chap::AlgorithmOffered(ini)
                }
                Chap::AlgorithmOffered(mut ini) => {
                    next = ini.respond(answers)?;
                    Chap::Responded(ini)
                }
                Chap::Responded(ini) if moved => {
                    // The target proves itself (mutual CHAP) in the response that ends
                    // the security stage; a target that skips the proof fails here.
                    ini.verify(answers)?;
                    Chap::Done
                }
                other => other,
            };
            if moved {
                if !matches!(self.chap, Chap::Done) {
                    return Err(InitiatorLoginError::Auth(
                        "target left the security stage before CHAP completed".into(),
                    ));
                }
                if resp.nsg != Stage::Operational {
                    return Err(InitiatorLoginError::Protocol(
                        "target skipped the operational stage".into(),
                    ));
                }
                self.csg = Stage::Operational;
                next = self.neg.offer();
            }
            keys = next;
        } else {
            let more = self.neg.handle_answers(answers)?;
            if moved && resp.nsg == Stage::FullFeature {
                self.chap = Chap::Over;
                return Ok(Progress::Done(LoginOutcome {
                    params: self.neg.params().clone(),
                    tsih: self.tsih,
                    // Login requests do not consume CmdSNs: the first command reuses it.
                    cmd_sn: INITIAL_CMD_SN,
                    exp_cmd_sn: resp.exp_cmd_sn,
                    max_cmd_sn: resp.max_cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                }));
            }
            keys = more;
        }
        self.start_exchange(&keys)?;
        Ok(Progress::Continue)
    }

    /// Queues `keys` as the next exchange, cut to the login segment size.
    fn start_exchange(&mut self, keys: &[(String, String)]) -> Result<(), InitiatorLoginError> {
        if self.exchanges == EXCHANGES_MAX {
            return Err(InitiatorLoginError::Protocol(format!(
                "login did not finish in {EXCHANGES_MAX} round trips"
            )));
        }
        self.exchanges += 1;
        let (transit, nsg) = match self.csg {
            Stage::Security => (matches!(self.chap, Chap::Responded(_)), Stage::Operational),
            _ => (true, Stage::FullFeature),
        };
        let mut out = Vec::new();
        text::encode(keys, &mut out);
        let out = Bytes::from(out);
        let mut parts = VecDeque::new();
        let mut pos = 0;
        for chunk in text::split(&out, LOGIN_SEGMENT_BYTES) {
            parts.push_back(out.slice(pos..pos + chunk.len()));
            pos += chunk.len();
        }
        if parts.is_empty() {
            parts.push_back(Bytes::new());
        }
        self.exchange = Exchange {
            transit,
            nsg,
            parts,
            answering: false,
            text_in: Vec::new(),
        };
        self.send_next_part();
        Ok(())
    }

    fn send_next_part(&mut self) {
        let part = self.exchange.parts.pop_front().unwrap_or_default();
        let last = self.exchange.parts.is_empty();
        self.exchange.answering = last;
        // T and C are never both set in a request (RFC 7143 11.12.2).
        let transit = last && self.exchange.transit;
        self.owe = Some(self.request(transit, self.exchange.nsg, !last, part));
    }

    fn request(&self, transit: bool, nsg: Stage, continue_: bool, data: Bytes) -> LoginRequest {
        LoginRequest {
            transit,
            continue_,
            csg: self.csg,
            nsg: if transit { nsg } else { self.csg },
            version_max: 0,
            version_min: 0,
            isid: self.isid,
            tsih: self.tsih,
            itt: Itt(0),
            cid: 1,
            cmd_sn: INITIAL_CMD_SN,
            exp_stat_sn: self.exp_stat_sn,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::SeededEntropy;

    fn config(chap: bool) -> InitiatorConfig {
        InitiatorConfig {
            initiator_name: "iqn.2026-11.org.ftss:i".into(),
            target_name: Some("iqn.2026-11.org.ftss:t".into()),
            isid: [0x80, 0, 0, 0, 0, 1],
            chap: chap.then(|| ChapCredentials {
                username: "u".into(),
                secret: b"0123456789ab".to_vec(),
                mutual: Some(("t".into(), b"ba9876543210".to_vec())),
            }),
            limits: Limits::default(),
        }
    }

    fn machine(chap: bool) -> InitiatorLogin {
        InitiatorLogin::new(config(chap), &mut SeededEntropy::new(1)).expect("seeded")
    }

    /// The target's answer to `req` with `keys`, transiting to `nsg` when given.
    fn answer(req: &LoginRequest, nsg: Option<Stage>, keys: &[(&str, &str)]) -> LoginResponse {
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut data = Vec::new();
        text::encode(&pairs, &mut data);
        LoginResponse {
            transit: nsg.is_some(),
            continue_: false,
            csg: req.csg,
            nsg: nsg.unwrap_or(req.csg),
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 0,
            itt: req.itt,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            status_class: 0,
            status_detail: 0,
            data: data.into(),
        }
    }

    #[test]
    fn chap_starts_in_security_with_a_seeded_challenge() {
        let mut m = machine(true);
        let req = m.poll_transmit().expect("first request");
        assert_eq!(req.csg, Stage::Security);
        assert!(!req.transit, "no transit before CHAP completes");
        assert!(m.poll_transmit().is_none(), "one request at a time");
    }

    #[test]
    fn a_response_without_a_request_is_refused() {
        let mut m = machine(false);
        let req = m.poll_transmit().expect("first request");
        let r = answer(&req, None, &[]);
        assert!(m.handle_response(&r).is_ok());
        // The next request is owed but not sent: a second response is unsolicited.
        assert!(matches!(
            m.handle_response(&r),
            Err(InitiatorLoginError::Protocol(_))
        ));
    }

    #[test]
    fn a_response_for_another_isid_is_refused() {
        let mut m = machine(false);
        let req = m.poll_transmit().expect("first request");
        let mut r = answer(&req, None, &[]);
        r.isid[5] ^= 1;
        assert!(matches!(
            m.handle_response(&r),
            Err(InitiatorLoginError::Protocol(_))
        ));
        assert!(
            m.poll_transmit().is_none(),
            "a failed login sends nothing more"
        );
    }

    #[test]
    fn a_target_that_skips_chap_is_refused() {
        let mut m = machine(true);
        let req = m.poll_transmit().expect("first request");
        let r = answer(&req, Some(Stage::Operational), &[("AuthMethod", "CHAP")]);
        assert!(matches!(
            m.handle_response(&r),
            Err(InitiatorLoginError::Auth(_))
        ));
    }

    #[test]
    fn a_target_choosing_no_authentication_is_refused() {
        let mut m = machine(true);
        let req = m.poll_transmit().expect("first request");
        let r = answer(&req, None, &[("AuthMethod", "None")]);
        assert!(matches!(
            m.handle_response(&r),
            Err(InitiatorLoginError::Auth(_))
        ));
    }

    #[test]
    fn a_status_is_a_rejection() {
        let mut m = machine(false);
        let req = m.poll_transmit().expect("first request");
        let mut r = answer(&req, None, &[]);
        (r.status_class, r.status_detail) = (2, 3);
        assert!(matches!(
            m.handle_response(&r),
            Err(InitiatorLoginError::Rejected {
                class: 2,
                detail: 3
            })
        ));
    }

    #[test]
    fn a_login_going_in_circles_ends() {
        let mut m = machine(false);
        let mut ended = None;
        for _ in 0..2 * EXCHANGES_MAX {
            let Some(req) = m.poll_transmit() else {
                break;
            };
            // Never transit: the target keeps the initiator in the operational stage.
            if let Err(e) = m.handle_response(&answer(&req, None, &[])) {
                ended = Some(e);
                break;
            }
        }
        assert!(matches!(ended, Some(InitiatorLoginError::Protocol(_))));
    }

    #[test]
    fn the_entropy_failure_is_reported() {
        struct Dry;
        impl Entropy for Dry {
            fn fill(&mut self, _: &mut [u8]) -> Result<(), EntropyError> {
                Err(EntropyError("dry".into()))
            }
        }
        assert!(matches!(
            InitiatorLogin::new(config(true), &mut Dry),
            Err(InitiatorLoginError::Entropy(_))
        ));
    }
}
