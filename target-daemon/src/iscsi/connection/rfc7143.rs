//! RFC 7143 full feature phase rules on the connection [`Pair`]: the CmdSN window, NOP
//! pings, R2T and Data-Out sequencing, unsolicited data, Data-In, task management, logout
//! and Reject, each checked on virtual time with no socket and no sleep. "No answer" is
//! exact here: the machine was driven until it had nothing more to say.

use std::time::Duration;

use bytes::BytesMut;
use ftss_proto::pdu::{
    DataIn, Itt, NopIn, Pdu, R2t, Reject, RejectReason, ScsiResponse, SnackRequest,
    TaskMgmtResponse, TmfFunction, Ttt,
};
use ftss_proto::serial::{CmdSn, StatSn};

use super::machine::{Control, IMMEDIATE_TASKS_MAX};
use super::pair::{
    command, data_out, logout, nop_out, read10, tmf, write10, Pair, CMD_WINDOW, FIRST_CMD_SN,
    NOP_INTERVAL_S, NOP_TIMEOUT_S, RESERVED, TUR,
};
use crate::scsi::{AbortWait, Park, ScsiOutcome};

const F: u32 = FIRST_CMD_SN;

fn response(p: Option<Pdu>) -> ScsiResponse {
    match p {
        Some(Pdu::ScsiResponse(r)) => r,
        other => panic!("expected a SCSI Response, got {other:?}"),
    }
}

fn r2t(p: Option<Pdu>) -> R2t {
    match p {
        Some(Pdu::R2t(r)) => r,
        other => panic!("expected an R2T, got {other:?}"),
    }
}

fn reject(p: Option<Pdu>) -> Reject {
    match p {
        Some(Pdu::Reject(r)) => r,
        other => panic!("expected a Reject, got {other:?}"),
    }
}

fn nop_in(p: Option<Pdu>) -> NopIn {
    match p {
        Some(Pdu::NopIn(n)) => n,
        other => panic!("expected a NOP-In, got {other:?}"),
    }
}

fn tmf_response(p: Option<Pdu>) -> TaskMgmtResponse {
    match p {
        Some(Pdu::TaskMgmtResponse(r)) => r,
        other => panic!("expected a Task Management Response, got {other:?}"),
    }
}

fn data_in(p: Option<Pdu>) -> DataIn {
    match p {
        Some(Pdu::DataIn(d)) => d,
        other => panic!("expected a Data-In, got {other:?}"),
    }
}

/// Sends a TEST UNIT READY with `cmd_sn` and returns its ITT.
fn tur(pair: &mut Pair, cmd_sn: u32) -> Itt {
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(command(itt, cmd_sn, &TUR, 0)));
    itt
}

/// 4.2.2.1: a command beyond MaxCmdSN and one below ExpCmdSN (a duplicate) are dropped
/// without an answer; the window goes on as if they never came.
#[test]
fn out_of_window_and_duplicate_commands_are_dropped() {
    let mut pair = Pair::new();
    let itt = tur(&mut pair, F);
    let r = response(pair.recv());
    assert_eq!((r.itt, r.status), (itt, 0));
    assert_eq!(r.exp_cmd_sn, CmdSn(F + 1));
    // One command completed: the window is ExpCmdSN .. ExpCmdSN + depth - 1.
    assert_eq!(r.max_cmd_sn, CmdSn(F + CMD_WINDOW));
    // Beyond MaxCmdSN.
    tur(&mut pair, F + 1 + CMD_WINDOW);
    assert!(
        pair.recv().is_none(),
        "a command beyond MaxCmdSN gets no answer"
    );
    // A duplicate of the one already done.
    tur(&mut pair, F);
    assert!(pair.recv().is_none(), "a duplicate command gets no answer");
    let itt = tur(&mut pair, F + 1);
    let r = response(pair.recv());
    assert_eq!((r.itt, r.exp_cmd_sn), (itt, CmdSn(F + 2)));
}

/// 4.2.2.1: commands that arrive ahead of a gap wait for it and then run in CmdSN order;
/// a second copy of a waiting command is dropped.
#[test]
fn commands_wait_for_a_gap_and_run_in_cmdsn_order() {
    let mut pair = Pair::new();
    let late = tur(&mut pair, F + 2);
    tur(&mut pair, F + 2);
    let middle = tur(&mut pair, F + 1);
    assert!(
        pair.recv().is_none(),
        "nothing runs before ExpCmdSN arrives"
    );
    let first = tur(&mut pair, F);
    let order: Vec<Itt> = pair
        .recv_all()
        .into_iter()
        .map(|p| response(Some(p)).itt)
        .collect();
    assert_eq!(order, vec![first, middle, late]);
}

/// 3.2.2.1, 4.2.2.1: immediate commands are delivered at once and neither take a CmdSN
/// nor move the window.
#[test]
fn immediate_commands_do_not_advance_the_window() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(ftss_proto::pdu::ScsiCommand {
        immediate: true,
        ..command(itt, F, &TUR, 0)
    }));
    let r = response(pair.recv());
    assert_eq!((r.itt, r.exp_cmd_sn), (itt, CmdSn(F)));
    assert_eq!(r.max_cmd_sn, CmdSn(F + CMD_WINDOW - 1));
    // The CmdSN it carried is still the next one expected.
    let itt = tur(&mut pair, F);
    assert_eq!(response(pair.recv()).itt, itt);
}

/// 4.2.2.1: MaxCmdSN opens only as commands complete, so a full window of commands
/// still executing closes it; the next command beyond it is dropped.
#[test]
fn max_cmd_sn_opens_as_commands_complete() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let itts: Vec<Itt> = (0..CMD_WINDOW).map(|i| tur(&mut pair, F + i)).collect();
    assert_eq!(pair.executing.len(), CMD_WINDOW as usize);
    tur(&mut pair, F + CMD_WINDOW);
    assert_eq!(
        pair.executing.len(),
        CMD_WINDOW as usize,
        "beyond MaxCmdSN: dropped"
    );
    pair.run_held(itts[0]);
    let r = response(pair.recv());
    assert_eq!(r.exp_cmd_sn, CmdSn(F + CMD_WINDOW));
    assert_eq!(r.max_cmd_sn, CmdSn(F + CMD_WINDOW));
    tur(&mut pair, F + CMD_WINDOW);
    assert_eq!(
        pair.executing.len(),
        CMD_WINDOW as usize,
        "now in the window"
    );
}

/// 11.18, 11.19: a NOP-Out with an ITT is answered with a NOP-In echoing it (and a new
/// StatSN); one with the reserved ITT gets no answer.
#[test]
fn nop_out_is_echoed_and_reserved_itt_gets_no_reply() {
    let mut pair = Pair::new();
    let mut ping = nop_out(7, RESERVED, F, false);
    if let Pdu::NopOut(n) = &mut ping {
        n.data = bytes::Bytes::from_static(b"ping-data");
    }
    pair.send(&ping);
    let n = nop_in(pair.recv());
    assert_eq!(
        (n.itt, n.ttt, n.stat_sn),
        (Itt(7), Ttt(RESERVED), StatSn(1))
    );
    assert_eq!(&n.data[..], b"ping-data", "the ping data comes back");
    assert_eq!(n.exp_cmd_sn, CmdSn(F + 1));
    pair.send(&nop_out(RESERVED, RESERVED, F + 1, true));
    assert!(
        pair.recv().is_none(),
        "a NOP-Out with the reserved ITT is never answered"
    );
    // Nor does it take a CmdSN: the next request uses the same one.
    pair.send(&nop_out(8, RESERVED, F + 1, false));
    assert_eq!(nop_in(pair.recv()).itt, Itt(8));
}

/// 11.19: an idle connection is pinged (reserved ITT, a TTT, StatSN not advanced); an
/// answer quoting the TTT keeps the connection, and the next ping waits for idleness.
#[test]
fn target_pings_idle_connections_and_an_answer_keeps_them() {
    let mut pair = Pair::new();
    let interval = Duration::from_secs(u64::from(NOP_INTERVAL_S));
    pair.advance(interval - Duration::from_millis(1));
    assert!(pair.recv().is_none(), "no ping before the interval");
    pair.advance(Duration::from_millis(1));
    let ping = nop_in(pair.recv());
    assert_eq!(ping.itt, Itt(RESERVED));
    assert_ne!(ping.ttt, Ttt(RESERVED));
    assert_eq!(ping.stat_sn, StatSn(1), "a ping does not advance StatSN");
    pair.advance(Duration::from_secs(1));
    pair.send(&nop_out(RESERVED, ping.ttt.0, F, true));
    assert!(pair.recv().is_none(), "the answer is not answered");
    pair.advance(Duration::from_secs(u64::from(NOP_TIMEOUT_S)));
    assert!(
        !pair.m.is_closed(),
        "an answered ping does not close the connection"
    );
    // Idle again since the answer: pinged again, once per interval.
    let again = nop_in(pair.recv());
    assert_ne!(again.ttt, ping.ttt);
}

/// 11.19: a ping unanswered for the NOP timeout ends the connection; an answer with the
/// wrong TTT does not count.
#[test]
fn unanswered_ping_closes_the_connection() {
    let mut pair = Pair::new();
    pair.advance(Duration::from_secs(u64::from(NOP_INTERVAL_S)));
    let ping = nop_in(pair.recv());
    pair.send(&nop_out(RESERVED, ping.ttt.0 ^ 1, F, true));
    pair.advance(Duration::from_secs(u64::from(NOP_TIMEOUT_S)) - Duration::from_millis(1));
    assert!(!pair.m.is_closed());
    pair.advance(Duration::from_millis(1));
    assert!(pair.m.is_closed(), "the ping's deadline passed");
}

/// 11.8, 11.7.5: a write with InitialR2T off but no unsolicited data gets R2Ts of at
/// most MaxBurstLength, one outstanding (MaxOutstandingR2T=1), R2TSN counting up; the
/// Data-Out DataSN restarts at 0 for every R2T, and the response reports the R2Ts in
/// ExpDataSN.
#[test]
fn r2t_sequences_and_data_sn_restart_per_r2t() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 8192, 0, true)));
    let first = r2t(pair.recv());
    assert_eq!(
        (first.r2t_sn.0, first.buffer_offset, first.desired_len),
        (0, 0, 4096)
    );
    assert!(pair.recv().is_none(), "MaxOutstandingR2T=1");
    for i in 0..4 {
        pair.send(&data_out(itt, first.ttt.0, i, i * 1024, 1024, i == 3));
    }
    let second = r2t(pair.recv());
    assert_eq!(
        (second.r2t_sn.0, second.buffer_offset, second.desired_len),
        (1, 4096, 4096)
    );
    assert_ne!(second.ttt, first.ttt);
    for i in 0..4 {
        pair.send(&data_out(
            itt,
            second.ttt.0,
            i,
            4096 + i * 1024,
            1024,
            i == 3,
        ));
    }
    let r = response(pair.recv());
    assert_eq!((r.itt, r.status, r.exp_data_sn.0), (itt, 0, 2));
    // The data reached the medium: read it back.
    let rd = pair.itt();
    pair.send(&Pdu::ScsiCommand(command(rd, F + 1, &read10(16), 8192)));
    let mut back = BytesMut::new();
    for p in pair.recv_all() {
        if let Pdu::DataIn(d) = p {
            back.extend_from_slice(&d.data);
        }
    }
    assert_eq!(&back[..], &super::pair::pattern(0, 8192)[..]);
}

/// 11.7.4, 11.8: a Data-Out out of DataSN order, at an offset outside its R2T or with a
/// TTT the target never gave is rejected (Invalid PDU field); the task goes on.
#[test]
fn data_out_out_of_sequence_is_rejected() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 2048, 0, true)));
    let t = r2t(pair.recv());
    pair.send(&data_out(itt, t.ttt.0, 1, 0, 1024, false));
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::InvalidPduField as u8
    );
    pair.send(&data_out(itt, t.ttt.0, 0, 4096, 1024, false));
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::InvalidPduField as u8
    );
    pair.send(&data_out(itt, t.ttt.0 ^ 0x55, 0, 0, 1024, false));
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::InvalidPduField as u8
    );
    pair.send(&data_out(itt, t.ttt.0, 0, 0, 1024, false));
    pair.send(&data_out(itt, t.ttt.0, 1, 1024, 1024, true));
    assert_eq!(response(pair.recv()).status, 0);
}

/// 13.10, 13.11, 13.14: immediate data plus unsolicited Data-Out (TTT reserved) up to
/// FirstBurstLength, F on the last; the target's R2Ts ask only for what lies beyond
/// FirstBurstLength (at once: that part will never come unasked).
#[test]
fn unsolicited_data_up_to_first_burst_then_r2t_for_the_rest() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 4096, 1024, false)));
    let t = r2t(pair.recv());
    assert_eq!((t.buffer_offset, t.desired_len), (2048, 2048));
    assert!(pair.recv().is_none());
    pair.send(&data_out(itt, RESERVED, 0, 1024, 1024, true));
    assert!(pair.recv().is_none(), "the solicited part is still missing");
    pair.send(&data_out(itt, t.ttt.0, 0, 2048, 1024, false));
    pair.send(&data_out(itt, t.ttt.0, 1, 3072, 1024, true));
    assert_eq!(response(pair.recv()).status, 0);
}

/// 13.14: immediate data beyond FirstBurstLength is a protocol error: the command is
/// rejected and never runs.
#[test]
fn immediate_data_beyond_first_burst_is_rejected() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 4096, 3072, false)));
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::ProtocolError as u8
    );
    assert!(pair.recv().is_none());
    // The window moved past it: the next CmdSN runs.
    tur(&mut pair, F + 1);
    assert_eq!(response(pair.recv()).status, 0);
}

/// 11.7, 13.12, 13.13: Data-In segments are at most MaxRecvDataSegmentLength, a burst ends with
/// F at MaxBurstLength, DataSN and offsets count up across bursts, and GOOD status rides
/// on the last Data-In (phase collapse) with no SCSI Response.
#[test]
fn data_in_respects_segment_and_burst_limits() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(command(itt, F, &read10(16), 8192)));
    let all = pair.recv_all();
    assert_eq!(all.len(), 8);
    for (i, p) in all.into_iter().enumerate() {
        let d = data_in(Some(p));
        let i = i as u32;
        assert_eq!(
            (d.data_sn.0, d.buffer_offset, d.data.len()),
            (i, i * 1024, 1024)
        );
        assert_eq!(d.final_, i == 3 || i == 7, "F ends each 4096-byte burst");
        assert_eq!(d.status, (i == 7).then_some(0));
    }
}

/// 11.5.1: ABORT TASK for a command still executing answers once the command returned,
/// and the command's own response is never sent.
#[test]
fn abort_task_waits_for_the_running_command_and_suppresses_its_response() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let victim = tur(&mut pair, F);
    let abort = pair.itt();
    pair.send(&tmf(TmfFunction::AbortTask, abort, victim, F + 1, F));
    assert!(
        pair.recv().is_none(),
        "the TMF waits for the running command"
    );
    pair.finish_held(victim, ScsiOutcome::default());
    let r = tmf_response(pair.recv());
    assert_eq!((r.itt, r.response), (abort, 0));
    assert!(pair.recv().is_none(), "the aborted command is not answered");
}

/// 11.5.1: ABORT TASK for a task the target does not know: "function complete" when
/// RefCmdSN lies in the window below the TMF's CmdSN (and that CmdSN is then treated
/// as received, releasing what waited for it), "task does not exist" otherwise.
#[test]
fn abort_task_for_unknown_task_follows_ref_cmd_sn() {
    let mut pair = Pair::new();
    let waiting = tur(&mut pair, F + 1);
    let abort = pair.itt();
    pair.send(&tmf(TmfFunction::AbortTask, abort, Itt(999), F + 2, F));
    let all = pair.recv_all();
    assert_eq!(all.len(), 2, "{all:?}");
    let t = tmf_response(Some(all[0].clone()));
    assert_eq!((t.itt, t.response), (abort, 0));
    let r = response(Some(all[1].clone()));
    assert_eq!(
        r.itt, waiting,
        "the skipped CmdSN released the command behind it"
    );
    let abort = pair.itt();
    pair.send(&tmf(TmfFunction::AbortTask, abort, Itt(998), F + 2, F + 5));
    assert_eq!(
        tmf_response(pair.recv()).response,
        1,
        "RefCmdSN not below CmdSN"
    );
}

/// 11.5.1: LOGICAL UNIT RESET ends the LUN's tasks: a write still waiting for Data-Out
/// ends at once, silently; Data-Out that still comes for it is discarded.
#[test]
fn lun_reset_ends_the_luns_tasks() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 2048, 0, true)));
    let t = r2t(pair.recv());
    let reset = pair.itt();
    pair.send(&tmf(
        TmfFunction::LogicalUnitReset,
        reset,
        Itt(RESERVED),
        F + 1,
        0,
    ));
    let r = tmf_response(pair.recv());
    assert_eq!((r.itt, r.response), (reset, 0));
    pair.send(&data_out(itt, t.ttt.0, 0, 0, 1024, false));
    assert!(
        pair.recv().is_none(),
        "Data-Out for an ended task is dropped"
    );
    // The window opened for the write that ended.
    let next = tur(&mut pair, F + 1);
    assert_eq!(response(pair.recv()).itt, next);
}

/// 11.14, 11.15: Logout "close the session" is answered (response 0) and the connection
/// closes; "remove the connection for recovery" is refused at ErrorRecoveryLevel 0
/// (response 2) and the connection stays.
#[test]
fn logout_answers_then_closes() {
    let mut pair = Pair::new();
    let itt = pair.itt();
    pair.send(&logout(itt, F, 2));
    match pair.recv() {
        Some(Pdu::LogoutResponse(r)) => assert_eq!((r.itt, r.response), (itt, 2)),
        other => panic!("expected a Logout Response, got {other:?}"),
    }
    assert!(!pair.m.is_closed());
    let itt = pair.itt();
    pair.send(&logout(itt, F + 1, 0));
    match pair.recv() {
        Some(Pdu::LogoutResponse(r)) => {
            assert_eq!((r.itt, r.response, r.stat_sn), (itt, 0, StatSn(2)));
        }
        other => panic!("expected a Logout Response, got {other:?}"),
    }
    assert!(pair.m.is_closed());
}

/// 11.17, 7.2: what the target cannot take is rejected with the offending header and
/// the connection goes on: SNACK at ErrorRecoveryLevel 0, an unknown opcode, a data
/// segment longer than MaxRecvDataSegmentLength (skipped whole), a Login Request in the
/// full feature phase, and a command reusing a live ITT.
#[test]
fn malformed_pdus_are_rejected_and_the_connection_lives() {
    let mut pair = Pair::new();
    pair.send(&Pdu::SnackRequest(SnackRequest {
        snack_type: 0,
        lun: super::pair::lun0(),
        itt: Itt(5),
        ttt: Ttt(RESERVED),
        exp_stat_sn: StatSn(0),
        beg_run: 0,
        run_length: 0,
    }));
    let r = reject(pair.recv());
    assert_eq!(r.reason, RejectReason::ProtocolError as u8);
    assert_eq!(
        r.header[0] & 0x3f,
        0x10,
        "the Reject quotes the SNACK's header"
    );

    let mut bhs = [0u8; 48];
    bhs[0] = 0x1d; // not an initiator opcode
    bhs[16..20].copy_from_slice(&9u32.to_be_bytes());
    pair.send_bytes(&bhs);
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::CommandNotSupported as u8
    );

    // A NOP-Out with 16 KiB of data against an 8 KiB MaxRecvDataSegmentLength.
    let mut big = BytesMut::new();
    let mut bhs = [0u8; 48];
    bhs[0] = 0x40;
    bhs[1] = 0x80;
    bhs[5..8].copy_from_slice(&(16u32 << 10).to_be_bytes()[1..]);
    bhs[16..20].copy_from_slice(&3u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&F.to_be_bytes());
    big.extend_from_slice(&bhs);
    big.extend_from_slice(&[0u8; 16 << 10]);
    pair.send_bytes(&big);
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::ProtocolError as u8
    );
    assert!(!pair.m.is_closed(), "framing survives an oversized segment");

    let mut login = [0u8; 48];
    login[0] = 0x43;
    pair.send_bytes(&login);
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::ProtocolError as u8
    );

    pair.auto_run = false;
    let itt = tur(&mut pair, F);
    pair.send(&Pdu::ScsiCommand(command(itt, F + 1, &TUR, 0)));
    assert_eq!(
        reject(pair.recv()).reason,
        RejectReason::TaskInProgress as u8
    );
    pair.run_held(itt);
    assert_eq!(
        response(pair.recv()).itt,
        itt,
        "the live task was not disturbed"
    );
    assert!(!pair.m.is_closed());
}

/// 11.17.1 (reason 6): an immediate command beyond what the target runs at once is
/// rejected ("immediate command reject"); the ones running are not disturbed.
#[test]
fn immediate_commands_beyond_the_limit_are_rejected() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let mut itts = Vec::new();
    for _ in 0..=IMMEDIATE_TASKS_MAX {
        let itt = pair.itt();
        itts.push(itt);
        pair.send(&Pdu::ScsiCommand(ftss_proto::pdu::ScsiCommand {
            immediate: true,
            ..command(itt, F, &TUR, 0)
        }));
    }
    let r = reject(pair.recv());
    assert_eq!(r.reason, RejectReason::ImmediateCommandReject as u8);
    assert_eq!(pair.executing.len(), IMMEDIATE_TASKS_MAX);
    pair.run_held(itts[0]);
    assert_eq!(response(pair.recv()).itt, itts[0]);
}

/// 11.5.1, 11.6.1: a target reset from an initiator the configuration does not name in
/// `reset_initiators` is refused with "function authorization failed" and ends nothing.
#[test]
fn target_reset_needs_authorization() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let running = tur(&mut pair, F);
    for function in [TmfFunction::TargetWarmReset, TmfFunction::TargetColdReset] {
        let reset = pair.itt();
        pair.send(&tmf(function, reset, Itt(RESERVED), F + 1, 0));
        let r = tmf_response(pair.recv());
        assert_eq!((r.itt, r.response), (reset, 6));
    }
    assert!(!pair.m.is_closed(), "a refused cold reset closes nothing");
    pair.run_held(running);
    assert_eq!(response(pair.recv()).itt, running);
}

/// 11.5.1: ABORT TASK SET ends every task of the LUN: one still waiting for Data-Out at
/// once, one executing when it returns; the TMF answers after both, and neither task is
/// answered.
#[test]
fn abort_task_set_ends_collecting_and_running_tasks() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let running = tur(&mut pair, F);
    let writing = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(writing, F + 1, 2048, 0, true)));
    let t = r2t(pair.recv());
    let abort = pair.itt();
    pair.send(&tmf(
        TmfFunction::AbortTaskSet,
        abort,
        Itt(RESERVED),
        F + 2,
        0,
    ));
    assert!(
        pair.recv().is_none(),
        "the TMF waits for the running command"
    );
    pair.send(&data_out(writing, t.ttt.0, 0, 0, 1024, false));
    assert!(pair.recv().is_none(), "the ended write takes no more data");
    pair.finish_held(running, ScsiOutcome::default());
    let r = tmf_response(pair.recv());
    assert_eq!((r.itt, r.response), (abort, 0));
    assert!(pair.recv().is_none());
    assert!(pair.executing.is_empty(), "the write never ran");
}

/// SPC-4 5.15.11.2.6 (PREEMPT AND ABORT from another nexus, TAS=1): this nexus's tasks
/// for the LUN end with TASK ABORTED status; a write still collecting data at once, a
/// command executing when it returns, and the abort's wait lasts until then.
#[test]
fn abort_from_another_nexus_reports_task_aborted() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let reading = pair.itt();
    pair.send(&Pdu::ScsiCommand(command(reading, F, &read10(1), 512)));
    let writing = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(writing, F + 1, 2048, 0, true)));
    r2t(pair.recv());
    let (wait, ended) = AbortWait::for_tests();
    pair.m.handle_control(Control::AbortLun { lun: 0, wait });
    pair.drive();
    let r = response(pair.recv());
    assert_eq!((r.itt, r.status), (writing, 0x40), "TASK ABORTED at once");
    assert_eq!(
        ended.try_recv(),
        Err(std::sync::mpsc::TryRecvError::Empty),
        "the read still executes: the abort waits"
    );
    pair.finish_held(reading, ScsiOutcome::default());
    let r = response(pair.recv());
    assert_eq!((r.itt, r.status), (reading, 0x40));
    assert_eq!(
        ended.try_recv(),
        Err(std::sync::mpsc::TryRecvError::Disconnected),
        "every task ended: the abort's wait is over"
    );
}

/// ErrorRecoveryLevel 0: a connection that closes with a command executing ends it silently once it
/// returns; nothing is answered and nothing waits any more.
#[test]
fn close_drains_running_commands_silently() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let running = tur(&mut pair, F);
    let writing = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(writing, F + 1, 2048, 0, true)));
    r2t(pair.recv());
    pair.m.close_and_drain();
    assert_eq!(
        pair.m.running_tasks(),
        1,
        "the write still collecting ended"
    );
    pair.finish_held(running, ScsiOutcome::default());
    assert_eq!(pair.m.running_tasks(), 0);
    assert!(pair.recv().is_none(), "a closed connection answers nothing");
}

/// A command the SCSI layer parks (a long poll) holds no execution: it waits, runs again
/// with the deadline it chose when resumed, and answers then. ABORT TASK on a parked
/// command ends it at once and ends its wait.
#[test]
fn parked_command_resumes_and_abort_ends_its_wait() {
    let mut pair = Pair::new();
    pair.auto_run = false;
    let park = |pair: &Pair| {
        // The sender is dropped: only the deadline would end this wait in the shell.
        let (_, wake) = tokio::sync::watch::channel(());
        ScsiOutcome {
            park: Some(Park {
                wake,
                until: pair.now + Duration::from_secs(20),
            }),
            ..ScsiOutcome::default()
        }
    };
    let polled = tur(&mut pair, F);
    let outcome = park(&pair);
    pair.finish_held(polled, outcome);
    assert!(
        pair.recv().is_none(),
        "a parked command is not answered yet"
    );
    let p = pair.parks.pop().expect("the command was parked");
    assert!(pair.m.is_parked(p.itt, p.generation));
    pair.m.handle_resume(p.itt, p.generation, p.park.until);
    pair.drive();
    let again = pair.executing.pop().expect("resumed: it runs again");
    assert_eq!(again.resume_until, Some(p.park.until));
    pair.executing.push(again);
    pair.finish_held(polled, ScsiOutcome::default());
    assert_eq!(response(pair.recv()).itt, polled);

    let aborted = tur(&mut pair, F + 1);
    let outcome = park(&pair);
    pair.finish_held(aborted, outcome);
    let p = pair.parks.pop().expect("the command was parked");
    let abort = pair.itt();
    pair.send(&tmf(TmfFunction::AbortTask, abort, aborted, F + 2, F + 1));
    let r = tmf_response(pair.recv());
    assert_eq!(
        (r.itt, r.response),
        (abort, 0),
        "nothing executes: answered at once"
    );
    assert!(
        !pair.m.is_parked(p.itt, p.generation),
        "the shell ends the wait"
    );
    // A resume that still arrives finds no task.
    pair.m.handle_resume(p.itt, p.generation, p.park.until);
    pair.drive();
    assert!(pair.executing.is_empty() && pair.recv().is_none());
}

/// 11.10, 11.11: a Text Response longer than the initiator's MaxRecvDataSegmentLength
/// goes in parts: C=1 with a TTT, the initiator asks for more with an empty Text Request
/// quoting it, and the last part has F=1 and the reserved TTT. A TTT the target did not
/// give resets the negotiation.
#[test]
fn long_text_answers_are_continued() {
    let mut pair = Pair::new();
    let mut request = Vec::new();
    for i in 0..100 {
        request.extend_from_slice(format!("X-org.ftss.unknown-{i:03}=yes").as_bytes());
        request.push(0);
    }
    let text = |itt: Itt, ttt: u32, cmd_sn: u32, data: Vec<u8>| {
        Pdu::TextRequest(ftss_proto::pdu::TextRequest {
            immediate: false,
            final_: true,
            continue_: false,
            lun: super::pair::lun0(),
            itt,
            ttt: Ttt(ttt),
            cmd_sn: CmdSn(cmd_sn),
            exp_stat_sn: StatSn(0),
            data: data.into(),
        })
    };
    let itt = pair.itt();
    pair.send(&text(itt, RESERVED, F, request));
    let mut answer = Vec::new();
    let mut cmd_sn = F + 1;
    let mut parts = 0;
    loop {
        let r = match pair.recv() {
            Some(Pdu::TextResponse(r)) => r,
            other => panic!("expected a Text Response, got {other:?}"),
        };
        parts += 1;
        assert!(r.data.len() <= 1024, "MaxRecvDataSegmentLength");
        answer.extend_from_slice(&r.data);
        if r.final_ {
            assert_eq!(r.ttt, Ttt(RESERVED));
            assert!(!r.continue_);
            break;
        }
        assert!(r.continue_);
        assert_ne!(r.ttt, Ttt(RESERVED));
        pair.send(&text(itt, r.ttt.0, cmd_sn, Vec::new()));
        cmd_sn += 1;
    }
    assert!(parts > 2, "{parts} parts");
    let answer = String::from_utf8(answer).expect("text");
    assert_eq!(answer.matches("NotUnderstood").count(), 100, "{answer}");
    // A TTT it never gave: a fresh (empty) negotiation, answered in one part.
    pair.send(&text(itt, 0x1234, cmd_sn, Vec::new()));
    match pair.recv() {
        Some(Pdu::TextResponse(r)) => assert!(r.final_ && r.data.is_empty()),
        other => panic!("expected a Text Response, got {other:?}"),
    }
}

/// 11.17.1, 7.8 at ErrorRecoveryLevel 0: a Data-Out whose data digest fails is rejected
/// (reason 2) and its command ends with CHECK CONDITION (ABORTED COMMAND); a header
/// digest error leaves nothing to trust and closes the connection.
#[test]
fn digest_errors_fail_the_command_or_close() {
    let mut pair = Pair::with_digests();
    let itt = pair.itt();
    pair.send(&Pdu::ScsiCommand(write10(itt, F, 2048, 0, true)));
    let t = r2t(pair.recv());
    let mut bad = pair.encode(&data_out(itt, t.ttt.0, 0, 0, 1024, false));
    // One bit of the data segment (after the BHS and its digest).
    bad[48 + 4 + 10] ^= 0x01;
    pair.send_bytes(&bad);
    let all = pair.recv_all();
    assert_eq!(all.len(), 2, "{all:?}");
    let r = response(Some(all[0].clone()));
    assert_eq!((r.itt, r.status), (itt, 2));
    assert_eq!(r.sense.get(2..3), Some(&[0x0b][..]), "ABORTED COMMAND");
    let j = reject(Some(all[1].clone()));
    assert_eq!(j.reason, RejectReason::DataDigestError as u8);
    // The connection goes on.
    let next = tur(&mut pair, F + 1);
    assert_eq!(response(pair.recv()).itt, next);
    assert!(!pair.m.is_closed());

    let mut bad = pair.encode(&nop_out(9, RESERVED, F + 2, false));
    bad[20] ^= 0x01;
    pair.send_bytes(&bad);
    assert!(pair.recv().is_none());
    assert!(
        pair.m.is_closed(),
        "a header digest error closes the connection"
    );
}
