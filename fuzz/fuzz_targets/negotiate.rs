//! Operational negotiation, one side driven by fuzz input: the target answering an
//! initiator's keys (`respond`) or the initiator applying a target's answers
//! (`handle_answers`), over several rounds. Invariants: results stay within what RFC 7143
//! allows and within our limits, whatever the peer says; a numeric answer we give never
//! exceeds what the peer offered or what we accept; each key is answered at most once.
#![no_main]

use ftss_fuzz::Input;
use ftss_proto::negotiate::{Limits, Negotiator, Params, Role, SessionType};
use ftss_proto::text;
use libfuzzer_sys::fuzz_target;

fn check(p: &Params, l: &Limits) {
    assert!((512..=16_777_215).contains(&p.max_burst_length), "{p:?}");
    assert!(
        p.max_burst_length <= l.max_burst_length.max(262_144),
        "{p:?}"
    );
    assert!((512..=16_777_215).contains(&p.first_burst_length), "{p:?}");
    assert!(p.first_burst_length <= p.max_burst_length, "{p:?}");
    assert!(
        (512..=16_777_215).contains(&p.peer_max_recv_data_segment_length),
        "{p:?}"
    );
    assert!((1..=65_535).contains(&p.max_outstanding_r2t), "{p:?}");
    assert!(
        p.max_outstanding_r2t <= l.max_outstanding_r2t.max(1),
        "{p:?}"
    );
    assert!(
        (1..=l.max_connections.max(1)).contains(&p.max_connections),
        "{p:?}"
    );
    assert!(
        p.default_time2wait <= 3600 && p.default_time2retain <= 3600,
        "{p:?}"
    );
    assert!(p.error_recovery_level <= 2, "{p:?}");
    if p.header_digest {
        assert!(l.header_digest.iter().any(|d| d == "CRC32C"));
    }
    if p.data_digest {
        assert!(l.data_digest.iter().any(|d| d == "CRC32C"));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let role = if flags & 1 == 0 {
        Role::Target
    } else {
        Role::Initiator
    };
    let st = if flags & 2 == 0 {
        SessionType::Normal
    } else {
        SessionType::Discovery
    };
    let limits = Limits::default();
    let mut n = Negotiator::new(role, st, true, limits.clone());
    if role == Role::Initiator {
        let _ = n.offer();
    }
    for _ in 0..4 {
        let len = usize::from(input.u16());
        let Ok(keys) = text::parse(input.take(len)) else {
            continue;
        };
        let result = match role {
            Role::Target => n.respond(&keys),
            Role::Initiator => n.handle_answers(&keys),
        };
        let Ok(answers) = result else {
            return;
        };
        let mut answered = std::collections::HashSet::new();
        for (k, v) in &answers {
            assert!(answered.insert(k.clone()), "{k} answered twice");
            if role == Role::Target && matches!(k.as_str(), "MaxBurstLength" | "FirstBurstLength") {
                if let (Ok(ours), Some((_, theirs))) =
                    (v.parse::<u64>(), keys.iter().find(|(a, _)| a == k))
                {
                    if let Ok(theirs) = theirs.parse::<u64>() {
                        assert!(ours <= theirs, "{k}: answered {ours} to {theirs}");
                    }
                }
            }
        }
        check(n.params(), &limits);
    }
});
