//! One iSCSI connection in the full feature phase.
//!
//! A reader task turns socket bytes into PDUs (bounded queue); the connection task owns all
//! state and runs one loop: take a PDU or a finished command, update state, write what it
//! produced. SCSI commands run on blocking threads and report back over a channel, so many
//! can be in flight and finish in any order. StatSN is stamped as responses are queued, so
//! it rises monotonically on the wire.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ftss_proto::cmdsn::{Admit, CmdWindow};
use ftss_proto::frame::{Frame, FrameDecoder, FrameError};
use ftss_proto::pdu::{
    self, DataIn, DecodeError, Framing, Itt, LogoutRequest, LogoutResponse, Lun, NopIn, NopOut,
    Pdu, R2t, Reject, RejectReason, Residual, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, TmfFunction, Ttt, BHS_LEN, RESERVED_TAG,
};
use ftss_proto::serial::{CmdSn, DataSn, R2tSn, StatSn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::session::{SessionCtx, SessionKind};
use super::transfer::{data_in_pieces, WriteCollect, XferError, XferLimits};
use crate::media::cache::{self, defer_commits, PendingCommits};
use crate::scsi::{
    AbortWait, DataInSent, Park, ScsiCommand as ExecCmd, ScsiOutcome, TaskAborter, TaskAttr,
};

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
const WRITE_BUFFER_BYTES_MAX: u64 = 64 << 20;
/// Immediate commands one connection may have running at once.
const IMMEDIATE_TASKS_MAX: usize = 32;
/// PDUs the reader may queue ahead of the connection task.
const READ_QUEUE_PDUS_MAX: usize = 64;
/// Text one text negotiation may accumulate across continuation PDUs.
const TEXT_BYTES_MAX: usize = 64 << 10;
/// How long a closed connection keeps answering aborts for its commands still executing
/// (a stuck backing store is given up on after this).
const DRAIN_MAX: Duration = Duration::from_secs(60);

/// What the SCSI layer asks of a connection, outside the initiator's PDUs.
pub(crate) enum Control {
    /// Abort every task for this LUN as if another nexus's ABORT TASK SET hit them
    /// (PREEMPT AND ABORT); `wait` goes with each task until it has ended.
    AbortLun { lun: u64, wait: AbortWait },
}

/// The connection of one nexus as the SCSI layer's [`TaskAborter`] sees it.
pub(crate) struct ConnAborter(mpsc::UnboundedSender<Control>);

impl TaskAborter for ConnAborter {
    fn abort_lun_tasks(&self, lun: u64, wait: AbortWait) {
        // A connection already gone drops the request, and `wait` with it: none of its
        // tasks is left (it keeps this channel until they have ended).
        let _ = self.0.send(Control::AbortLun { lun, wait });
    }
}

/// A control channel for a new connection: the aborter to register with the SCSI target
/// and the receiver [`run`] takes.
pub(crate) fn control_channel() -> (ConnAborter, mpsc::UnboundedReceiver<Control>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ConnAborter(tx), rx)
}

/// Negotiated parameters of a connection entering the full feature phase.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnParams {
    /// Framing for what we receive (digests, our MaxRecvDataSegmentLength).
    pub(crate) framing: Framing,
    /// Data movement limits.
    pub(crate) xfer: XferLimits,
}

/// What the reader task hands over.
enum ReadEvent {
    Pdu(Pdu, [u8; BHS_LEN]),
    /// A PDU that could not be decoded but whose frame was consumed: answer with Reject.
    Bad(DecodeError, [u8; BHS_LEN]),
}

struct Done {
    itt: u32,
    generation: u64,
    outcome: ScsiOutcome,
}

/// A parked command's wait ended (woken or timed out): run it again.
struct Resume {
    itt: u32,
    generation: u64,
    until: std::time::Instant,
}

enum TaskState {
    /// Waiting for data-out.
    Collecting(WriteCollect),
    /// Handed to the SCSI layer.
    Running,
    /// Parked by the SCSI layer (a long poll): waits on the async side, no thread held.
    Parked {
        /// Held for its drop, which ends the wait.
        _wait: ParkedWait,
    },
}

/// The wait of a parked command; ends it when the task goes (aborted, connection
/// closed), so nothing of a dropped poll lingers until its deadline.
struct ParkedWait(tokio::task::AbortHandle);

impl Drop for ParkedWait {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lives as long as a command executes on its blocking thread, holding what waits for
/// that end (see [`AbortWait`]).
#[derive(Default)]
struct TaskEnd(Mutex<Vec<AbortWait>>);

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

/// Runs the full feature phase of one connection until logout, error or shutdown.
pub(crate) async fn run(
    ctx: Arc<SessionCtx>,
    params: ConnParams,
    exp_cmd_sn: CmdSn,
    stat_sn: StatSn,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    mut ctl_rx: mpsc::UnboundedReceiver<Control>,
) {
    let (pdu_tx, mut pdu_rx) = mpsc::channel(READ_QUEUE_PDUS_MAX);
    let framing = params.framing;
    let released_at_eof = Arc::clone(&ctx);
    let reader_task = tokio::spawn(async move {
        read_loop(reader, framing, pdu_tx).await;
        // The initiator dropped the connection (or the event loop is gone): release the
        // nexus now rather than after the queued PDUs and the writer, so a login that
        // follows the FIN never meets the old nexus's state (removal prevention,
        // reservations, node registration).
        released_at_eof.connection_closed();
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (resume_tx, mut resume_rx) = mpsc::unbounded_channel();
    let mut conn = Conn {
        window: CmdWindow::new(exp_cmd_sn, ctx.cmd_window),
        stat_sn,
        out_framing: Framing {
            max_recv_data_segment: params.xfer.send_segment_max,
            ..framing
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
        out: BytesMut::with_capacity(64 << 10),
        done_tx,
        resume_tx,
        sent: Vec::new(),
        ctx,
        close: false,
        ping: None,
    };
    conn.event_loop(
        &mut pdu_rx,
        &mut done_rx,
        &mut resume_rx,
        &mut ctl_rx,
        writer,
    )
    .await;
    // Responses still queued never reached the initiator: their hooks hear 0 bytes now,
    // not after the drain.
    conn.sent.clear();
    reader_task.abort();
    conn.ctx.connection_closed();
    conn.drain(&mut done_rx, &mut ctl_rx).await;
    if let SessionKind::Normal(scsi) = &conn.ctx.kind {
        scsi.remove_task_aborter(conn.ctx.nexus.id);
        // A command that was still executing at the release may have left state for
        // this nexus (a PREVENT, a registration); nothing runs for it any more.
        scsi.nexus_removed(&conn.ctx.nexus);
    }
}

struct Conn {
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
    out: BytesMut,
    done_tx: mpsc::UnboundedSender<Done>,
    resume_tx: mpsc::UnboundedSender<Resume>,
    /// Data-in hooks of responses queued in `out`, with the bytes of data-in each carries:
    /// told once `out` is written, dropped (0 bytes) if it never is.
    sent: Vec<(DataInSent, usize)>,
    close: bool,
    /// Outstanding target ping: its TTT and deadline.
    ping: Option<(u32, Instant)>,
}

async fn read_loop(mut rd: OwnedReadHalf, framing: Framing, tx: mpsc::Sender<ReadEvent>) {
    let mut frames = FrameReader::new(framing);
    loop {
        let ev = match frames.read_frame(&mut rd).await {
            Err(_) => return,
            Ok(Ok(frame)) => match frame.decode() {
                Ok(p) => ReadEvent::Pdu(p, frame.bhs()),
                Err(DecodeError::HeaderDigest) => {
                    warn!("header digest error: closing the connection");
                    return;
                }
                Err(e) => ReadEvent::Bad(e, frame.bhs()),
            },
            // The decoder skips the oversized segment as it is read, so framing survives;
            // the connection rejects the PDU.
            Ok(Err(FrameError::TooLong { bhs, len, max })) => {
                ReadEvent::Bad(DecodeError::DataSegmentTooLong { len, max }, bhs)
            }
            Ok(Err(e)) => {
                warn!("{e}: closing the connection");
                return;
            }
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// Reads frames off a socket through the shared decoder ([`FrameDecoder`]), never reading
/// past the current frame: the login hands the socket to the full feature phase with
/// nothing of the next phase read ahead.
pub(crate) struct FrameReader {
    dec: FrameDecoder,
    scratch: Vec<u8>,
}

impl FrameReader {
    pub(crate) fn new(framing: Framing) -> Self {
        FrameReader {
            dec: FrameDecoder::new(framing),
            scratch: Vec::new(),
        }
    }

    /// The next frame, or why the stream cannot be framed; `Err` when the socket fails
    /// or closes.
    pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> std::io::Result<Result<Frame, FrameError>> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Ok(f)),
                Err(e) => return Ok(Err(e)),
                Ok(None) => {}
            }
            let n = self.dec.want();
            self.scratch.resize(n, 0);
            rd.read_exact(&mut self.scratch[..n]).await?;
            self.dec.feed(&self.scratch[..n]);
        }
    }
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

/// Hands a command's outcome (`done`, for a command of `lun`) to its connection once the
/// writes it made are committed (at once when it made none). A commit that fails turns
/// GOOD into CHECK CONDITION.
fn complete(
    rt: &tokio::runtime::Handle,
    tx: mpsc::UnboundedSender<Done>,
    scsi: Arc<crate::scsi::ScsiTarget>,
    lun: u64,
    mut done: Done,
    commits: PendingCommits,
) {
    if commits.is_empty() {
        let _ = tx.send(done);
        return;
    }
    rt.spawn(async move {
        match commits.wait().await {
            // A command that failed anyway keeps its own sense.
            Err(e) if done.outcome.status == STATUS_GOOD => {
                warn!("write not committed: {e}");
                done.outcome = scsi.commit_failed(lun, e);
            }
            _ => {}
        }
        let _ = tx.send(done);
    });
}

impl Conn {
    async fn event_loop(
        &mut self,
        pdu_rx: &mut mpsc::Receiver<ReadEvent>,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
        resume_rx: &mut mpsc::UnboundedReceiver<Resume>,
        ctl_rx: &mut mpsc::UnboundedReceiver<Control>,
        mut wr: OwnedWriteHalf,
    ) {
        let interval = Duration::from_secs(u64::from(self.ctx.nop_interval_s));
        let timeout = Duration::from_secs(u64::from(self.ctx.nop_timeout_s));
        let mut last_rx = Instant::now();
        let mut shutdown = self.ctx.shutdown.clone();
        loop {
            let ping_at = match self.ping {
                Some((_, deadline)) => deadline,
                None => last_rx + interval,
            };
            tokio::select! {
                ev = pdu_rx.recv() => match ev {
                    Some(ev) => {
                        last_rx = Instant::now();
                        self.on_read(ev);
                    }
                    None => break,
                },
                Some(d) = done_rx.recv() => self.on_done(d),
                Some(r) = resume_rx.recv() => self.on_resume(r),
                Some(c) = ctl_rx.recv() => self.on_control(c),
                () = tokio::time::sleep_until(ping_at) => {
                    if self.ping.is_some() {
                        warn!(initiator = %self.ctx.nexus.initiator_name, "no answer to NOP-In within {timeout:?}: dropping the connection");
                        break;
                    }
                    self.send_ping(timeout);
                }
                _ = shutdown.changed() => {
                    debug!("connection shut down by the session registry");
                    break;
                }
            }
            // Batch: take whatever else is ready before writing.
            for _ in 0..64 {
                if let Ok(d) = done_rx.try_recv() {
                    self.on_done(d);
                } else if let Ok(ev) = pdu_rx.try_recv() {
                    self.on_read(ev);
                } else {
                    break;
                }
            }
            if !self.out.is_empty() {
                if let Err(e) = wr.write_all(&self.out).await {
                    debug!("write failed: {e}");
                    // Their data never left: the hooks hear 0 bytes as they drop.
                    self.sent.clear();
                    break;
                }
                self.out.clear();
                for (hook, bytes) in self.sent.drain(..) {
                    hook.sent(bytes);
                }
            }
            if self.close {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }

    fn queue(&mut self, p: &Pdu) {
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

    fn send_ping(&mut self, timeout: Duration) {
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
        self.ping = Some((ttt, Instant::now() + timeout));
    }

    fn on_read(&mut self, ev: ReadEvent) {
        let (p, bhs) = match ev {
            ReadEvent::Pdu(p, bhs) => (p, bhs),
            ReadEvent::Bad(e, bhs) => {
                debug!("bad PDU: {e}");
                if e == DecodeError::DataDigest && bhs[0] & 0x3f == pdu::opcode::DATA_OUT {
                    // ERL 0 cannot recover the lost data: fail the command it belonged to.
                    let itt = u32::from_be_bytes([bhs[16], bhs[17], bhs[18], bhs[19]]);
                    self.fail_collecting(itt, 0x0b, 0x47, 0x05);
                }
                match e.reject_reason() {
                    Some(r) => self.reject(r, &bhs),
                    None => self.close = true,
                }
                return;
            }
        };
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
            | Pdu::LogoutRequest(_) => self.admit(p, &bhs),
            Pdu::LoginRequest(_) => self.reject(RejectReason::ProtocolError, &bhs),
            _ => self.reject(RejectReason::CommandNotSupported, &bhs),
        }
    }

    fn admit(&mut self, p: Pdu, bhs: &[u8; BHS_LEN]) {
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
                    self.deliver(p);
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
    fn deliver(&mut self, p: Pdu) {
        match p {
            Pdu::ScsiCommand(c) => self.on_scsi_command(c),
            Pdu::NopOut(n) => self.on_nop_out(n),
            Pdu::TaskMgmtRequest(t) => self.on_tmf(t),
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

    fn on_scsi_command(&mut self, mut c: pdu::ScsiCommand) {
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
            received: Instant::now(),
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
                    &[],
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
                &[],
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
            TaskState::Running | TaskState::Parked { .. } => Vec::new(),
        };
        self.execute(itt, data, None);
    }

    /// Runs a command on the SCSI layer: first with its data-out, again with
    /// `resume_until` after it was parked.
    fn execute(&mut self, itt: u32, data: Vec<u8>, resume_until: Option<std::time::Instant>) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        let SessionKind::Normal(scsi) = &self.ctx.kind else {
            return;
        };
        let scsi = Arc::clone(scsi);
        let nexus = self.ctx.nexus.clone();
        let cdb = task.cmd.cdb.clone();
        let lun = task.cmd.lun.number().unwrap_or(u64::MAX);
        let expected_len = task.cmd.edtl;
        let at = attr(task.cmd.attr);
        let generation = task.generation;
        let arrived = task.arrived;
        let end = Arc::new(TaskEnd::default());
        task.end = Arc::downgrade(&end);
        let tx = self.done_tx.clone();
        let rt = tokio::runtime::Handle::current();
        if scsi.runs_inline(lun, &cdb, data.len()) {
            let cmd = ExecCmd {
                lun,
                cdb: &cdb,
                data_out: &data,
                expected_len,
                attr: at,
                resume_until,
            };
            let inline =
                cache::run_inline(|| defer_commits(|| scsi.execute_arrived(&nexus, &cmd, arrived)));
            if let Some((outcome, commits)) = inline {
                // Ran to its end here: nothing of it is left for an abort to wait for.
                drop(end);
                let done = Done {
                    itt,
                    generation,
                    outcome,
                };
                complete(&rt, tx, scsi, lun, done, commits);
                self.activate_parked();
                return;
            }
        }
        tokio::task::spawn_blocking(move || {
            // Dropped when this thread is done with the command, however it ends.
            let _end = end;
            let cmd = ExecCmd {
                lun,
                cdb: &cdb,
                data_out: &data,
                expected_len,
                attr: at,
                resume_until,
            };
            // Writes append to the write cache here; the wait for their commit happens
            // on the async side, so queue-deep writers do not each hold a thread.
            let (outcome, commits) = defer_commits(|| scsi.execute_arrived(&nexus, &cmd, arrived));
            let done = Done {
                itt,
                generation,
                outcome,
            };
            complete(&rt, tx, scsi, lun, done, commits);
        });
        self.activate_parked();
    }

    /// Waits on the async side for a parked command's wake-up or deadline, then asks
    /// for it to run again ([`Self::on_resume`]).
    fn park(&self, itt: u32, generation: u64, p: Park) -> ParkedWait {
        let tx = self.resume_tx.clone();
        let Park { mut wake, until } = p;
        let deadline = Instant::from_std(until);
        let h = tokio::spawn(async move {
            tokio::select! {
                r = wake.changed() => {
                    // The queue is gone: nothing will wake it, only the deadline.
                    if r.is_err() {
                        tokio::time::sleep_until(deadline).await;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
            let _ = tx.send(Resume {
                itt,
                generation,
                until,
            });
        });
        ParkedWait(h.abort_handle())
    }

    fn on_resume(&mut self, r: Resume) {
        let Some(task) = self.tasks.get_mut(&r.itt) else {
            return;
        };
        if task.generation != r.generation || !matches!(task.state, TaskState::Parked { .. }) {
            return;
        }
        task.state = TaskState::Running;
        self.execute(r.itt, Vec::new(), Some(r.until));
    }

    fn on_done(&mut self, mut d: Done) {
        let Some(task) = self.tasks.get(&d.itt) else {
            return;
        };
        if task.generation != d.generation {
            return;
        }
        if let Some(park) = d.outcome.park.take() {
            // An aborted task ends here instead: its (empty) answer is not sent.
            if !task.aborted {
                let wait = self.park(d.itt, d.generation, park);
                if let Some(task) = self.tasks.get_mut(&d.itt) {
                    task.state = TaskState::Parked { _wait: wait };
                }
                return;
            }
        }
        let Some(task) = self.tasks.remove(&d.itt) else {
            return;
        };
        self.release_write_budget(&task);
        if !task.aborted {
            let o = d.outcome;
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
                scsi.record_completion(lun, &c.cdb, moved, task.received.elapsed());
            }
            self.finish_request(c.immediate);
            let data = &o.data_in[..send as usize];
            self.respond_scsi(&task, o.status, o.sense, data, residual, task.r2ts_sent);
            if let Some(hook) = o.on_sent {
                self.sent.push((hook, send as usize));
            }
        } else if task.report_abort {
            self.respond_aborted(&task);
        } else {
            self.finish_request(task.cmd.immediate);
        }
        self.tmf_task_done(d.itt);
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
            &[],
            residual,
            task.r2ts_sent,
        );
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::AbortLun { lun, wait } => self.abort_lun(lun, &wait),
        }
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

    /// The connection and its nexus are gone: tasks still collecting data end, and those
    /// still executing are waited for (bounded by [`DRAIN_MAX`]) while aborts from other
    /// nexuses keep being answered, so a PREEMPT AND ABORT meanwhile waits for them too.
    async fn drain(
        &mut self,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
        ctl_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) {
        // No one is left to answer, and a pending TMF (a cold reset too) dies with the
        // connection that asked for it.
        self.tmfs.clear();
        self.tasks
            .retain(|_, t| matches!(t.state, TaskState::Running));
        for t in self.tasks.values_mut() {
            t.aborted = true;
            t.report_abort = false;
        }
        let deadline = Instant::now() + DRAIN_MAX;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(d) = done_rx.recv() => self.on_done(d),
                Some(c) = ctl_rx.recv() => self.on_control(c),
                () = tokio::time::sleep_until(deadline) => {
                    warn!(initiator = %self.ctx.nexus.initiator_name, tasks = self.tasks.len(), "commands still executing {DRAIN_MAX:?} after the connection closed");
                    break;
                }
            }
        }
    }

    /// Sends Data-In (with phase-collapsed status when possible) and/or a SCSI Response.
    fn respond_scsi(
        &mut self,
        task: &Task,
        status: u8,
        sense: Option<Vec<u8>>,
        data: &[u8],
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
                data: Bytes::copy_from_slice(
                    &data[piece.offset as usize..(piece.offset + piece.len) as usize],
                ),
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

    fn on_tmf(&mut self, t: TaskMgmtRequest) {
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
                            self.deliver(p);
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
                Some((ttt, rest)) if ttt == t.ttt.0 => {
                    self.send_text_part(t.itt, t.lun, ttt, rest, seg);
                    return;
                }
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
