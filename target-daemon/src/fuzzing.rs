//! Entry points for the coverage-guided fuzz targets in `fuzz/`, compiled only under
//! `--cfg fuzzing` (which `cargo fuzz` sets), as quinn-proto does: the targets reach the
//! crate-private login machine and admin protocol without those becoming public API.
//!
//! Each entry point checks the invariants it can see and panics when one breaks, so the
//! fuzzer reports it as a crash.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use ftss_proto::entropy::SeededEntropy;
use ftss_proto::pdu::{Framing, LoginResponse, Pdu, Stage};

use crate::admin::{Admin, MediaHandles};
use crate::config::{ChapConfig, Config};
use crate::iscsi::login::{register, LoginMachine, Step};
use crate::iscsi::session::{SessionKind, Shared, TargetEntry};
use crate::runtime_luns::RuntimeState;
use crate::scsi::target::{ScsiTarget, TargetIdentity};

/// The target every fuzzed login addresses (and the embedded default's name).
pub const TARGET_IQN: &str = "iqn.2026-11.org.ftss:target0";

fn shared(chap: bool, acl: bool) -> Arc<Shared> {
    // Parsed once: the TOML parse would otherwise dominate each execution.
    static DEFAULT: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    let mut config = DEFAULT.get_or_init(Config::default_config).clone();
    // `luns add` creates files: keep them out of the working directory.
    config.server.data_dir = std::env::temp_dir().join(format!("ftss-fuzz-{}", std::process::id()));
    // Discovery has its own, optional CHAP (`server.discovery_chap`): with `chap` both
    // session types require it, so no login of either kind may pass without it.
    config.server.discovery_chap = chap.then(|| ChapConfig {
        username: "discovery".into(),
        secret: "discovery-secret".into(),
        mutual_username: None,
        mutual_secret: None,
    });
    for t in &mut config.targets {
        t.iqn = TARGET_IQN.to_owned();
        t.chap = chap.then(|| ChapConfig {
            username: "user".into(),
            secret: "0123456789ab".into(),
            mutual_username: Some("target".into()),
            mutual_secret: Some("ba9876543210".into()),
        });
        t.initiators = acl.then(|| vec!["iqn.2026-11.org.ftss:allowed".to_owned()]);
    }
    let scsi = ScsiTarget::new(
        TargetIdentity {
            iqn: TARGET_IQN.to_owned(),
        },
        Vec::new(),
    )
    .expect("a target without LUNs is valid");
    let entry = Arc::new(TargetEntry {
        iqn: TARGET_IQN.to_owned(),
        alias: Some("fuzz".into()),
        scsi: Arc::new(scsi),
        connections: std::sync::atomic::AtomicU64::new(0),
    });
    Arc::new(Shared::new(config, vec![entry]))
}

/// What a fuzzed login ended in.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginEnd {
    /// The input ran out (or held a frame that is not a Login Request) mid-login.
    Unfinished,
    /// The target refused the login.
    Failed,
    /// The connection reached the full feature phase.
    FullFeature,
}

/// Drives the target's login state machine with the frames in `input` (the bytes an
/// initiator would send). With `chap`, the target requires CHAP with secrets the input
/// cannot know (the challenge is random), on normal and discovery sessions alike, so a
/// login reaching the full feature phase is a
/// bypass; with `acl`, only one initiator name may log in.
///
/// Checks: every response encodes and decodes back to itself; StatSN rises by one per
/// response; a login ends in the full feature phase only with a final response that says
/// so (T=1, NSG=3, status 0); a failure's last response carries a non-zero status class;
/// nothing answers after the end; CHAP is never bypassed; the ACL is never bypassed.
pub fn login(chap: bool, acl: bool, mut input: &[u8]) -> LoginEnd {
    let shared = shared(chap, acl);
    // A fixed clock and a seeded generator: a crash replays from its input alone. The
    // challenge is predictable across runs, but the secrets are not in the input, so a
    // response still cannot be computed from it.
    let now = std::time::Instant::now();
    let mut rng = SeededEntropy::new(0x5eed);
    let mut m = LoginMachine::new(Arc::clone(&shared), now);
    let framing = Framing {
        max_recv_data_segment: 8192,
        ..Framing::default()
    };
    let mut last_stat_sn: Option<u32> = None;
    loop {
        let Ok((pdu, used)) = Pdu::decode(input, &framing) else {
            return LoginEnd::Unfinished;
        };
        input = &input[used..];
        let Pdu::LoginRequest(req) = pdu else {
            return LoginEnd::Unfinished;
        };
        let mut done = None;
        let step = match m.handle(&req, now, &mut rng) {
            Step::Register(acc) => {
                let (step, d) = register(&shared, &mut m, acc);
                done = d;
                step
            }
            step => step,
        };
        let out: Vec<LoginResponse> = m.take_output();
        assert!(!out.is_empty(), "a Login Request must be answered");
        for r in &out {
            let pdu = Pdu::LoginResponse(r.clone());
            let mut buf = BytesMut::new();
            pdu.encode(&mut buf, &Framing::default());
            let back = Pdu::decode(&buf, &framing_for_responses());
            assert_eq!(back, Ok((pdu, buf.len())), "a login response round-trips");
            if let Some(prev) = last_stat_sn {
                assert_eq!(r.stat_sn.0, prev.wrapping_add(1), "StatSN rises by one");
            }
            last_stat_sn = Some(r.stat_sn.0);
        }
        let last = out.last().expect("checked non-empty");
        match step {
            Step::Continue => {
                assert_eq!(last.status_class, 0, "a login that goes on answers success");
            }
            Step::Failed => {
                assert_ne!(last.status_class, 0, "a failed login says why");
                return LoginEnd::Failed;
            }
            Step::FullFeature => {
                assert!(
                    last.transit && last.nsg == Stage::FullFeature && last.status_class == 0,
                    "the full feature phase is announced: {last:?}"
                );
                assert!(
                    !chap,
                    "CHAP was required and the login got through without it"
                );
                if let Some(done) = done {
                    if acl && matches!(done.kind, SessionKind::Normal(_)) {
                        assert!(
                            done.nexus
                                .initiator_name
                                .eq_ignore_ascii_case("iqn.2026-11.org.ftss:allowed"),
                            "an initiator outside the ACL logged in: {}",
                            done.nexus.initiator_name
                        );
                    }
                }
                return LoginEnd::FullFeature;
            }
            Step::Register(_) => panic!("a registration is answered, not asked again"),
            Step::TimedOut => panic!("the clock stands still: no login times out"),
        }
    }
}

fn framing_for_responses() -> Framing {
    // Login responses may carry up to the initiator's segment size; 8 KiB during login.
    Framing {
        max_recv_data_segment: 1 << 24,
        ..Framing::default()
    }
}

/// An admin interface over `media`, with one registered session, for fuzzing its line
/// protocol.
pub fn admin(media: MediaHandles) -> impl Fn(&str) -> String {
    let shared = shared(false, false);
    // A session to list; `room` cannot fail on an empty registry.
    let _ = shared.registry.register(
        "iqn.2026-11.org.ftss:fuzz",
        [0x80, 0, 0, 0, 0, 1],
        Some(TARGET_IQN),
        7,
        8,
    );
    let admin = Admin {
        media,
        shared,
        runtime: Mutex::new(RuntimeState::default()),
    };
    move |line| admin.handle(line)
}
