//! The login rules of RFC 7143 on the [`Pair`] harness: the target's machine against the
//! initiator's machine (or a script of requests), through the frame decoder, on virtual
//! time. No socket, no sleep; section numbers are RFC 7143's.

use std::time::Duration;

use ftss_proto::chap::{decode_binary, encode_hex, Algorithm};
use ftss_proto::login::{ChapCredentials, InitiatorLoginError};
use ftss_proto::negotiate::Limits;
use ftss_proto::pdu::Stage;

use super::pair::{
    chap_config, initiator_config, key, keys, request, shared, NoEntropy, Pair, TargetEnd,
    INITIATOR, TARGET,
};
use super::{LOGIN_SEGMENT_MAX, RECV_SEGMENT_MAX};
use crate::iscsi::session::SessionKind;

const SECURITY: Stage = Stage::Security;
const OPERATIONAL: Stage = Stage::Operational;
const FULL: Stage = Stage::FullFeature;

fn leading(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("InitiatorName", INITIATOR),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
    ];
    v.extend_from_slice(extra);
    v
}

fn with_chap(secret: &str, mutual: Option<(&str, &str)>) -> ChapCredentials {
    ChapCredentials {
        username: "alice".into(),
        secret: secret.as_bytes().to_vec(),
        mutual: mutual.map(|(u, s)| (u.to_owned(), s.as_bytes().to_vec())),
    }
}

fn chap_target() -> std::sync::Arc<crate::iscsi::session::Shared> {
    shared(|c| {
        for t in &mut c.targets {
            t.chap = Some(chap_config(
                "alice-secret-123",
                Some(("ftss-target", "target-secret-456")),
            ));
        }
    })
}

/// 6.3, 11.13.3, 11.13.4, 11.12.5: a login without authentication goes from the
/// operational stage to the full feature phase; every response echoes the ISID and ITT,
/// StatSN rises by one, and only the final response carries the new TSIH.
#[test]
fn plain_login_reaches_full_feature_with_the_tsih_only_in_the_final_response() {
    let mut p = Pair::new(shared(|_| {}), initiator_config(), 1);
    p.drive();
    let o = p.outcome().clone();
    let d = p.done();
    assert_ne!(d.tsih, 0);
    assert_eq!(o.tsih, d.tsih);
    let (last, rest) = p.responses.split_last().expect("answered");
    assert!(last.transit && last.nsg == FULL && last.status_class == 0);
    assert_eq!(last.tsih, d.tsih);
    assert!(
        rest.iter().all(|r| r.tsih == 0),
        "TSIH only in the final response"
    );
    for (q, r) in p.requests.iter().zip(&p.responses) {
        assert_eq!((r.isid, r.itt), (q.isid, q.itt));
    }
    for w in p.responses.windows(2) {
        assert_eq!(w[1].stat_sn, w[0].stat_sn.next(), "StatSN rises by one");
    }
    // The connection goes on with the StatSN after the final response.
    assert_eq!(d.stat_sn, last.stat_sn.next());
    assert_eq!(o.exp_stat_sn, d.stat_sn);
    assert_eq!(d.exp_cmd_sn, o.cmd_sn);
    assert_eq!(&*d.nexus.initiator_name, INITIATOR);
    assert!(matches!(d.kind, SessionKind::Normal(_)));
}

/// 6.3, 11.12.1, 11.12.3, 12.1.3: one-way CHAP: the security stage answers with T=0
/// until the initiator's response is verified, then moves to the operational stage and
/// on to the full feature phase.
#[test]
fn chap_one_way_walks_the_three_stages() {
    let shared = shared(|c| {
        for t in &mut c.targets {
            t.chap = Some(chap_config("alice-secret-123", None));
        }
    });
    let mut cfg = initiator_config();
    cfg.chap = Some(with_chap("alice-secret-123", None));
    let mut p = Pair::new(shared, cfg, 2);
    p.drive();
    p.outcome();
    let stages: Vec<(Stage, bool, Stage)> = p
        .responses
        .iter()
        .map(|r| (r.csg, r.transit, r.nsg))
        .collect();
    assert_eq!(
        stages,
        vec![
            (SECURITY, false, SECURITY),
            (SECURITY, false, SECURITY),
            (SECURITY, true, OPERATIONAL),
            (OPERATIONAL, true, FULL),
        ]
    );
    assert_eq!(key(&p.responses[0], "AuthMethod").as_deref(), Some("CHAP"));
    let challenge = key(&p.responses[1], "CHAP_C").expect("a challenge");
    let bytes = decode_binary(&challenge, "CHAP_C").expect("hex");
    assert_eq!(bytes.len(), super::CHAP_CHALLENGE_BYTES);
}

/// 12.1.3: mutual CHAP: the target proves its own secret in the response that ends the
/// security stage.
#[test]
fn chap_mutual_proves_the_target() {
    let mut cfg = initiator_config();
    cfg.chap = Some(with_chap(
        "alice-secret-123",
        Some(("ftss-target", "target-secret-456")),
    ));
    let mut p = Pair::new(chap_target(), cfg, 3);
    p.drive();
    p.outcome();
    let proof = p
        .responses
        .iter()
        .find(|r| r.transit && r.csg == SECURITY)
        .expect("the security stage ends");
    assert_eq!(key(proof, "CHAP_N").as_deref(), Some("ftss-target"));
    assert!(key(proof, "CHAP_R").is_some());
}

/// 12.1.3, 11.13.5: a wrong secret is an authentication failure (0x0201).
#[test]
fn chap_wrong_secret_is_refused() {
    let mut cfg = initiator_config();
    cfg.chap = Some(with_chap("not-the-secret!!", None));
    let mut p = Pair::new(chap_target(), cfg, 4);
    p.drive();
    assert_eq!(p.last_status(), (0x02, 0x01));
    assert!(matches!(p.target_end, Some(TargetEnd::Failed)));
    assert!(matches!(
        p.initiator_end,
        Some(Err(InitiatorLoginError::Rejected {
            class: 2,
            detail: 1
        }))
    ));
    assert!(p.shared.registry.list().is_empty(), "no session was made");
}

/// 12.1.3: an initiator that expects another target secret refuses the target's proof.
#[test]
fn chap_target_that_cannot_prove_itself_is_refused_by_the_initiator() {
    let mut cfg = initiator_config();
    cfg.chap = Some(with_chap(
        "alice-secret-123",
        Some(("ftss-target", "some-other-secret")),
    ));
    let mut p = Pair::new(chap_target(), cfg, 5);
    p.drive();
    assert!(
        matches!(p.initiator_end, Some(Err(InitiatorLoginError::Chap(_)))),
        "{:?}",
        p.initiator_end
    );
}

/// 12.1.3 (and RFC 1994's reflection attack): an initiator that sends back the target's
/// own challenge for mutual CHAP is refused.
#[test]
fn chap_reflected_challenge_is_refused() {
    let mut p = Pair::scripted(chap_target());
    let r = p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &leading(&[("AuthMethod", "CHAP")]),
    ));
    assert_eq!(key(&r[0], "AuthMethod").as_deref(), Some("CHAP"));
    assert!(!r[0].transit, "no transit before authentication");
    let r = p.send(request(SECURITY, None, &[("CHAP_A", "5")]));
    let id: u8 = key(&r[0], "CHAP_I")
        .and_then(|i| i.parse().ok())
        .expect("CHAP_I");
    let c = key(&r[0], "CHAP_C").expect("CHAP_C");
    let challenge = decode_binary(&c, "CHAP_C").expect("hex");
    let answer = encode_hex(&Algorithm::Md5.response(id, b"alice-secret-123", &challenge));
    let r = p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", answer.as_str()),
            ("CHAP_I", "7"),
            ("CHAP_C", c.as_str()),
        ],
    ));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x01));
}

/// 12.1.3 with the same script: the correct answer and a fresh challenge pass.
#[test]
fn chap_scripted_answer_with_own_challenge_passes() {
    let mut p = Pair::scripted(chap_target());
    p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &leading(&[("AuthMethod", "CHAP")]),
    ));
    let r = p.send(request(SECURITY, None, &[("CHAP_A", "5")]));
    let id: u8 = key(&r[0], "CHAP_I")
        .and_then(|i| i.parse().ok())
        .expect("CHAP_I");
    let challenge = decode_binary(&key(&r[0], "CHAP_C").expect("CHAP_C"), "CHAP_C").expect("hex");
    let answer = encode_hex(&Algorithm::Md5.response(id, b"alice-secret-123", &challenge));
    let r = p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &[
            ("CHAP_N", "alice"),
            ("CHAP_R", answer.as_str()),
            ("CHAP_I", "7"),
            ("CHAP_C", "0x00112233445566778899aabbccddeeff"),
        ],
    ));
    assert_eq!(r[0].status_class, 0);
    assert!(r[0].transit && r[0].nsg == OPERATIONAL);
    let want = encode_hex(&Algorithm::Md5.response(
        7,
        b"target-secret-456",
        &decode_binary("0x00112233445566778899aabbccddeeff", "c").expect("hex"),
    ));
    assert_eq!(key(&r[0], "CHAP_R"), Some(want));
}

/// 12.1.3: a target that requires CHAP refuses an initiator that skips the security
/// stage.
#[test]
fn no_credentials_for_a_target_that_requires_them() {
    let mut p = Pair::new(chap_target(), initiator_config(), 6);
    p.drive();
    assert_eq!(p.last_status(), (0x02, 0x01));
}

/// 12.1.3, 11.13.5: CHAP keys without AuthMethod=CHAP are an authentication failure;
/// outside the security stage an initiator error.
#[test]
fn chap_keys_out_of_place_are_refused() {
    let mut p = Pair::scripted(chap_target());
    let r = p.send(request(SECURITY, None, &leading(&[("CHAP_A", "5")])));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x01));
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(OPERATIONAL, None, &leading(&[("CHAP_A", "5")])));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x00));
}

/// 11.12.1, 11.13.6: the target does not let the initiator leave the security stage
/// before authentication completes, nor step back into it.
#[test]
fn stage_transitions_are_only_taken_when_allowed() {
    let mut p = Pair::scripted(chap_target());
    let r = p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &leading(&[("AuthMethod", "CHAP")]),
    ));
    assert_eq!(
        (r[0].csg, r[0].transit, r[0].nsg),
        (SECURITY, false, SECURITY)
    );
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(OPERATIONAL, Some(SECURITY), &leading(&[])));
    assert_eq!(r[0].status_class, 0);
    assert_eq!(
        (r[0].csg, r[0].transit, r[0].nsg),
        (OPERATIONAL, false, OPERATIONAL)
    );
}

/// 11.12.3, 11.13.5: CSG cannot be the full feature phase (0x020b).
#[test]
fn csg_full_feature_is_refused() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(FULL, None, &leading(&[])));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x0b));
}

/// 11.12.4, 11.13.5: a Version-min above ours is refused (0x0205).
#[test]
fn version_mismatch_is_refused() {
    let mut p = Pair::scripted(shared(|_| {}));
    let mut q = request(OPERATIONAL, Some(FULL), &leading(&[]));
    q.version_min = 1;
    q.version_max = 1;
    let r = p.send(q);
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x05));
    assert_eq!(r[0].version_max, 0);
}

/// 11.12.6, 11.13.5: with MaxConnections=1 a non-zero TSIH names a session a connection
/// cannot join: 0x0206 when it exists, 0x020a when it does not.
#[test]
fn a_connection_cannot_join_an_existing_session() {
    let mut first = Pair::new(shared(|_| {}), initiator_config(), 7);
    first.drive();
    let tsih = first.done().tsih;
    let mut p = Pair::scripted(std::sync::Arc::clone(&first.shared));
    let mut q = request(OPERATIONAL, Some(FULL), &leading(&[]));
    q.tsih = tsih;
    let r = p.send(q.clone());
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x06));
    let mut p = Pair::scripted(std::sync::Arc::clone(&first.shared));
    q.tsih = tsih.wrapping_add(1).max(1);
    let r = p.send(q);
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x0a));
}

/// 6.3.5: a new session with the same initiator name, ISID and target reinstates the
/// old one, which is told to close.
#[test]
fn the_same_isid_reinstates_the_old_session() {
    let mut first = Pair::new(shared(|_| {}), initiator_config(), 8);
    first.drive();
    assert!(!*first.done().shutdown.borrow());
    let mut second = Pair::new(std::sync::Arc::clone(&first.shared), initiator_config(), 9);
    second.drive();
    assert!(
        *first.done().shutdown.borrow(),
        "the old session is told to close"
    );
    assert_ne!(second.done().tsih, first.done().tsih);
    assert_eq!(first.shared.registry.list().len(), 1);
    // Another ISID is another session.
    let mut cfg = initiator_config();
    cfg.isid = [0x80, 0, 0, 0, 0, 2];
    let mut third = Pair::new(std::sync::Arc::clone(&first.shared), cfg, 10);
    third.drive();
    assert!(!*second.done().shutdown.borrow());
    assert_eq!(first.shared.registry.list().len(), 2);
}

/// 6.3.1, 11.13.5: the leading request names the initiator and (normal session) the
/// target; a missing one is 0x0207, an unknown target 0x0203, an unknown SessionType
/// 0x0209.
#[test]
fn leading_request_names_initiator_and_target() {
    type Keys = Vec<(&'static str, &'static str)>;
    let cases: [(Keys, (u8, u8)); 4] = [
        (vec![("TargetName", TARGET)], (0x02, 0x07)),
        (vec![("InitiatorName", INITIATOR)], (0x02, 0x07)),
        (
            vec![
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2026-11.org.ftss:nobody"),
            ],
            (0x02, 0x03),
        ),
        (
            vec![("InitiatorName", INITIATOR), ("SessionType", "Bogus")],
            (0x02, 0x09),
        ),
    ];
    for (keys, want) in cases {
        let mut p = Pair::scripted(shared(|_| {}));
        let r = p.send(request(OPERATIONAL, Some(FULL), &keys));
        assert_eq!((r[0].status_class, r[0].status_detail), want, "{keys:?}");
        assert!(matches!(p.target_end, Some(TargetEnd::Failed)));
    }
}

/// 11.13.5: an initiator outside the target's ACL is refused as forbidden (0x0202); one
/// inside it logs in.
#[test]
fn acl_refusal() {
    let acl = || {
        shared(|c| {
            for t in &mut c.targets {
                t.initiators = Some(vec!["iqn.2026-11.org.ftss:allowed".into()]);
            }
        })
    };
    let mut p = Pair::new(acl(), initiator_config(), 11);
    p.drive();
    assert_eq!(p.last_status(), (0x02, 0x02));
    let mut cfg = initiator_config();
    cfg.initiator_name = "iqn.2026-11.org.ftss:allowed".into();
    let mut p = Pair::new(acl(), cfg, 12);
    p.drive();
    p.outcome();
}

/// 6.3, 13.21: a discovery session needs no TargetName and makes a discovery session.
#[test]
fn discovery_session() {
    let mut cfg = initiator_config();
    cfg.target_name = None;
    let mut p = Pair::new(shared(|_| {}), cfg, 13);
    p.drive();
    p.outcome();
    assert!(matches!(p.done().kind, SessionKind::Discovery));
    assert!(p.done().target_iqn.is_none());
}

/// 13.1, 13.10, 13.11, 13.13, 13.14, 13.17: the negotiated results are what both sides
/// settle on and what the connection gets.
#[test]
fn key_negotiation_results() {
    let mut cfg = initiator_config();
    cfg.limits = Limits {
        max_recv_data_segment_length: 65_536,
        max_burst_length: 131_072,
        first_burst_length: 16_384,
        immediate_data: true,
        initial_r2t: false,
        header_digest: vec!["CRC32C".into(), "None".into()],
        data_digest: vec!["None".into()],
        ..Limits::default()
    };
    let mut p = Pair::new(shared(|_| {}), cfg, 14);
    p.drive();
    let o = p.outcome().params.clone();
    let d = p.done().params;
    // MaxBurstLength and FirstBurstLength: the smaller offer (13.13, 13.14).
    assert_eq!(o.max_burst_length, 131_072);
    assert_eq!(d.xfer.burst_max, 131_072);
    assert_eq!(o.first_burst_length, 16_384);
    assert_eq!(d.xfer.first_burst, 16_384);
    // InitialR2T is OR, ImmediateData AND (13.10, 13.11).
    assert_eq!(o.initial_r2t, d.xfer.initial_r2t);
    assert_eq!(o.immediate_data, d.xfer.immediate_data);
    // Digests: the first of the initiator's list the target supports (13.1).
    assert!(o.header_digest && d.framing.header_digest);
    assert!(!o.data_digest && !d.framing.data_digest);
    assert_eq!(o.max_outstanding_r2t, d.xfer.outstanding_r2t_max);
}

/// 13.12: MaxRecvDataSegmentLength is declared by each side for what it receives: the
/// target declares its own in the final response and sends within the initiator's.
#[test]
fn max_recv_data_segment_length_is_declared_each_way() {
    let mut cfg = initiator_config();
    cfg.limits.max_recv_data_segment_length = 16_384;
    let mut p = Pair::new(shared(|_| {}), cfg, 15);
    p.drive();
    let last = p.responses.last().expect("answered");
    assert_eq!(
        key(last, "MaxRecvDataSegmentLength"),
        Some(RECV_SEGMENT_MAX.to_string())
    );
    assert_eq!(
        p.outcome().params.peer_max_recv_data_segment_length,
        RECV_SEGMENT_MAX
    );
    assert_eq!(p.done().params.xfer.send_segment_max, 16_384);
    assert_eq!(
        p.done().params.framing.max_recv_data_segment,
        RECV_SEGMENT_MAX
    );
}

/// 6 (NotUnderstood, Reject), 13.13: unknown keys and X- extension keys are answered
/// NotUnderstood, an out-of-range value Reject; the login goes on.
#[test]
fn unknown_and_bad_keys_get_standard_answers() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(
        OPERATIONAL,
        Some(FULL),
        &leading(&[
            ("X-com.example.Frobnicate", "Yes"),
            ("NoSuchKey", "1"),
            ("MaxBurstLength", "12"),
        ]),
    ));
    assert_eq!(r[0].status_class, 0);
    assert_eq!(
        key(&r[0], "X-com.example.Frobnicate").as_deref(),
        Some("NotUnderstood")
    );
    assert_eq!(key(&r[0], "NoSuchKey").as_deref(), Some("NotUnderstood"));
    assert_eq!(key(&r[0], "MaxBurstLength").as_deref(), Some("Reject"));
    assert!(matches!(p.target_end, Some(TargetEnd::FullFeature(_))));
}

/// 6 (Irrelevant): keys that do not apply to a discovery session are Irrelevant.
#[test]
fn session_keys_in_discovery_are_irrelevant() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(
        OPERATIONAL,
        Some(FULL),
        &[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("MaxBurstLength", "65536"),
            ("InitialR2T", "Yes"),
        ],
    ));
    assert_eq!(r[0].status_class, 0);
    assert_eq!(key(&r[0], "MaxBurstLength").as_deref(), Some("Irrelevant"));
    assert_eq!(key(&r[0], "InitialR2T").as_deref(), Some("Irrelevant"));
}

/// 6: a key negotiated twice is a protocol error: the login fails (initiator error).
#[test]
fn duplicate_keys_fail_the_login() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(
        OPERATIONAL,
        None,
        &leading(&[("MaxBurstLength", "65536")]),
    ));
    assert_eq!(r[0].status_class, 0);
    let r = p.send(request(
        OPERATIONAL,
        Some(FULL),
        &[("MaxBurstLength", "65536")],
    ));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x02, 0x00));
}

/// 11.12.2, 11.13.7: login text split across requests with C=1 is acknowledged with
/// empty responses that do not transit, and answered whole after the last part.
#[test]
fn login_text_continuation_from_the_initiator() {
    let mut p = Pair::scripted(shared(|_| {}));
    let all = request(
        OPERATIONAL,
        Some(FULL),
        &leading(&[("MaxBurstLength", "65536")]),
    );
    let split = 20;
    let mut part = all.clone();
    part.transit = false;
    part.nsg = OPERATIONAL;
    part.continue_ = true;
    part.data = all.data.slice(..split);
    let r = p.send(part);
    assert_eq!(r[0].status_class, 0);
    assert!(
        !r[0].transit && r[0].data.is_empty(),
        "partial text gets an empty answer"
    );
    let mut rest = all.clone();
    rest.data = all.data.slice(split..);
    let r = p.send(rest);
    assert_eq!(r[0].status_class, 0);
    assert!(r[0].transit);
    assert_ne!(r[0].tsih, 0);
    assert_eq!(key(&r[0], "MaxBurstLength").as_deref(), Some("65536"));
}

/// 11.13.7, 11.13.3: an answer longer than the login segment goes out in C=1 responses
/// that do not transit and carry no TSIH; the last part transits with the TSIH, and the
/// connection's StatSN follows the last response.
#[test]
fn a_long_answer_is_continued_and_only_its_last_part_transits() {
    let names: Vec<String> = (0..300).map(|i| format!("X-com.example.k{i:04}")).collect();
    let mut extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    extra.splice(0..0, leading(&[]));
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(OPERATIONAL, Some(FULL), &extra));
    assert!(r[0].continue_ && !r[0].transit && r[0].tsih == 0);
    assert_eq!(r[0].data.len(), LOGIN_SEGMENT_MAX as usize);
    let mut text = r[0].data.to_vec();
    let mut last = r[0].clone();
    while last.continue_ {
        let r = p.send(request(OPERATIONAL, None, &[]));
        last = r[0].clone();
        text.extend_from_slice(&last.data);
    }
    assert!(last.transit && last.nsg == FULL && last.tsih != 0);
    let answers = ftss_proto::text::parse(&text).expect("whole text parses");
    assert_eq!(
        answers.iter().filter(|(_, v)| v == "NotUnderstood").count(),
        300
    );
    assert_eq!(p.done().stat_sn, last.stat_sn.next());
    assert!(p.responses[..p.responses.len() - 1]
        .iter()
        .all(|r| r.tsih == 0));
}

/// Our policy (RFC 7143 leaves it to the implementation): a login not finished within
/// 30 s is dropped without an answer. On virtual time: nothing happens at 29.9 s.
#[test]
fn login_times_out_in_virtual_time() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(OPERATIONAL, None, &leading(&[])));
    assert_eq!(r[0].status_class, 0);
    p.advance(Duration::from_millis(29_900));
    assert!(p.target_end.is_none());
    p.advance(Duration::from_millis(100));
    assert!(matches!(p.target_end, Some(TargetEnd::TimedOut)));
    let r = p.send(request(OPERATIONAL, Some(FULL), &[]));
    assert!(r.is_empty(), "a timed-out login answers nothing");
    assert!(p.shared.registry.list().is_empty());
}

/// A request arriving after the deadline is not answered even if the timer has not
/// fired yet.
#[test]
fn a_request_after_the_deadline_is_not_answered() {
    let mut p = Pair::scripted(shared(|_| {}));
    p.now += Duration::from_secs(31);
    let r = p.send(request(OPERATIONAL, Some(FULL), &leading(&[])));
    assert!(r.is_empty());
    assert!(matches!(p.target_end, Some(TargetEnd::TimedOut)));
}

/// 11.13.5: no randomness for the CHAP challenge fails the login with a target error
/// (0x0300) rather than a guessable challenge.
#[test]
fn no_randomness_is_a_target_error() {
    let mut p = Pair::scripted(chap_target()).with_target_entropy(Box::new(NoEntropy));
    let r = p.send(request(
        SECURITY,
        Some(OPERATIONAL),
        &leading(&[("AuthMethod", "CHAP")]),
    ));
    assert_eq!((r[0].status_class, r[0].status_detail), (0x03, 0x00));
}

/// 11.13.5: when the session cannot be registered the final response becomes a failure:
/// out of resources (0x0302) at the session limit, service unavailable (0x0301) while
/// shutting down.
#[test]
fn registration_failures_become_the_final_response() {
    let shared = shared(|c| c.server.sessions_max = 1);
    let mut first = Pair::new(std::sync::Arc::clone(&shared), initiator_config(), 16);
    first.drive();
    let mut cfg = initiator_config();
    cfg.isid = [0x80, 0, 0, 0, 0, 3];
    let mut p = Pair::new(std::sync::Arc::clone(&shared), cfg.clone(), 17);
    p.drive();
    assert_eq!(p.last_status(), (0x03, 0x02));
    assert!(matches!(p.target_end, Some(TargetEnd::Failed)));
    shared.registry.close_all();
    let mut p = Pair::new(shared, cfg, 18);
    p.drive();
    assert_eq!(p.last_status(), (0x03, 0x01));
}

/// The keys the target sends in its first normal-session response (13.9 TargetPortalGroupTag,
/// 13.6 TargetAlias).
#[test]
fn first_response_names_the_portal_group() {
    let mut p = Pair::scripted(shared(|_| {}));
    let r = p.send(request(OPERATIONAL, None, &leading(&[])));
    let k = keys(&r[0]);
    assert!(k.contains(&("TargetPortalGroupTag".into(), "1".into())));
    assert!(k.contains(&("TargetAlias".into(), "pair".into())));
}
