//! Both roles of operational negotiation talking to each other with limits chosen by the
//! fuzzer. Invariant: when both sides finish without error they agree on every
//! negotiated value (the RFC's point of negotiation), and each side stays within its own
//! limits.
#![no_main]

use ftss_fuzz::Input;
use ftss_proto::negotiate::{Limits, Negotiator, Role, SessionType};
use libfuzzer_sys::fuzz_target;

fn limits(input: &mut Input<'_>) -> Limits {
    let digests = |b: u8| -> Vec<String> {
        match b % 4 {
            0 => vec!["None".into()],
            1 => vec!["CRC32C".into()],
            2 => vec!["None".into(), "CRC32C".into()],
            _ => vec!["CRC32C".into(), "None".into()],
        }
    };
    let len = |x: u32| 512 + x % (16_777_215 - 512);
    Limits {
        max_recv_data_segment_length: len(input.u32()),
        max_burst_length: len(input.u32()),
        first_burst_length: len(input.u32()),
        max_outstanding_r2t: u32::from(input.u8()) + 1,
        immediate_data: input.u8() & 1 != 0,
        initial_r2t: input.u8() & 1 != 0,
        header_digest: digests(input.u8()),
        data_digest: digests(input.u8()),
        max_connections: 1,
        default_time2wait: u32::from(input.u8()) % 3601,
        default_time2retain: u32::from(input.u16()) % 3601,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let st = if input.u8() & 1 == 0 {
        SessionType::Normal
    } else {
        SessionType::Discovery
    };
    let (li, lt) = (limits(&mut input), limits(&mut input));
    let (i_mrdsl, t_mrdsl) = (
        li.max_recv_data_segment_length,
        lt.max_recv_data_segment_length,
    );
    let mut ini = Negotiator::new(Role::Initiator, st, true, li);
    let mut tgt = Negotiator::new(Role::Target, st, true, lt);
    let mut to_target = ini.offer();
    for _ in 0..4 {
        let Ok(answers) = tgt.respond(&to_target) else {
            return;
        };
        let Ok(more) = ini.handle_answers(&answers) else {
            return;
        };
        if more.is_empty() {
            break;
        }
        to_target = more;
    }
    let (a, b) = (ini.params(), tgt.params());
    assert_eq!(
        a.header_digest, b.header_digest,
        "HeaderDigest: {a:?} / {b:?}"
    );
    assert_eq!(a.data_digest, b.data_digest, "DataDigest");
    if st == SessionType::Normal {
        assert_eq!(a.initial_r2t, b.initial_r2t, "InitialR2T");
        assert_eq!(a.immediate_data, b.immediate_data, "ImmediateData");
        assert_eq!(a.max_burst_length, b.max_burst_length, "MaxBurstLength");
        assert_eq!(
            a.first_burst_length, b.first_burst_length,
            "FirstBurstLength"
        );
        assert_eq!(
            a.max_outstanding_r2t, b.max_outstanding_r2t,
            "MaxOutstandingR2T"
        );
        assert_eq!(a.data_pdu_in_order, b.data_pdu_in_order, "DataPDUInOrder");
        assert_eq!(a.data_sequence_in_order, b.data_sequence_in_order);
    }
    assert_eq!(a.max_connections, b.max_connections, "MaxConnections");
    assert_eq!(
        a.error_recovery_level, b.error_recovery_level,
        "ErrorRecoveryLevel"
    );
    assert_eq!(a.default_time2wait, b.default_time2wait, "DefaultTime2Wait");
    assert_eq!(
        a.default_time2retain, b.default_time2retain,
        "DefaultTime2Retain"
    );
    // Each side sends at most what the other declared it can receive.
    assert_eq!(
        a.peer_max_recv_data_segment_length, t_mrdsl,
        "target's declaration"
    );
    assert_eq!(
        b.peer_max_recv_data_segment_length, i_mrdsl,
        "initiator's declaration"
    );
});
