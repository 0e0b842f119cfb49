//! RFC 7143 full feature phase rules end to end: the target's connection machine and the
//! initiator's machine ([`ftss_proto::initiator::Initiator`]) on one [`Pair`], every PDU
//! encoded, framed and decoded on its way, on virtual time. Each rule is checked from
//! both sides: what crossed the wire and what each machine concluded. The rules about
//! malformed input stay on the scripted initiator (`rfc7143.rs`): a real initiator
//! machine cannot send it.

use std::time::Duration;

use bytes::Bytes;
use ftss_proto::initiator::{ConnError, Event, Outcome, ScsiOutcome, ScsiRequest, TaskError};
use ftss_proto::pdu::{Itt, Pdu, RejectReason, TmfFunction, Ttt, RESERVED_TAG};
use ftss_proto::serial::{CmdSn, StatSn};

use super::machine::IMMEDIATE_TASKS_MAX;
use super::pair::{
    limits, lun0, pattern, read10, Pair, CMD_WINDOW, FIRST_CMD_SN, NOP_INTERVAL_S, NOP_TIMEOUT_S,
    PING_TIMEOUT_S, TARGET_RECV_SEGMENT, TUR,
};
use crate::iscsi::transfer::XferLimits;

const F: u32 = FIRST_CMD_SN;

fn tur() -> ScsiRequest {
    ScsiRequest {
        lun: lun0(),
        cdb: Bytes::copy_from_slice(&TUR),
        data_out: Bytes::new(),
        data_in_len: 0,
        immediate: false,
        attr: 1,
    }
}

/// WRITE (10) of the test pattern, `len` bytes (whole blocks) at LBA 0.
fn write(len: u32) -> ScsiRequest {
    let b = u16::try_from(len / 512)
        .expect("tests write small transfers")
        .to_be_bytes();
    ScsiRequest {
        cdb: Bytes::copy_from_slice(&[0x2a, 0, 0, 0, 0, 0, 0, b[0], b[1], 0]),
        data_out: pattern(0, len),
        ..tur()
    }
}

/// READ (10) of `len` bytes (whole blocks) at LBA 0.
fn read(len: u32) -> ScsiRequest {
    let blocks = u16::try_from(len / 512).expect("tests read small transfers");
    ScsiRequest {
        cdb: Bytes::copy_from_slice(&read10(blocks)),
        data_in_len: len,
        ..tur()
    }
}

fn submit(pair: &mut Pair, req: ScsiRequest) -> Itt {
    let itt = pair
        .ini()
        .submit_scsi(req)
        .expect("the machine takes the command");
    pair.drive();
    itt
}

/// The completions among `events`, in order.
fn completions(events: Vec<Event>) -> Vec<(Itt, Result<Outcome, TaskError>)> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Done { itt, result } => Some((itt, result)),
            _ => None,
        })
        .collect()
}

/// The one SCSI outcome for `itt` among the Pair's completions.
fn scsi_done(pair: &mut Pair, itt: Itt) -> ScsiOutcome {
    let done = completions(pair.events());
    match done.as_slice() {
        [(i, Ok(Outcome::Scsi(s)))] if *i == itt => s.clone(),
        other => panic!("expected one SCSI completion for {itt:?}, got {other:?}"),
    }
}

/// Data-Out PDUs on the wire as (TTT, DataSN, offset, length, F).
fn data_outs(pair: &Pair) -> Vec<(u32, u32, u32, usize, bool)> {
    pair.sent_to_target
        .iter()
        .filter_map(|p| match p {
            Pdu::DataOut(d) => Some((
                d.ttt.0,
                d.data_sn.0,
                d.buffer_offset,
                d.data.len(),
                d.final_,
            )),
            _ => None,
        })
        .collect()
}

/// 3.2.2.1, 4.2.2.1: the initiator sends non-immediate commands only up to MaxCmdSN and
/// holds the rest; each completion opens the window by one and releases one more, so the
/// target drops none (every command completes, in CmdSN order). An immediate command
/// goes while the window is closed, carrying the next CmdSN without taking it.
#[test]
fn cmd_sn_window_holds_commands_beyond_max_cmd_sn() {
    let mut pair = Pair::with_initiator(limits());
    pair.auto_run = false;
    let n = CMD_WINDOW + 3;
    let itts: Vec<Itt> = (0..n).map(|_| submit(&mut pair, tur())).collect();
    assert_eq!(pair.executing.len(), CMD_WINDOW as usize);
    assert_eq!(
        pair.ini().queued(),
        3,
        "beyond MaxCmdSN: held by the initiator"
    );
    let imm = submit(
        &mut pair,
        ScsiRequest {
            immediate: true,
            ..tur()
        },
    );
    assert_eq!(pair.executing.len(), CMD_WINDOW as usize + 1);
    let Some(Pdu::ScsiCommand(c)) = pair.sent_to_target.last() else {
        panic!("the immediate command is on the wire")
    };
    assert_eq!(
        (c.itt, c.immediate, c.cmd_sn),
        (imm, true, CmdSn(F + CMD_WINDOW))
    );
    pair.run_held(itts[0]);
    assert_eq!(pair.ini().max_cmd_sn(), CmdSn(F + CMD_WINDOW));
    assert_eq!(pair.ini().queued(), 2, "one completion let one more go");
    while let Some(e) = pair.executing.first() {
        let itt = Itt(e.itt);
        pair.run_held(itt);
    }
    let done = completions(pair.events());
    let order: Vec<Itt> = done.iter().map(|(i, _)| *i).filter(|i| *i != imm).collect();
    assert_eq!(order.len(), itts.len(), "no command was dropped");
    assert!(done
        .iter()
        .all(|(_, r)| matches!(r, Ok(Outcome::Scsi(s)) if s.status == 0)));
    assert_eq!(order, itts, "completions in CmdSN order");
    let sns: Vec<u32> = pair
        .sent_to_target
        .iter()
        .filter_map(|p| match p {
            Pdu::ScsiCommand(c) if !c.immediate => Some(c.cmd_sn.0),
            _ => None,
        })
        .collect();
    assert_eq!(
        sns,
        (F..F + n).collect::<Vec<_>>(),
        "CmdSN counts up by one"
    );
    assert_eq!(pair.ini().cmd_sn(), CmdSn(F + n));
}

/// 13.10, 13.11, 13.14 (with 11.7, 11.8): ImmediateData=Yes and InitialR2T=No: the command
/// carries one segment of immediate data, unsolicited Data-Out (reserved TTT) fills up
/// to FirstBurstLength, and the target's R2Ts ask only for the rest; the data lands on
/// the LUN intact.
#[test]
fn immediate_and_unsolicited_data_up_to_first_burst() {
    let mut pair = Pair::with_initiator(limits());
    let itt = submit(&mut pair, write(6144));
    assert_eq!(scsi_done(&mut pair, itt).status, 0);
    let Some(Pdu::ScsiCommand(c)) = pair.sent_to_target.first() else {
        panic!("the command goes first")
    };
    assert_eq!(c.data.len(), TARGET_RECV_SEGMENT as usize);
    assert!(!c.final_, "unsolicited Data-Out follows");
    let outs = data_outs(&pair);
    assert_eq!(outs[0], (RESERVED_TAG, 0, 1024, 1024, true), "unsolicited");
    assert!(
        outs[1..].iter().all(|o| o.0 != RESERVED_TAG && o.2 >= 2048),
        "solicited beyond FirstBurstLength only: {outs:?}"
    );
    let back = submit(&mut pair, read(6144));
    assert_eq!(scsi_done(&mut pair, back).data_in, pattern(0, 6144));
}

/// 11.7, 11.8, 13.12, 13.13: InitialR2T=Yes, ImmediateData=No: nothing goes
/// unasked; every R2T asks for at most MaxBurstLength, and each answer is one Data-Out
/// sequence with its DataSN from 0, segments of at most the target's
/// MaxRecvDataSegmentLength, consecutive offsets and F on its last PDU.
#[test]
fn r2t_answered_with_data_out_within_max_burst_and_segment() {
    let xfer = XferLimits {
        initial_r2t: true,
        immediate_data: false,
        ..limits()
    };
    let mut pair = Pair::with_initiator(xfer);
    let itt = submit(&mut pair, write(10240));
    assert_eq!(scsi_done(&mut pair, itt).status, 0);
    let r2ts: Vec<(u32, u32, u32)> = pair
        .recv_all()
        .into_iter()
        .filter_map(|p| match p {
            Pdu::R2t(r) => Some((r.ttt.0, r.buffer_offset, r.desired_len)),
            _ => None,
        })
        .collect();
    assert_eq!(r2ts.len(), 3);
    assert!(r2ts.iter().all(|r| r.2 <= xfer.burst_max));
    let outs = data_outs(&pair);
    let mut next_off = 0;
    for (ttt, off, len) in r2ts {
        let seq: Vec<_> = outs.iter().filter(|o| o.0 == ttt).collect();
        assert_eq!(seq.first().map(|o| o.2), Some(off));
        let mut at = off;
        for (i, o) in seq.iter().enumerate() {
            assert_eq!((o.1, o.2), (i as u32, at), "DataSN from 0, offsets follow");
            assert!(o.3 <= TARGET_RECV_SEGMENT as usize);
            assert_eq!(o.4, i + 1 == seq.len(), "F on the sequence's last PDU");
            at += o.3 as u32;
        }
        assert_eq!(at, off + len, "the sequence is exactly the R2T's");
        assert_eq!(off, next_off);
        next_off = at;
    }
    assert_eq!(next_off, 10240);
    let back = submit(&mut pair, read(10240));
    assert_eq!(scsi_done(&mut pair, back).data_in, pattern(0, 10240));
}

/// 11.7, 11.4: a read comes back as Data-In with DataSN counting from 0,
/// consecutive offsets and the status on the last one (S bit) instead of a SCSI
/// Response; the initiator reassembles it and acknowledges the status's StatSN.
#[test]
fn data_in_reassembled_by_data_sn_with_status_on_the_s_bit() {
    let mut pair = Pair::with_initiator(limits());
    let w = submit(&mut pair, write(8192));
    assert_eq!(scsi_done(&mut pair, w).status, 0);
    pair.recv_all();
    let itt = submit(&mut pair, read(8192));
    let wire = pair.recv_all();
    assert!(
        wire.iter().all(|p| matches!(p, Pdu::DataIn(_))),
        "no SCSI Response"
    );
    let ins: Vec<_> = wire
        .iter()
        .filter_map(|p| match p {
            Pdu::DataIn(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ins.len(), 8);
    for (i, d) in ins.iter().enumerate() {
        assert_eq!(d.data_sn.0, i as u32);
        assert_eq!(d.status.is_some(), i == 7);
    }
    let last_stat_sn = ins[7].stat_sn;
    let s = scsi_done(&mut pair, itt);
    assert_eq!(s.data_in, pattern(0, 8192));
    assert_eq!(s.residual.count, 0);
    assert_eq!(pair.ini().exp_stat_sn(), last_stat_sn.next());
    // The next request acknowledges it.
    submit(&mut pair, tur());
    let Some(Pdu::ScsiCommand(c)) = pair.sent_to_target.last() else {
        panic!("a command went out")
    };
    assert_eq!(c.exp_stat_sn, last_stat_sn.next());
}

/// 11.4: a command the target fails returns CHECK CONDITION with sense
/// data through the initiator; a short read reports its underflow residual.
#[test]
fn check_condition_sense_and_residual_reach_the_initiator() {
    let mut pair = Pair::with_initiator(limits());
    // READ (10) past the end of the LUN.
    let bad = submit(
        &mut pair,
        ScsiRequest {
            cdb: Bytes::from_static(&[0x28, 0, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0]),
            data_in_len: 512,
            ..tur()
        },
    );
    let s = scsi_done(&mut pair, bad);
    assert_eq!(s.status, 2);
    assert!(s.sense.len() >= 14, "sense data comes with CHECK CONDITION");
    // Ask for 2048 bytes with a 1-block CDB: 1536 bytes of underflow.
    let short = submit(
        &mut pair,
        ScsiRequest {
            data_in_len: 2048,
            ..read(512)
        },
    );
    let s = scsi_done(&mut pair, short);
    assert_eq!((s.status, s.data_in.len()), (0, 512));
    assert!(s.residual.underflow);
    assert_eq!(s.residual.count, 1536);
}

/// 11.18, 11.19: NOP both ways. The initiator's ping is echoed with its data; an idle
/// connection is pinged by the target every NOPInInterval, and the initiator answers
/// each ping with its TTT (reserved ITT) so the target keeps the connection for minutes
/// of virtual time.
#[test]
fn nop_pings_both_ways_keep_the_connection() {
    let mut pair = Pair::with_initiator(limits());
    let now = pair.now;
    let ping = pair
        .ini()
        .ping(Bytes::from_static(b"ftss-ping"), now)
        .expect("ping");
    pair.drive();
    let done = completions(pair.events());
    assert_eq!(
        done,
        vec![(ping, Ok(Outcome::Nop(Bytes::from_static(b"ftss-ping"))))]
    );
    pair.advance(Duration::from_secs(120));
    assert!(!pair.m.is_closed(), "answered pings keep the connection");
    assert!(!pair.ini().is_closed());
    let target_pings: Vec<Ttt> = pair
        .recv_all()
        .into_iter()
        .filter_map(|p| match p {
            Pdu::NopIn(n) if n.itt.0 == RESERVED_TAG => Some(n.ttt),
            _ => None,
        })
        .collect();
    let answers: Vec<Ttt> = pair
        .sent_to_target
        .iter()
        .filter_map(|p| match p {
            Pdu::NopOut(n) if n.itt.0 == RESERVED_TAG => Some(n.ttt),
            _ => None,
        })
        .collect();
    assert!(target_pings.len() >= 120 / NOP_INTERVAL_S as usize - 1);
    assert_eq!(answers, target_pings, "each ping answered with its TTT");
    assert!(
        pair.events().is_empty(),
        "the target's pings are not the caller's business"
    );
}

/// 11.19: when the peer goes silent, each side's ping times out on its own clock: the
/// target's NOPInInterval plus its NOP timeout after the initiator last sent anything,
/// the initiator's ping timeout after its ping (its ping fails with a timeout, other
/// requests with the closed connection).
#[test]
fn unanswered_pings_close_both_sides() {
    let mut pair = Pair::with_initiator(limits());
    pair.auto_run = false;
    let cmd = submit(&mut pair, tur());
    pair.link_down = true;
    let now = pair.now;
    let ping = pair
        .ini()
        .ping(Bytes::from_static(b"x"), now)
        .expect("ping");
    pair.drive();
    let ms = Duration::from_millis(1);
    let target_gives_up = Duration::from_secs(u64::from(NOP_INTERVAL_S + NOP_TIMEOUT_S));
    pair.advance(target_gives_up - ms);
    assert!(!pair.m.is_closed(), "the target's ping is not overdue yet");
    pair.advance(ms);
    assert!(pair.m.is_closed(), "the target's ping went unanswered");
    assert!(!pair.ini().is_closed());
    pair.advance(Duration::from_secs(PING_TIMEOUT_S) - target_gives_up - ms);
    assert!(
        !pair.ini().is_closed(),
        "the initiator's ping is not overdue yet"
    );
    assert!(pair.events().is_empty());
    pair.advance(ms);
    assert_eq!(pair.ini().closed(), Some(&ConnError::PingTimeout));
    assert_eq!(
        pair.events(),
        vec![
            Event::Done {
                itt: cmd,
                result: Err(TaskError::ConnectionClosed)
            },
            Event::Done {
                itt: ping,
                result: Err(TaskError::Timeout)
            },
            Event::Closed(ConnError::PingTimeout),
        ]
    );
}

/// 11.5.1: ABORT TASK from the initiator names the command by ITT and RefCmdSN; the
/// target answers once the running command returned and never sends its response; the
/// initiator ends the command as aborted, and the CmdSN it took stays used.
#[test]
fn abort_task_end_to_end() {
    let mut pair = Pair::with_initiator(limits());
    pair.auto_run = false;
    let victim = submit(&mut pair, tur());
    let tmf = pair
        .ini()
        .abort_task(victim)
        .expect("abort")
        .expect("the command was sent");
    pair.drive();
    let Some(Pdu::TaskMgmtRequest(r)) = pair.sent_to_target.last() else {
        panic!("the TMF is on the wire")
    };
    assert_eq!(
        (r.function, r.rtt, r.ref_cmd_sn),
        (TmfFunction::AbortTask, victim, CmdSn(F))
    );
    assert!(
        pair.events().is_empty(),
        "the TMF waits for the running command"
    );
    pair.run_held(victim);
    let done = completions(pair.events());
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(matches!(&done[0], (i, Ok(Outcome::TaskMgmt(t))) if *i == tmf && t.response == 0));
    assert_eq!(done[1], (victim, Err(TaskError::Aborted)));
    assert!(
        !pair
            .recv_all()
            .iter()
            .any(|p| matches!(p, Pdu::ScsiResponse(s) if s.itt == victim)),
        "no response for the aborted command"
    );
    pair.auto_run = true;
    let next = submit(&mut pair, tur());
    assert_eq!(scsi_done(&mut pair, next).status, 0);
    assert_eq!(pair.ini().cmd_sn(), CmdSn(F + 2));
}

/// 11.17.1 (reason 6): immediate commands beyond what the target runs at once are
/// rejected; the initiator fails exactly the rejected one and the rest complete.
#[test]
fn rejected_immediate_command_fails_only_itself() {
    let mut pair = Pair::with_initiator(limits());
    pair.auto_run = false;
    let imm = ScsiRequest {
        immediate: true,
        ..tur()
    };
    let itts: Vec<Itt> = (0..=IMMEDIATE_TASKS_MAX)
        .map(|_| submit(&mut pair, imm.clone()))
        .collect();
    let done = completions(pair.events());
    assert_eq!(
        done,
        vec![(
            itts[IMMEDIATE_TASKS_MAX],
            Err(TaskError::Rejected {
                reason: RejectReason::ImmediateCommandReject as u8
            })
        )]
    );
    while let Some(e) = pair.executing.first() {
        let itt = Itt(e.itt);
        pair.run_held(itt);
    }
    let done = completions(pair.events());
    assert_eq!(done.len(), IMMEDIATE_TASKS_MAX);
    assert!(!pair.ini().is_closed());
}

/// 11.14, 11.15: the initiator's Logout (close the session) is answered with response 0;
/// then both sides are closed and the initiator takes no more requests.
#[test]
fn logout_end_to_end() {
    let mut pair = Pair::with_initiator(limits());
    let t = submit(&mut pair, tur());
    assert_eq!(scsi_done(&mut pair, t).status, 0);
    let itt = pair.ini().logout(0).expect("logout");
    pair.drive();
    let done = completions(pair.events());
    assert!(
        matches!(&done[..], [(i, Ok(Outcome::Logout(r)))] if *i == itt && r.response == 0 && r.stat_sn == StatSn(2)),
        "{done:?}"
    );
    assert!(pair.m.is_closed());
    assert_eq!(pair.ini().closed(), Some(&ConnError::LoggedOut));
    assert!(pair.ini().submit_scsi(tur()).is_err());
}

/// 11.10, 11.11: text longer than the target's MaxRecvDataSegmentLength goes in parts
/// (C=1), each acknowledged by an empty Text Response; an answer longer than the
/// initiator's comes in parts too (C=1 with a TTT), each pulled with an empty Text
/// Request quoting that TTT. All of it under one ITT, each request taking a CmdSN.
#[test]
fn long_text_both_ways_goes_in_parts() {
    let mut pair = Pair::with_initiator(limits());
    let mut keys = Vec::new();
    for i in 0..100 {
        keys.extend_from_slice(format!("X-org.ftss.unknown-{i:03}=yes").as_bytes());
        keys.push(0);
    }
    let mut chunks: Vec<Bytes> = ftss_proto::text::split(&keys, TARGET_RECV_SEGMENT as usize)
        .into_iter()
        .map(Bytes::copy_from_slice)
        .collect();
    assert!(chunks.len() > 2);
    chunks.reverse();
    let (mut itt, mut ttt) = (None, Ttt(RESERVED_TAG));
    let mut answer = Vec::new();
    let mut requests = 0;
    loop {
        let data = chunks.pop().unwrap_or_default();
        let more = !chunks.is_empty();
        let i = pair
            .ini()
            .submit_text(itt, ttt, data, more)
            .expect("one segment of text");
        requests += 1;
        assert!(
            itt.is_none() || itt == Some(i),
            "the negotiation keeps its ITT"
        );
        itt = Some(i);
        pair.drive();
        let done = completions(pair.events());
        let [(_, Ok(Outcome::Text(r)))] = &done[..] else {
            panic!("expected one Text Response, got {done:?}")
        };
        if more {
            assert!(
                r.data.is_empty() && !r.final_,
                "a part of ours is acknowledged: {r:?}"
            );
        }
        answer.extend_from_slice(&r.data);
        ttt = r.ttt;
        if !more && r.final_ {
            assert_eq!(r.ttt, Ttt(RESERVED_TAG));
            break;
        }
    }
    let answer = String::from_utf8(answer).expect("text");
    assert_eq!(answer.matches("NotUnderstood").count(), 100, "{answer}");
    let sent: Vec<(Itt, u32, usize)> = pair
        .sent_to_target
        .iter()
        .filter_map(|p| match p {
            Pdu::TextRequest(t) => Some((t.itt, t.cmd_sn.0, t.data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), requests);
    assert!(sent.len() > 4, "parts both ways: {sent:?}");
    assert!(sent
        .iter()
        .all(|r| Some(r.0) == itt && r.2 <= TARGET_RECV_SEGMENT as usize));
    let sns: Vec<u32> = sent.iter().map(|r| r.1).collect();
    assert_eq!(sns, (F..F + requests as u32).collect::<Vec<_>>());
}

/// 13.1, 11.2 (with 7.8): with HeaderDigest and DataDigest CRC32C both ways, every PDU
/// either side frames carries digests the other side checks: a write answered by R2Ts,
/// a read back in Data-In and a ping all go through, and neither side saw an error.
#[test]
fn digests_both_ways_end_to_end() {
    let mut pair = Pair::with_initiator_digests();
    let w = submit(&mut pair, write(8192));
    assert_eq!(scsi_done(&mut pair, w).status, 0);
    let r = submit(&mut pair, read(8192));
    assert_eq!(scsi_done(&mut pair, r).data_in, pattern(0, 8192));
    let now = pair.now;
    pair.ini()
        .ping(Bytes::from_static(b"d"), now)
        .expect("ping");
    pair.drive();
    assert!(matches!(
        &completions(pair.events())[..],
        [(_, Ok(Outcome::Nop(_)))]
    ));
    assert!(
        !pair.recv_all().iter().any(|p| matches!(p, Pdu::Reject(_))),
        "no digest error on either side"
    );
    assert!(!pair.m.is_closed() && !pair.ini().is_closed());
}
