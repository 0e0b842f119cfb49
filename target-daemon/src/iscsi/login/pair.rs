//! A test harness in the manner of quinn-proto's `Pair`: the target's [`LoginMachine`]
//! and the initiator's [`InitiatorLogin`] (or a script of requests) joined by byte pipes,
//! a virtual clock and seeded randomness. Every PDU is encoded, cut by the one frame
//! decoder and decoded again on the other side, as on a socket, but no socket and no
//! sleep is involved: a test is a pure function of its seed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ftss_proto::entropy::{Entropy, EntropyError, SeededEntropy};
use ftss_proto::frame::FrameDecoder;
use ftss_proto::login::{
    InitiatorConfig, InitiatorLogin, InitiatorLoginError, LoginOutcome, Progress,
};
use ftss_proto::negotiate::Limits;
use ftss_proto::pdu::{Framing, LoginRequest, LoginResponse, Pdu, Stage};

use super::{register, LoginDone, LoginMachine, Step, LOGIN_SEGMENT_MAX};
use crate::config::{ChapConfig, Config};
use crate::iscsi::session::{Shared, TargetEntry};
use crate::scsi::target::{ScsiTarget, TargetIdentity};

/// The target every Pair serves.
pub(super) const TARGET: &str = "iqn.2026-11.org.ftss:pair";
/// An initiator name the tests use.
pub(super) const INITIATOR: &str = "iqn.2026-11.org.ftss:initiator";

/// How the target's side ended.
pub(super) enum TargetEnd {
    FullFeature(Box<LoginDone>),
    Failed,
    TimedOut,
}

impl std::fmt::Debug for TargetEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetEnd::FullFeature(d) => write!(f, "FullFeature(tsih {})", d.tsih),
            TargetEnd::Failed => f.write_str("Failed"),
            TargetEnd::TimedOut => f.write_str("TimedOut"),
        }
    }
}

/// Randomness that has run out, as a kernel without getrandom would.
pub(super) struct NoEntropy;

impl Entropy for NoEntropy {
    fn fill(&mut self, _: &mut [u8]) -> Result<(), EntropyError> {
        Err(EntropyError("no entropy in this test".into()))
    }
}

/// A daemon's shared state with one target and no LUNs; `edit` adjusts the
/// configuration (CHAP, ACLs, limits) before it is taken.
pub(super) fn shared(edit: impl FnOnce(&mut Config)) -> Arc<Shared> {
    let mut config = Config::default_config();
    for t in &mut config.targets {
        t.iqn = TARGET.to_owned();
        t.chap = None;
        t.initiators = None;
    }
    config.server.discovery_chap = None;
    edit(&mut config);
    let scsi = ScsiTarget::new(
        TargetIdentity {
            iqn: TARGET.to_owned(),
        },
        Vec::new(),
    )
    .expect("a target without LUNs is valid");
    let entry = Arc::new(TargetEntry {
        iqn: TARGET.to_owned(),
        alias: Some("pair".into()),
        scsi: Arc::new(scsi),
        connections: std::sync::atomic::AtomicU64::new(0),
    });
    Arc::new(Shared::new(config, vec![entry]))
}

/// CHAP credentials for the target's configuration.
pub(super) fn chap_config(secret: &str, mutual: Option<(&str, &str)>) -> ChapConfig {
    ChapConfig {
        username: "alice".into(),
        secret: secret.into(),
        mutual_username: mutual.map(|(u, _)| u.to_owned()),
        mutual_secret: mutual.map(|(_, s)| s.to_owned()),
    }
}

/// What the initiator of most tests asks for: a normal session to [`TARGET`].
pub(super) fn initiator_config() -> InitiatorConfig {
    InitiatorConfig {
        initiator_name: INITIATOR.into(),
        target_name: Some(TARGET.into()),
        isid: [0x80, 0, 0, 0, 0, 1],
        chap: None,
        limits: Limits {
            max_recv_data_segment_length: 262_144,
            ..Limits::default()
        },
    }
}

/// The two ends, the pipes between them and the clock.
pub(super) struct Pair {
    pub(super) shared: Arc<Shared>,
    pub(super) target: LoginMachine,
    pub(super) initiator: Option<InitiatorLogin>,
    /// Virtual time: moves only when a test advances it.
    pub(super) now: Instant,
    target_rng: Box<dyn Entropy>,
    /// What the target reads (login framing: no digests, 8 KiB segments).
    to_target: FrameDecoder,
    /// What the initiator reads.
    to_initiator: FrameDecoder,
    /// Every request the target was sent and every response it sent, in order.
    pub(super) requests: Vec<LoginRequest>,
    pub(super) responses: Vec<LoginResponse>,
    pub(super) target_end: Option<TargetEnd>,
    pub(super) initiator_end: Option<Result<LoginOutcome, InitiatorLoginError>>,
}

impl Pair {
    /// A target and a scripted initiator: the test sends requests with [`Pair::send`].
    pub(super) fn scripted(shared: Arc<Shared>) -> Self {
        let now = Instant::now();
        Pair {
            target: LoginMachine::new(Arc::clone(&shared), now),
            shared,
            initiator: None,
            now,
            target_rng: Box::new(SeededEntropy::new(1)),
            to_target: FrameDecoder::new(Framing {
                max_recv_data_segment: LOGIN_SEGMENT_MAX,
                ..Framing::default()
            }),
            to_initiator: FrameDecoder::new(Framing::default()),
            requests: Vec::new(),
            responses: Vec::new(),
            target_end: None,
            initiator_end: None,
        }
    }

    /// A target and an initiator login machine configured by `cfg`, each with its own
    /// randomness from `seed`.
    pub(super) fn new(shared: Arc<Shared>, cfg: InitiatorConfig, seed: u64) -> Self {
        let mut p = Self::scripted(shared);
        p.target_rng = Box::new(SeededEntropy::new(seed));
        let mut rng = SeededEntropy::new(seed ^ 0xa5a5_a5a5);
        p.initiator = Some(InitiatorLogin::new(cfg, &mut rng).expect("seeded entropy never fails"));
        p
    }

    /// Replaces the target's randomness.
    pub(super) fn with_target_entropy(mut self, rng: Box<dyn Entropy>) -> Self {
        self.target_rng = rng;
        self
    }

    /// Moves the virtual clock and lets the target notice its deadline.
    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.target.handle_timeout(self.now) && self.target_end.is_none() {
            self.target_end = Some(TargetEnd::TimedOut);
        }
    }

    /// Sends one request as bytes, lets the target handle it (registering the session as
    /// the shell does) and returns the responses as the initiator decodes them.
    pub(super) fn send(&mut self, req: LoginRequest) -> Vec<LoginResponse> {
        let mut wire = BytesMut::new();
        Pdu::LoginRequest(req).encode(&mut wire, &Framing::default());
        self.to_target.feed(&wire);
        let mut got = Vec::new();
        while let Some(frame) = self
            .to_target
            .next_frame()
            .expect("requests fit the login segment")
        {
            let Ok(Pdu::LoginRequest(req)) = frame.decode() else {
                panic!("the initiator sends Login Requests");
            };
            self.requests.push(req.clone());
            let step = match self.target.handle(&req, self.now, self.target_rng.as_mut()) {
                Step::Register(acc) => {
                    let (step, done) = register(&self.shared, &mut self.target, acc);
                    if let Some(d) = done {
                        self.target_end = Some(TargetEnd::FullFeature(Box::new(d)));
                    }
                    step
                }
                step => step,
            };
            let mut out = BytesMut::new();
            for r in self.target.take_output() {
                Pdu::LoginResponse(r).encode(&mut out, &Framing::default());
            }
            self.to_initiator.feed(&out);
            while let Some(frame) = self.to_initiator.next_frame().expect("responses frame") {
                let Ok(Pdu::LoginResponse(r)) = frame.decode() else {
                    panic!("the target answers with Login Responses");
                };
                self.responses.push(r.clone());
                got.push(r);
            }
            match step {
                Step::Continue | Step::FullFeature => {}
                Step::Failed => self.target_end = Some(TargetEnd::Failed),
                Step::TimedOut => self.target_end = Some(TargetEnd::TimedOut),
                Step::Register(_) => panic!("registration is answered once"),
            }
        }
        got
    }

    /// One round trip driven by the initiator machine; false when it has nothing to send.
    pub(super) fn step(&mut self) -> bool {
        let Some(req) = self
            .initiator
            .as_mut()
            .and_then(InitiatorLogin::poll_transmit)
        else {
            return false;
        };
        for r in self.send(req) {
            let Some(ini) = self.initiator.as_mut() else {
                break;
            };
            match ini.handle_response(&r) {
                Ok(Progress::Continue) => {}
                Ok(Progress::Done(o)) => self.initiator_end = Some(Ok(o)),
                Err(e) => self.initiator_end = Some(Err(e)),
            }
        }
        true
    }

    /// Steps until neither side has anything to do; a login that never settles is a
    /// livelock and fails the test.
    pub(super) fn drive(&mut self) {
        for _ in 0..100 {
            if !self.step() {
                return;
            }
        }
        panic!("the login did not settle in 100 round trips");
    }

    /// The initiator's outcome, which the test expects to be a success.
    pub(super) fn outcome(&self) -> &LoginOutcome {
        match &self.initiator_end {
            Some(Ok(o)) => o,
            other => panic!(
                "expected a completed login, got {other:?} / {:?}",
                self.target_end
            ),
        }
    }

    /// The session the target registered.
    pub(super) fn done(&self) -> &LoginDone {
        match &self.target_end {
            Some(TargetEnd::FullFeature(d)) => d,
            other => panic!("expected the full feature phase, got {other:?}"),
        }
    }

    /// The last response's status class and detail.
    pub(super) fn last_status(&self) -> (u8, u8) {
        let r = self.responses.last().expect("the target answered");
        (r.status_class, r.status_detail)
    }
}

/// A Login Request of the scripted initiator.
pub(super) fn request(csg: Stage, nsg: Option<Stage>, keys: &[(&str, &str)]) -> LoginRequest {
    let mut data = Vec::new();
    let pairs: Vec<(String, String)> = keys
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ftss_proto::text::encode(&pairs, &mut data);
    LoginRequest {
        transit: nsg.is_some(),
        continue_: false,
        csg,
        nsg: nsg.unwrap_or(csg),
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 7],
        tsih: 0,
        itt: ftss_proto::pdu::Itt(0),
        cid: 1,
        cmd_sn: ftss_proto::serial::CmdSn(1),
        exp_stat_sn: ftss_proto::serial::StatSn(0),
        data: data.into(),
    }
}

/// The keys of a response.
pub(super) fn keys(r: &LoginResponse) -> Vec<(String, String)> {
    ftss_proto::text::parse(&r.data).expect("the target's text parses")
}

/// One key of a response.
pub(super) fn key(r: &LoginResponse, k: &str) -> Option<String> {
    keys(r).into_iter().find(|(a, _)| a == k).map(|(_, v)| v)
}
