//! The full feature phase of one connection as a sans-IO state machine: no socket, no
//! clock, no threads. The shell ([`super::run`]) feeds it frames, finished commands,
//! wake-ups and the time, and writes, executes and parks what it polls out; a test feeds
//! it the same way on virtual time (`connection/pair.rs`).
//!
//! Inputs: [`Machine::handle_frame`] (and [`Machine::handle_frame_error`]),
//! [`Machine::handle_done`], [`Machine::handle_resume`], [`Machine::handle_control`],
//! [`Machine::handle_timeout`]. Outputs: [`Machine::poll_transmit`] (encoded PDUs),
//! [`Machine::poll_execute`] (commands for the SCSI layer), [`Machine::poll_park`] (long
//! polls to wait for), [`Machine::poll_timeout`] and [`Machine::is_closed`].
//!
//! The machine holds the CmdSN window, the tasks with their R2T and write-buffer
//! accounting, task management, text negotiation, StatSN and the NOP-In ping. It calls the
//! SCSI target only for what answers at once (unit attention clock, LUN and target reset,
//! the latency record); commands themselves run wherever the shell chooses. StatSN is
//! stamped as responses are queued, so it rises monotonically on the wire.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ftss_proto::cmdsn::{Admit, CmdWindow};
use ftss_proto::frame::{Frame, FrameError};
use ftss_proto::pdu::{
    self, DataIn, DecodeError, Framing, Itt, LogoutRequest, LogoutResponse, Lun, NopIn, NopOut,
    Pdu, R2t, Reject, RejectReason, Residual, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, TmfFunction, Ttt, BHS_LEN, RESERVED_TAG,
};
use ftss_proto::serial::{CmdSn, DataSn, R2tSn, StatSn};
use tracing::{debug, info, warn};

use super::super::session::{SessionCtx, SessionKind};
use super::super::transfer::{data_in_pieces, WriteCollect, XferError, XferLimits};
use super::ConnParams;
use crate::scsi::{AbortWait, DataInSent, Park, ScsiOutcome, TaskAttr};

/// SCSI status values the transport itself produces (TASK ABORTED for tasks another I_T
/// nexus aborted, with TAS=1 in the Control mode page).
use ftss_proto::sense::status::{
    CHECK_CONDITION as STATUS_CHECK_CONDITION, GOOD as STATUS_GOOD,
    TASK_ABORTED as STATUS_TASK_ABORTED,
};

/// Largest write one command may carry; bigger ones get CHECK CONDITION without any
/// buffer being allocated.
pub(crate) const DATA_OUT_BYTES_MAX: u32 = 32 << 20;
/// Write buffers one connection may hold at once; further writes wait for R2Ts.
pub(crate) const WRITE_BUFFER_BYTES_MAX: u64 = 64 << 20;
/// Immediate commands one connection may have running at once.
pub(crate) const IMMEDIATE_TASKS_MAX: usize = 32;
/// Text one text negotiation may accumulate across continuation PDUs.
pub(crate) const TEXT_BYTES_MAX: usize = 64 << 10;

/// What the SCSI layer asks of a connection, outside the initiator's PDUs.
pub(crate) enum Control {
    /// Abort every task for this LUN as if another nexus's ABORT TASK SET hit them
    /// (PREEMPT AND ABORT); `wait` goes with each task until it has ended.
    AbortLun { lun: u64, wait: AbortWait },
}

/// A command for the SCSI layer, with everything its execution needs; its outcome comes
/// back through [`Machine::handle_done`] with the same `itt` and `generation`.
pub(crate) struct Exec {
    pub(crate) itt: u32,
    /// Tells this execution from an earlier task that had the same ITT.
    pub(crate) generation: u64,
    pub(crate) lun: u64,
    pub(crate) cdb: Bytes,
    /// The data-out, complete.
    pub(crate) data: Vec<u8>,
    pub(crate) expected_len: u32,
    pub(crate) attr: TaskAttr,
    /// `Some` when a parked command runs again: the end of the wait it chose.
    pub(crate) resume_until: Option<Instant>,
    /// Unit attention clock when the command was delivered.
    pub(crate) arrived: u64,
    /// Held by whoever executes the command until the execution has returned, so an
    /// abort from another nexus can wait for it (see [`AbortWait`]).
    pub(crate) end: Arc<TaskEnd>,
}

/// A command the SCSI layer parked (a long poll): the shell waits for `park` and then
/// calls [`Machine::handle_resume`], unless [`Machine::is_parked`] says the task is gone.
pub(crate) struct ParkRequest {
    pub(crate) itt: u32,
    pub(crate) generation: u64,
    pub(crate) park: Park,
}

enum TaskState {
    /// Waiting for data-out.
    Collecting(WriteCollect),
    /// Handed to the SCSI layer.
    Running,
    /// Parked by the SCSI layer (a long poll): the shell waits, no thread is held.
    Parked,
}

/// Lives as long as a command executes, holding what waits for that end (see
/// [`AbortWait`]).
#[derive(Default)]
pub(crate) struct TaskEnd(Mutex<Vec<AbortWait>>);

struct Task {
    cmd: pdu::ScsiCommand,
    generation: u64,
    state: TaskState,
    /// Ended without its normal response (ABORT TASK and the like, or another nexus).
    aborted: bool,
    /// Aborted by another nexus: ends with TASK ABORTED status rather than silently.
    report_abort: bool,
    r2ts_sent: u32,
    /// Unit attention clock when the command was delivered.
    arrived: u64,
    /// The execution of a running task, while it lasts.
    end: Weak<TaskEnd>,
    /// Bytes of the connection's write-buffer budget this task holds, never less than
    /// its buffer: what data it was sent unasked while it waited for the budget, all of
    /// `edtl` once granted, until the task is gone (its buffer lives until it completes).
    reserved: u64,
    /// Granted its whole transfer against the budget (R2Ts may go out).
    granted: bool,
    /// When its command PDU arrived: the start of the latency the metrics report.
    received: Instant,
}

/// A task management response waiting for aborted commands to finish.
struct PendingTmf {
    itt: Itt,
    immediate: bool,
    response: u8,
    waiting_on: Vec<u32>,
    then_close_all: bool,
}

/// Text negotiation state across continuation PDUs.
#[derive(Default)]
struct TextState {
    /// Request text accumulated from C=1 PDUs.
    incoming: Vec<u8>,
    /// Answer text not yet sent, with the TTT the initiator must quote.
    outgoing: Option<(u32, Bytes)>,
}

/// The state of one connection in the full feature phase (see the module docs).
pub(crate) struct Machine {
    ctx: Arc<SessionCtx>,
    window: CmdWindow<Pdu>,
    stat_sn: StatSn,
    out_framing: Framing,
    lim: XferLimits,
    tasks: HashMap<u32, Task>,
    generation: u64,
    next_ttt: u32,
    /// Write-buffer budget reserved by all tasks.
    write_bytes: u64,
    /// The part of it reserved by granted tasks.
    granted_bytes: u64,
    parked: VecDeque<u32>,
    tmfs: Vec<PendingTmf>,
    text: TextState,
    /// Encoded PDUs not yet polled, in order: `chunks`, then `out`. A large Data-In's data
    /// is a chunk of its own (the read's buffer, not a copy of it).
    chunks: Vec<Bytes>,
    out: BytesMut,
    /// Data-in hooks of responses queued in `out`, with the bytes of data-in each carries:
    /// handed out with `out`, told once it is written, dropped (0 bytes) if it never is.
    sent: Vec<(DataInSent, usize)>,
    execs: VecDeque<Exec>,
    parks: VecDeque<ParkRequest>,
    close: bool,
    /// Outstanding target ping: its TTT and deadline.
    ping: Option<(u32, Instant)>,
    /// When the initiator last sent anything: the idle time a ping waits for.
    last_rx: Instant,
    nop_interval: Duration,
    nop_timeout: Duration,
}

fn attr(a: u8) -> TaskAttr {
    match a {
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => TaskAttr::Simple,
    }
}

/// Fixed-format sense data for errors the transport detects itself.
fn transport_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

impl Machine {
    /// A connection entering the full feature phase at `now`, expecting `exp_cmd_sn` and
    /// answering from `stat_sn` on.
    pub(crate) fn new(
        ctx: Arc<SessionCtx>,
        params: ConnParams,
        exp_cmd_sn: CmdSn,
        stat_sn: StatSn,
        now: Instant,
    ) -> Self {
        Machine {
            window: CmdWindow::new(exp_cmd_sn, ctx.cmd_window),
            stat_sn,
            out_framing: Framing {
                max_recv_data_segment: params.xfer.send_segment_max,
                ..params.framing
            },
            lim: params.xfer,
            tasks: HashMap::new(),
            generation: 0,
            next_ttt: 1,
            write_bytes: 0,
            granted_bytes: 0,
            parked: VecDeque::new(),
            tmfs: Vec::new(),
            text: TextState::default(),
            chunks: Vec::new(),
            out: BytesMut::with_capacity(64 << 10),
            sent: Vec::new(),
            execs: VecDeque::new(),
            parks: VecDeque::new(),
            close: false,
            ping: None,
            last_rx: now,
            nop_interval: Duration::from_secs(u64::from(ctx.nop_interval_s)),
            nop_timeout: Duration::from_secs(u64::from(ctx.nop_timeout_s)),
            ctx,
        }
    }

    /// The session this connection serves.
    pub(crate) fn ctx(&self) -> &Arc<SessionCtx> {
        &self.ctx
    }

    /// One frame from the initiator, received at `now`.
    pub(crate) fn handle_frame(&mut self, frame: &Frame, now: Instant) {
        self.last_rx = now;
        let bhs = frame.bhs();
        match frame.decode() {
            Ok(p) => self.on_pdu(p, &bhs, now),
            Err(DecodeError::HeaderDigest) => {
                // The header itself cannot be trusted, so neither can the framing.
                warn!("header digest error: closing the connection");
                self.close = true;
            }
            Err(e) => self.on_bad_pdu(e, &bhs),
        }
    }

    /// The frame decoder could not cut the next frame.
    pub(crate) fn handle_frame_error(&mut self, e: FrameError, now: Instant) {
        self.last_rx = now;
        match e {
            // The decoder skips the oversized segment as it is read, so framing survives;
            // the PDU is rejected.
            FrameError::TooLong { bhs, len, max } => {
                self.on_bad_pdu(DecodeError::DataSegmentTooLong { len, max }, &bhs);
            }
            e => {
                warn!("{e}: closing the connection");
                self.close = true;
            }
        }
    }

    /// A command handed out by [`Self::poll_execute`] returned, at `now` (with its
    /// writes committed, or the commit's failure folded into `outcome`).
    pub(crate) fn handle_done(
        &mut self,
        itt: u32,
        generation: u64,
        outcome: ScsiOutcome,
        now: Instant,
    ) {
        self.on_done(itt, generation, outcome, now);
    }

    /// The wait of a command handed out by [`Self::poll_park`] ended (woken or timed
    /// out), with the deadline it had: run it again.
    pub(crate) fn handle_resume(&mut self, itt: u32, generation: u64, until: Instant) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        if task.generation != generation || !matches!(task.state, TaskState::Parked) {
            return;
        }
        task.state = TaskState::Running;
        self.execute(itt, Vec::new(), Some(until));
    }

    /// A request from the SCSI layer.
    pub(crate) fn handle_control(&mut self, c: Control) {
        match c {
            Control::AbortLun { lun, wait } => self.abort_lun(lun, &wait),
        }
    }

    /// The time [`Self::poll_timeout`] gave has come (or passed): ping an idle initiator,
    /// or give up on one that did not answer the ping.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if let Some((_, deadline)) = self.ping {
            if now >= deadline {
                warn!(initiator = %self.ctx.nexus.initiator_name, "no answer to NOP-In within {:?}: dropping the connection", self.nop_timeout);
                self.close = true;
            }
            return;
        }
        if now >= self.last_rx + self.nop_interval {
            self.send_ping(now);
        }
    }

    /// Appends the PDUs queued since the last call to `buf`, as pieces to be written in
    /// order (a vectored write); returns the data-in hooks of the responses among them, to
    /// be told once `buf` is written (dropping them tells 0 bytes).
    #[must_use]
    pub(crate) fn poll_transmit(&mut self, buf: &mut Vec<Bytes>) -> Vec<(DataInSent, usize)> {
        buf.append(&mut self.chunks);
        if !self.out.is_empty() {
            buf.push(self.out.split().freeze());
        }
        std::mem::take(&mut self.sent)
    }

    /// The next command to run on the SCSI layer, in delivery order.
    #[must_use]
    pub(crate) fn poll_execute(&mut self) -> Option<Exec> {
        self.execs.pop_front()
    }

    /// The next command the SCSI layer parked.
    #[must_use]
    pub(crate) fn poll_park(&mut self) -> Option<ParkRequest> {
        self.parks.pop_front()
    }

    /// Whether the task a [`ParkRequest`] named still waits to be resumed; a wait for a
    /// task that is gone (aborted, failed) should end.
    pub(crate) fn is_parked(&self, itt: u32, generation: u64) -> bool {
        self.tasks
            .get(&itt)
            .is_some_and(|t| t.generation == generation && matches!(t.state, TaskState::Parked))
    }

    /// When [`Self::handle_timeout`] wants to be called: the ping's deadline, or the end
    /// of the idle interval that sends one.
    #[must_use]
    pub(crate) fn poll_timeout(&self) -> Instant {
        match self.ping {
            Some((_, deadline)) => deadline,
            None => self.last_rx + self.nop_interval,
        }
    }

    /// Whether the connection should close (logout, cold reset, a fatal framing error,
    /// an unanswered ping) once what was polled is written.
    pub(crate) fn is_closed(&self) -> bool {
        self.close
    }

    /// The connection is gone: what was not polled is dropped (its data-in hooks hear 0
    /// bytes), a pending TMF dies with it, tasks still collecting data end and those
    /// still executing are marked aborted, to end silently. The shell then waits for
    /// [`Self::running_tasks`] to reach zero, still feeding done and control.
    pub(crate) fn close_and_drain(&mut self) {
        self.close = true;
        self.chunks.clear();
        self.out.clear();
        self.sent.clear();
        self.execs.clear();
        self.parks.clear();
        // No one is left to answer, and a pending TMF (a cold reset too) dies with the
        // connection that asked for it.
        self.tmfs.clear();
        self.tasks
            .retain(|_, t| matches!(t.state, TaskState::Running));
        for t in self.tasks.values_mut() {
            t.aborted = true;
            t.report_abort = false;
        }
        self.parked.clear();
    }

    /// Tasks not yet ended.
    pub(crate) fn running_tasks(&self) -> usize {
        self.tasks.len()
    }

    fn queue(&mut self, p: &Pdu) {
        // Below this a copy costs less than one more piece in the write.
        const SPLIT_MIN: usize = 2048;
        if let Pdu::DataIn(d) = p {
            if d.data.len() >= SPLIT_MIN {
                if let Some(data) = p.encode_split(&mut self.out, &self.out_framing) {
                    self.chunks.push(self.out.split().freeze());
                    pdu::encode_data_tail(&data, &self.out_framing, &mut self.out);
                    self.chunks.push(data);
                    return;
                }
            }
        }
        p.encode(&mut self.out, &self.out_framing);
    }

    /// StatSN for a response that consumes one.
    fn take_stat_sn(&mut self) -> StatSn {
        let s = self.stat_sn;
        self.stat_sn = s.next();
        s
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn reject(&mut self, reason: RejectReason, bhs: &[u8; BHS_LEN]) {
        let stat_sn = self.take_stat_sn();
        let p = Pdu::Reject(Reject {
            reason: reason as u8,
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data_sn: DataSn(0),
            header: Bytes::copy_from_slice(bhs),
        });
        self.queue(&p);
    }

    fn send_ping(&mut self, now: Instant) {
        let ttt = self.alloc_ttt();
        let p = Pdu::NopIn(NopIn {
            lun: Lun(0),
            itt: Itt(RESERVED_TAG),
            ttt: Ttt(ttt),
            // A ping that wants an answer does not advance StatSN.
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data: Bytes::new(),
        });
        self.queue(&p);
        self.ping = Some((ttt, now + self.nop_timeout));
    }

    /// A PDU that could not be decoded but whose frame was consumed: Reject, or close
    /// when the error leaves nothing to answer.
    fn on_bad_pdu(&mut self, e: DecodeError, bhs: &[u8; BHS_LEN]) {
        debug!("bad PDU: {e}");
        if e == DecodeError::DataDigest && bhs[0] & 0x3f == pdu::opcode::DATA_OUT {
            // ERL 0 cannot recover the lost data: fail the command it belonged to.
            let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
            self.fail_collecting(itt, 0x0b, 0x47, 0x05);
        }
        match e.reject_reason() {
            Some(r) => self.reject(r, bhs),
            None => self.close = true,
        }
    }

    fn on_pdu(&mut self, p: Pdu, bhs: &[u8; BHS_LEN], now: Instant) {
        let bhs = *bhs;
        match p {
            Pdu::DataOut(d) => self.on_data_out(d, &bhs),
            Pdu::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: no SNACK support; reject rather than stall.
                self.reject(RejectReason::ProtocolError, &bhs);
            }
            Pdu::NopOut(ref n) if n.itt.0 == RESERVED_TAG => {
                // An answer to our ping (or a ping that wants no reply): never answered,
                // never ordered, never moves the window.
                if let Some((ttt, _)) = self.ping {
                    if n.ttt.0 == ttt {
                        self.ping = None;
                    }
                }
            }
            Pdu::ScsiCommand(_)
            | Pdu::NopOut(_)
            | Pdu::TaskMgmtRequest(_)
            | Pdu::TextRequest(_)
            | Pdu::LogoutRequest(_) => self.admit(p, &bhs, now),
            Pdu::LoginRequest(_) => self.reject(RejectReason::ProtocolError, &bhs),
            _ => self.reject(RejectReason::CommandNotSupported, &bhs),
        }
    }

    fn admit(&mut self, p: Pdu, bhs: &[u8; BHS_LEN], now: Instant) {
        let (sn, imm) = match &p {
            Pdu::ScsiCommand(c) => (c.cmd_sn, c.immediate),
            Pdu::NopOut(c) => (c.cmd_sn, c.immediate),
            Pdu::TaskMgmtRequest(c) => (c.cmd_sn, c.immediate),
            Pdu::TextRequest(c) => (c.cmd_sn, c.immediate),
            Pdu::LogoutRequest(c) => (c.cmd_sn, c.immediate),
            _ => return,
        };
        if imm && matches!(p, Pdu::ScsiCommand(_)) {
            let running_imm = self.tasks.values().filter(|t| t.cmd.immediate).count();
            if running_imm >= IMMEDIATE_TASKS_MAX {
                self.reject(RejectReason::ImmediateCommandReject, bhs);
                return;
            }
        }
        match self.window.admit(sn, imm, p) {
            Admit::Deliver(v) => {
                for p in v {
                    self.deliver(p, now);
                }
            }
            Admit::Queued => {}
            Admit::Dropped(why) => {
                debug!(
                    cmd_sn = sn.0,
                    exp = self.window.exp_cmd_sn().0,
                    max = self.window.max_cmd_sn().0,
                    ?why,
                    "command dropped"
                );
            }
        }
    }

    /// A command in CmdSN order (or immediate).
    fn deliver(&mut self, p: Pdu, now: Instant) {
        match p {
            Pdu::ScsiCommand(c) => self.on_scsi_command(c, now),
            Pdu::NopOut(n) => self.on_nop_out(n),
            Pdu::TaskMgmtRequest(t) => self.on_tmf(t, now),
            Pdu::TextRequest(t) => self.on_text(t),
            Pdu::LogoutRequest(l) => self.on_logout(l),
            _ => {}
        }
    }

    /// Ends a non-SCSI request that went through the window.
    fn finish_request(&mut self, immediate: bool) {
        if !immediate {
            self.window.completed();
        }
    }

    fn on_nop_out(&mut self, n: NopOut) {
        self.finish_request(n.immediate);
        let mut data = n.data;
        data.truncate(self.lim.send_segment_max as usize);
        let stat_sn = self.take_stat_sn();
        let p = Pdu::NopIn(NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: Ttt(RESERVED_TAG),
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data,
        });
        self.queue(&p);
    }

    fn on_scsi_command(&mut self, mut c: pdu::ScsiCommand, now: Instant) {
        let SessionKind::Normal(_) = &self.ctx.kind else {
            // Discovery sessions carry only text, NOP and logout.
            let mut bhs = [0u8; BHS_LEN];
            Pdu::ScsiCommand(pdu::ScsiCommand {
                data: Bytes::new(),
                ..c.clone()
            })
            .encode(&mut BytesMut::new(), &Framing::default());
            bhs[0] = pdu::opcode::SCSI_COMMAND;
            self.finish_request(c.immediate);
            self.reject(RejectReason::ProtocolError, &bhs);
            return;
        };
        if self.tasks.contains_key(&c.itt.0) {
            // ITT still in use: the initiator broke the rules; answer without disturbing
            // the live task.
            warn!(itt = c.itt.0, "command reuses a live ITT");
            let bhs = encode_bhs(&Pdu::ScsiCommand(c.clone()));
            self.finish_request(c.immediate);
            self.reject(RejectReason::TaskInProgress, &bhs);
            return;
        }
        self.generation += 1;
        let data = std::mem::take(&mut c.data);
        let arrived = match &self.ctx.kind {
            SessionKind::Normal(scsi) => scsi.arrival(),
            SessionKind::Discovery => 0,
        };
        let mut task = Task {
            cmd: c,
            generation: self.generation,
            state: TaskState::Running,
            aborted: false,
            report_abort: false,
            r2ts_sent: 0,
            arrived,
            end: Weak::new(),
            reserved: 0,
            granted: false,
            received: now,
        };
        let itt = task.cmd.itt.0;
        if task.cmd.write && task.cmd.edtl > 0 {
            if task.cmd.edtl > DATA_OUT_BYTES_MAX {
                // Answer at once; any unsolicited data that follows is discarded.
                let sense = transport_sense(0x05, 0x24, 0x00);
                self.respond_scsi(
                    &task,
                    STATUS_CHECK_CONDITION,
                    Some(sense),
                    Bytes::new(),
                    Residual::of(task.cmd.edtl, 0),
                    0,
                );
                self.finish_request(task.cmd.immediate);
                return;
            }
            match WriteCollect::new(task.cmd.edtl, &data, task.cmd.final_, &self.lim) {
                Ok(w) => {
                    let done = w.is_complete();
                    // Immediate data is held from now on, granted or not.
                    task.reserved = w.held() as u64;
                    self.write_bytes += task.reserved;
                    task.state = TaskState::Collecting(w);
                    self.tasks.insert(itt, task);
                    if done {
                        self.start(itt);
                    } else {
                        self.parked.push_back(itt);
                        self.activate_parked();
                    }
                }
                Err(e) => {
                    debug!("bad immediate data: {e}");
                    let bhs = encode_bhs(&Pdu::ScsiCommand(task.cmd.clone()));
                    self.finish_request(task.cmd.immediate);
                    self.reject(RejectReason::ProtocolError, &bhs);
                }
            }
            return;
        }
        task.state = TaskState::Collecting(
            WriteCollect::new(0, &[], true, &self.lim).expect("an empty transfer is always valid"),
        );
        self.tasks.insert(itt, task);
        self.start(itt);
    }

    /// Gives parked writes their buffers, within the connection's budget, and sends R2Ts.
    fn activate_parked(&mut self) {
        while let Some(&itt) = self.parked.front() {
            let Some(task) = self.tasks.get_mut(&itt) else {
                self.parked.pop_front();
                continue;
            };
            let TaskState::Collecting(w) = &mut task.state else {
                self.parked.pop_front();
                continue;
            };
            let need = u64::from(w.edtl()).saturating_sub(task.reserved);
            // With no write granted, the first in line always goes: data sent unasked
            // (bounded by FirstBurstLength and the CmdSN window) must not stall it.
            if self.granted_bytes > 0 && self.write_bytes + need > WRITE_BUFFER_BYTES_MAX {
                break;
            }
            w.activate();
            task.reserved += need;
            task.granted = true;
            self.write_bytes += need;
            self.granted_bytes += task.reserved;
            self.parked.pop_front();
            self.send_r2ts(itt);
        }
    }

    fn send_r2ts(&mut self, itt: u32) {
        let mut next = self.next_ttt;
        let lim = self.lim;
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let TaskState::Collecting(w) = &mut task.state else {
            return;
        };
        let r2ts = w.poll_r2ts(&lim, || {
            let t = next;
            next = next.wrapping_add(1);
            if next == RESERVED_TAG {
                next = 1;
            }
            t
        });
        task.r2ts_sent = w.r2t_count();
        let lun = task.cmd.lun;
        self.next_ttt = next;
        for r in r2ts {
            let p = Pdu::R2t(R2t {
                lun,
                itt: Itt(itt),
                ttt: Ttt(r.ttt),
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.window.exp_cmd_sn(),
                max_cmd_sn: self.window.max_cmd_sn(),
                r2t_sn: R2tSn(r.r2t_sn),
                buffer_offset: r.offset,
                desired_len: r.len,
            });
            self.queue(&p);
        }
    }

    fn on_data_out(&mut self, d: pdu::DataOut, bhs: &[u8; BHS_LEN]) {
        let itt = d.itt.0;
        let Some(task) = self.tasks.get_mut(&itt) else {
            // Data for a task that already ended (aborted or failed early): discard.
            return;
        };
        let TaskState::Collecting(w) = &mut task.state else {
            self.reject(RejectReason::ProtocolError, bhs);
            return;
        };
        if task.aborted {
            return;
        }
        match w.data_out(d.ttt.0, d.data_sn, d.buffer_offset, &d.data) {
            Ok(()) => {
                // Unsolicited data to a task still waiting for the budget grows what it
                // holds; a granted task reserved its whole transfer already.
                let grew = (w.held() as u64).saturating_sub(task.reserved);
                task.reserved += grew;
                self.write_bytes += grew;
                if w.is_complete() {
                    self.start(itt);
                } else if d.ttt.0 != RESERVED_TAG {
                    self.send_r2ts(itt);
                }
            }
            Err(e) => {
                debug!(itt, "Data-Out refused: {e}");
                let reason = match e {
                    XferError::UnknownTtt | XferError::Offset | XferError::DataSn => {
                        RejectReason::InvalidPduField
                    }
                    XferError::ImmediateData => RejectReason::ProtocolError,
                };
                self.reject(reason, bhs);
            }
        }
    }

    /// Fails a command still collecting data (e.g. a Data-Out digest error at ERL 0).
    fn fail_collecting(&mut self, itt: u32, key: u8, asc: u8, ascq: u8) {
        let collecting = matches!(
            self.tasks.get(&itt),
            Some(Task {
                state: TaskState::Collecting(_),
                ..
            })
        );
        if !collecting {
            return;
        }
        if let Some(task) = self.tasks.remove(&itt) {
            self.release_write_budget(&task);
            let sense = transport_sense(key, asc, ascq);
            self.respond_scsi(
                &task,
                STATUS_CHECK_CONDITION,
                Some(sense),
                Bytes::new(),
                Residual::of(task.cmd.edtl, 0),
                0,
            );
            self.finish_request(task.cmd.immediate);
            self.activate_parked();
        }
    }

    /// Gives back the budget a task that is gone held.
    fn release_write_budget(&mut self, task: &Task) {
        self.write_bytes = self.write_bytes.saturating_sub(task.reserved);
        if task.granted {
            self.granted_bytes = self.granted_bytes.saturating_sub(task.reserved);
        }
    }

    /// Hands a command with all its data to the SCSI layer.
    fn start(&mut self, itt: u32) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let state = std::mem::replace(&mut task.state, TaskState::Running);
        // The buffer's budget stays reserved (`Task::reserved`) until the task is gone.
        let data = match state {
            TaskState::Collecting(w) => w.into_data(),
            TaskState::Running | TaskState::Parked => Vec::new(),
        };
        self.execute(itt, data, None);
    }

    /// Hands a command to the shell to run on the SCSI layer: first with its data-out,
    /// again with `resume_until` after it was parked.
    fn execute(&mut self, itt: u32, data: Vec<u8>, resume_until: Option<Instant>) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let end = Arc::new(TaskEnd::default());
        task.end = Arc::downgrade(&end);
        self.execs.push_back(Exec {
            itt,
            generation: task.generation,
            lun: task.cmd.lun.number().unwrap_or(u64::MAX),
            cdb: task.cmd.cdb.clone(),
            data,
            expected_len: task.cmd.edtl,
            attr: attr(task.cmd.attr),
            resume_until,
            arrived: task.arrived,
            end,
        });
        self.activate_parked();
    }

    fn on_done(&mut self, itt: u32, generation: u64, mut outcome: ScsiOutcome, now: Instant) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        if task.generation != generation {
            return;
        }
        if let Some(park) = outcome.park.take() {
            // An aborted task ends here instead: its (empty) answer is not sent.
            if !task.aborted {
                task.state = TaskState::Parked;
                self.parks.push_back(ParkRequest {
                    itt,
                    generation,
                    park,
                });
                return;
            }
        }
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        self.release_write_budget(&task);
        if !task.aborted {
            let o = outcome;
            let c = &task.cmd;
            let full_in = u32::try_from(o.data_in.len()).unwrap_or(u32::MAX);
            let (send, residual, data_out) = if c.write && !c.read {
                let want = o.data_out_len.unwrap_or(c.edtl);
                (0, Residual::of(c.edtl, want), want.min(c.edtl))
            } else if c.read {
                (full_in.min(c.edtl), Residual::of(c.edtl, full_in), 0)
            } else {
                // Data-in without the R bit: nothing is transferred.
                (0, Residual::of(c.edtl, full_in), 0)
            };
            if let SessionKind::Normal(scsi) = &self.ctx.kind {
                // Bytes count only what a successful command moved.
                let moved = if o.status == STATUS_GOOD {
                    u64::from(send) + u64::from(data_out)
                } else {
                    0
                };
                let lun = c.lun.number().unwrap_or(u64::MAX);
                scsi.record_completion(
                    lun,
                    &c.cdb,
                    moved,
                    now.saturating_duration_since(task.received),
                );
            }
            self.finish_request(c.immediate);
            // Owned from here: each Data-In takes a slice of it, not a copy.
            let mut data = Bytes::from(o.data_in);
            data.truncate(send as usize);
            self.respond_scsi(&task, o.status, o.sense, data, residual, task.r2ts_sent);
            if let Some(hook) = o.on_sent {
                self.sent.push((hook, send as usize));
            }
        } else if task.report_abort {
            self.respond_aborted(&task);
        } else {
            self.finish_request(task.cmd.immediate);
        }
        self.tmf_task_done(itt);
        self.activate_parked();
    }

    /// Ends a task another nexus aborted with TASK ABORTED status (TAS=1), no data.
    fn respond_aborted(&mut self, task: &Task) {
        self.finish_request(task.cmd.immediate);
        let residual = Residual::of(task.cmd.edtl, 0);
        self.respond_scsi(
            task,
            STATUS_TASK_ABORTED,
            None,
            Bytes::new(),
            residual,
            task.r2ts_sent,
        );
    }

    /// Another nexus aborted this nexus's tasks for `lun` (PREEMPT AND ABORT): like ABORT
    /// TASK SET, but each task ends with TASK ABORTED status (TAS=1), and `wait` stays
    /// with every task still executing until it has returned.
    fn abort_lun(&mut self, lun: u64, wait: &AbortWait) {
        // The routing agent's vendor commands leave the LUN's medium alone, which is what
        // the abort protects; a RECEIVE long-polls for up to 20 s and would hold the
        // preempter that long. They complete as usual.
        let hit: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.cmd.lun.number() == Some(lun))
            .filter(|(_, t)| {
                let opcode = t.cmd.cdb.first().copied().unwrap_or(0);
                crate::link_unit::unit_for(opcode) == crate::link_unit::Unit::FileOperations
            })
            .map(|(&itt, _)| itt)
            .collect();
        let mut ended = 0usize;
        for itt in hit {
            let running = matches!(
                self.tasks.get(&itt),
                Some(Task {
                    state: TaskState::Running,
                    ..
                })
            );
            if running {
                let Some(task) = self.tasks.get_mut(&itt) else {
                    continue;
                };
                // Its execution already returned (the result is on its way): it ended
                // before the abort, and its own status stands.
                let Some(end) = task.end.upgrade() else {
                    continue;
                };
                // Even a task its own initiator already aborted may still be writing:
                // the preempter waits for it too.
                end.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(wait.clone());
                if !task.aborted {
                    task.aborted = true;
                    task.report_abort = true;
                }
            } else if let Some(task) = self.tasks.remove(&itt) {
                // Still waiting for Data-Out: it never reached the device server, so it
                // ends now. Data-Out that still arrives for it finds no task and is
                // dropped (on_data_out).
                self.release_write_budget(&task);
                self.respond_aborted(&task);
                ended += 1;
            }
        }
        info!(initiator = %self.ctx.nexus.initiator_name, lun, ended, "tasks aborted by another nexus");
        let tasks = &self.tasks;
        self.parked.retain(|itt| tasks.contains_key(itt));
        self.activate_parked();
    }

    /// Sends Data-In (with phase-collapsed status when possible) and/or a SCSI Response.
    fn respond_scsi(
        &mut self,
        task: &Task,
        status: u8,
        sense: Option<Vec<u8>>,
        data: Bytes,
        residual: Residual,
        r2ts: u32,
    ) {
        let c = &task.cmd;
        let pieces = data_in_pieces(data.len() as u32, &self.lim);
        let collapse = status == STATUS_GOOD && sense.is_none() && !pieces.is_empty();
        let n = pieces.len();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == n;
            let with_status = last && collapse;
            let stat_sn = if with_status {
                self.take_stat_sn()
            } else {
                StatSn(0)
            };
            let p = Pdu::DataIn(DataIn {
                final_: piece.final_ || with_status,
                ack: false,
                residual: if with_status {
                    residual
                } else {
                    Residual::default()
                },
                status: with_status.then_some(status),
                lun: c.lun,
                itt: c.itt,
                ttt: Ttt(RESERVED_TAG),
                stat_sn,
                exp_cmd_sn: self.window.exp_cmd_sn(),
                max_cmd_sn: self.window.max_cmd_sn(),
                data_sn: piece.data_sn,
                buffer_offset: piece.offset,
                data: data.slice(piece.offset as usize..(piece.offset + piece.len) as usize),
            });
            self.queue(&p);
        }
        if collapse {
            return;
        }
        let stat_sn = self.take_stat_sn();
        let p = Pdu::ScsiResponse(ScsiResponse {
            bidi_residual: Residual::default(),
            residual,
            response: 0,
            status,
            itt: c.itt,
            snack_tag: 0,
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            exp_data_sn: DataSn(n as u32 + r2ts),
            sense: sense.map(Bytes::from).unwrap_or_default(),
        });
        self.queue(&p);
    }

    fn on_tmf(&mut self, t: TaskMgmtRequest, now: Instant) {
        let SessionKind::Normal(scsi) = &self.ctx.kind else {
            self.finish_request(t.immediate);
            self.tmf_respond(t.itt, 255);
            return;
        };
        let scsi = Arc::clone(scsi);
        let lun = t.lun.number();
        info!(initiator = %self.ctx.nexus.initiator_name, function = ?t.function, lun = ?lun, rtt = t.rtt.0, "task management request");
        let lun_ok = lun.is_some_and(|l| scsi.lun_exists(l));
        let (response, victims, close_all): (u8, Vec<u32>, bool) = match t.function {
            TmfFunction::AbortTask => {
                let hit = self
                    .tasks
                    .get(&t.rtt.0)
                    .is_some_and(|task| task.cmd.lun == t.lun && !task.aborted);
                if hit {
                    (0, vec![t.rtt.0], false)
                } else if t.ref_cmd_sn.lt(t.cmd_sn) && self.window.in_window(t.ref_cmd_sn) {
                    // RFC 7143 11.5.1 (b): a command that never arrived counts as received.
                    if !self.window.received(t.ref_cmd_sn) {
                        let (_, unblocked) = self.window.skip(t.ref_cmd_sn);
                        for p in unblocked {
                            self.deliver(p, now);
                        }
                    }
                    (0, Vec::new(), false)
                } else {
                    (1, Vec::new(), false)
                }
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet => {
                if lun_ok {
                    (0, self.tasks_where(|task| task.cmd.lun == t.lun), false)
                } else {
                    (2, Vec::new(), false)
                }
            }
            TmfFunction::LogicalUnitReset => match lun {
                Some(l) if lun_ok => {
                    if let Err(e) = scsi.lun_reset(&self.ctx.nexus, l) {
                        warn!("LUN reset failed: {e}");
                    }
                    (0, self.tasks_where(|task| task.cmd.lun == t.lun), false)
                }
                _ => (2, Vec::new(), false),
            },
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                let cold = t.function == TmfFunction::TargetColdReset;
                // A target reset reaches every session of the target (a cold one ends
                // them all), so only the initiators the configuration names may send it.
                let allowed = self.ctx.target_iqn.as_deref().is_some_and(|iqn| {
                    self.ctx
                        .shared
                        .in_force()
                        .target(iqn)
                        .is_some_and(|c| c.may_reset(&self.ctx.nexus.initiator_name))
                });
                if allowed {
                    info!(initiator = %self.ctx.nexus.initiator_name, cold, "target reset");
                    scsi.target_reset(&self.ctx.nexus, cold);
                    (0, self.tasks_where(|_| true), cold)
                } else {
                    warn!(initiator = %self.ctx.nexus.initiator_name, cold, "target reset refused: initiator not in reset_initiators");
                    // RFC 7143 11.6.1: 6 = Function authorization failed.
                    (6, Vec::new(), false)
                }
            }
            TmfFunction::ClearAca => (5, Vec::new(), false),
            TmfFunction::TaskReassign => (4, Vec::new(), false),
            TmfFunction::Other(_) => (5, Vec::new(), false),
        };
        // Abort: collecting tasks end now; running ones finish first, without a response.
        let mut waiting = Vec::new();
        for itt in victims {
            let running = matches!(
                self.tasks.get(&itt),
                Some(Task {
                    state: TaskState::Running,
                    ..
                })
            );
            if running {
                if let Some(task) = self.tasks.get_mut(&itt) {
                    task.aborted = true;
                }
                waiting.push(itt);
            } else if let Some(task) = self.tasks.remove(&itt) {
                self.release_write_budget(&task);
                self.finish_request(task.cmd.immediate);
            }
        }
        self.parked.retain(|itt| !waiting.contains(itt));
        self.activate_parked();
        self.tmfs.push(PendingTmf {
            itt: t.itt,
            immediate: t.immediate,
            response,
            waiting_on: waiting,
            then_close_all: close_all,
        });
        self.tmf_task_done(u32::MAX - 1);
    }

    fn tasks_where(&self, f: impl Fn(&Task) -> bool) -> Vec<u32> {
        self.tasks
            .iter()
            .filter(|(_, t)| !t.aborted && f(t))
            .map(|(&itt, _)| itt)
            .collect()
    }

    /// A task ended: answer task management requests that were waiting for it.
    fn tmf_task_done(&mut self, itt: u32) {
        let mut ready = Vec::new();
        self.tmfs.retain_mut(|t| {
            t.waiting_on.retain(|&w| w != itt);
            if t.waiting_on.is_empty() {
                ready.push((t.itt, t.immediate, t.response, t.then_close_all));
                false
            } else {
                true
            }
        });
        for (itt, imm, response, close_all) in ready {
            self.finish_request(imm);
            self.tmf_respond(itt, response);
            if close_all {
                // Cold reset: every connection of the target goes after this response.
                self.close = true;
                self.ctx.target_cold_reset();
            }
        }
    }

    fn tmf_respond(&mut self, itt: Itt, response: u8) {
        let stat_sn = self.take_stat_sn();
        let p = Pdu::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt,
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
        });
        self.queue(&p);
    }

    fn on_text(&mut self, t: TextRequest) {
        self.finish_request(t.immediate);
        let seg = self.lim.send_segment_max as usize;
        // Continuation of our own long answer: the initiator asks for the next part.
        if t.ttt.0 != RESERVED_TAG {
            match self.text.outgoing.take() {
                Some((ttt, rest)) if ttt == t.ttt.0 && !rest.is_empty() => {
                    self.send_text_part(t.itt, t.lun, ttt, rest, seg);
                    return;
                }
                // The TTT of our empty acknowledgement of a C=1 part: this is the next
                // part of the initiator's text, not a pull of ours.
                Some((ttt, _)) if ttt == t.ttt.0 => {}
                _ => {
                    // An unknown TTT resets the negotiation (RFC 7143 11.10.4).
                    self.text = TextState::default();
                }
            }
        } else {
            self.text.outgoing = None;
        }
        if self.text.incoming.len() + t.data.len() > TEXT_BYTES_MAX {
            self.text = TextState::default();
            let bhs = encode_bhs(&Pdu::TextRequest(t));
            self.reject(RejectReason::ProtocolError, &bhs);
            return;
        }
        self.text.incoming.extend_from_slice(&t.data);
        if t.continue_ {
            // More request text follows: acknowledge with an empty response.
            let ttt = self.alloc_ttt();
            self.text.outgoing = Some((ttt, Bytes::new()));
            let stat_sn = self.take_stat_sn();
            let p = Pdu::TextResponse(TextResponse {
                final_: false,
                continue_: false,
                lun: t.lun,
                itt: t.itt,
                ttt: Ttt(ttt),
                stat_sn,
                exp_cmd_sn: self.window.exp_cmd_sn(),
                max_cmd_sn: self.window.max_cmd_sn(),
                data: Bytes::new(),
            });
            self.queue(&p);
            return;
        }
        let request = std::mem::take(&mut self.text.incoming);
        let answer = self.ctx.text_answer(&request);
        let ttt = self.alloc_ttt();
        self.send_text_part(t.itt, t.lun, ttt, Bytes::from(answer), seg);
    }

    fn send_text_part(&mut self, itt: Itt, lun: Lun, ttt: u32, text: Bytes, seg: usize) {
        let more = text.len() > seg;
        let (now, rest) = if more {
            (text.slice(..seg), text.slice(seg..))
        } else {
            (text, Bytes::new())
        };
        if more {
            self.text.outgoing = Some((ttt, rest));
        }
        let stat_sn = self.take_stat_sn();
        let p = Pdu::TextResponse(TextResponse {
            final_: !more,
            continue_: more,
            lun,
            itt,
            ttt: Ttt(if more { ttt } else { RESERVED_TAG }),
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            data: now,
        });
        self.queue(&p);
    }

    fn on_logout(&mut self, l: LogoutRequest) {
        self.finish_request(l.immediate);
        let response = match l.reason {
            0 | 1 => 0,
            // ErrorRecoveryLevel 0: no connection recovery.
            2 => 2,
            _ => 3,
        };
        if response == 0 {
            // RFC 7143 11.15: the response reports the cleanup done; the initiator
            // may log in again the moment it reads it.
            self.ctx.connection_closed();
        }
        let stat_sn = self.take_stat_sn();
        let p = Pdu::LogoutResponse(LogoutResponse {
            response,
            itt: l.itt,
            stat_sn,
            exp_cmd_sn: self.window.exp_cmd_sn(),
            max_cmd_sn: self.window.max_cmd_sn(),
            time2wait: 0,
            time2retain: 0,
        });
        self.queue(&p);
        if response == 0 {
            info!(initiator = %self.ctx.nexus.initiator_name, "logout");
            self.close = true;
        }
    }
}

fn encode_bhs(p: &Pdu) -> [u8; BHS_LEN] {
    let mut b = BytesMut::new();
    p.encode(
        &mut b,
        &Framing {
            max_recv_data_segment: pdu::DATA_SEGMENT_LEN_MAX,
            ..Framing::default()
        },
    );
    let mut out = [0u8; BHS_LEN];
    out.copy_from_slice(&b[..BHS_LEN]);
    out
}
