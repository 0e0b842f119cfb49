//! One iSCSI connection in the full feature phase: the tokio shell around the sans-IO
//! [`machine::Machine`].
//!
//! A reader task cuts socket bytes into frames (bounded queue); the connection task runs
//! one loop: wait for a frame, a finished command, a resumed long poll, a request from
//! the SCSI layer or the machine's timeout, feed it to the machine, then run what it
//! polls out (commands on blocking threads or inline, parked commands as async waits)
//! and write the PDUs it produced. Commands report back over a channel, so many can be in
//! flight and finish in any order.

pub(crate) mod machine;
#[cfg(test)]
mod pair;
#[cfg(test)]
mod rfc7143;
#[cfg(test)]
mod rfc7143_e2e;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use ftss_proto::frame::{Frame, FrameDecoder, FrameError};
use ftss_proto::pdu::Framing;
use ftss_proto::serial::{CmdSn, StatSn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

pub(crate) use self::machine::Control;
use self::machine::{Exec, Machine, ParkRequest};
use super::session::{SessionCtx, SessionKind};
use super::transfer::XferLimits;
use crate::media::cache::{defer_commits, PendingCommits};
use crate::media::inline;
use crate::scsi::{AbortWait, ScsiCommand as ExecCmd, ScsiOutcome, TaskAborter};
use ftss_proto::sense::status::GOOD as STATUS_GOOD;

/// Frames the reader may queue ahead of the connection task.
const READ_QUEUE_FRAMES_MAX: usize = 64;
/// How long a closed connection keeps answering aborts for its commands still executing
/// (a stuck backing store is given up on after this).
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// Inputs the loop takes without writing in between, so one write carries many answers.
const BATCH_INPUTS_MAX: usize = 64;

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

/// A command's outcome on its way back to the machine.
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

/// The wait of a parked command; ends it when dropped (the task went: aborted, connection
/// closed), so nothing of a dropped poll lingers until its deadline.
struct ParkedWait(tokio::task::AbortHandle);

impl Drop for ParkedWait {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    let (frame_tx, mut frame_rx) = mpsc::channel(READ_QUEUE_FRAMES_MAX);
    let framing = params.framing;
    let released_at_eof = Arc::clone(&ctx);
    let reader_task = tokio::spawn(async move {
        read_loop(reader, framing, frame_tx).await;
        // The initiator dropped the connection (or the event loop is gone): release the
        // nexus now rather than after the queued PDUs and the writer, so a login that
        // follows the FIN never meets the old nexus's state (removal prevention,
        // reservations, node registration).
        released_at_eof.connection_closed();
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (resume_tx, mut resume_rx) = mpsc::unbounded_channel();
    let mut shell = Shell {
        m: Machine::new(ctx, params, exp_cmd_sn, stat_sn, std::time::Instant::now()),
        done_tx,
        resume_tx,
        waits: HashMap::new(),
        out: Vec::new(),
    };
    shell
        .event_loop(
            &mut frame_rx,
            &mut done_rx,
            &mut resume_rx,
            &mut ctl_rx,
            writer,
        )
        .await;
    reader_task.abort();
    let ctx = Arc::clone(shell.m.ctx());
    ctx.connection_closed();
    shell.drain(&mut done_rx, &mut ctl_rx).await;
    if let SessionKind::Normal(scsi) = &ctx.kind {
        scsi.remove_task_aborter(ctx.nexus.id);
        // A command that was still executing at the release may have left state for
        // this nexus (a PREVENT, a registration); nothing runs for it any more.
        scsi.nexus_removed(&ctx.nexus);
    }
}

/// Reads frames until the socket closes or the stream can no longer be framed (that
/// error is the last thing sent).
async fn read_loop(
    mut rd: OwnedReadHalf,
    framing: Framing,
    tx: mpsc::Sender<Result<Frame, FrameError>>,
) {
    let mut frames = FrameReader::new(framing);
    loop {
        let Ok(r) = frames.read_frame(&mut rd).await else {
            return;
        };
        // A segment too long is skipped as it is read, so framing survives it.
        let fatal = matches!(&r, Err(e) if !matches!(e, FrameError::TooLong { .. }));
        if tx.send(r).await.is_err() || fatal {
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

/// Most pieces handed to one `writev` (the kernel's IOV_MAX is 1024).
const WRITE_PIECES_MAX: usize = 64;

/// Writes `pieces` in order, as few vectored writes as the socket allows, and empties
/// the list; what a short write left is sent by the next round.
async fn write_pieces<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    pieces: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < pieces.len() {
        let n = {
            // On the stack: this runs for every batch of PDUs a connection sends.
            let mut slices = [std::io::IoSlice::new(&[]); WRITE_PIECES_MAX];
            let k = (pieces.len() - first).min(WRITE_PIECES_MAX);
            for (s, p) in slices.iter_mut().zip(&pieces[first..first + k]) {
                *s = std::io::IoSlice::new(p);
            }
            wr.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 && first < pieces.len() {
            let p = &mut pieces[first];
            if left >= p.len() {
                left -= p.len();
                first += 1;
            } else {
                p.advance(left);
                left = 0;
            }
        }
        while pieces.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
    }
    pieces.clear();
    Ok(())
}

/// The machine and the I/O around it.
struct Shell {
    m: Machine,
    done_tx: mpsc::UnboundedSender<Done>,
    resume_tx: mpsc::UnboundedSender<Resume>,
    /// The waits of parked commands by ITT, with the generation each is for.
    waits: HashMap<u32, (u64, ParkedWait)>,
    /// Polled PDUs, written in order with one vectored write where the socket takes it.
    out: Vec<Bytes>,
}

impl Shell {
    async fn event_loop(
        &mut self,
        frame_rx: &mut mpsc::Receiver<Result<Frame, FrameError>>,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
        resume_rx: &mut mpsc::UnboundedReceiver<Resume>,
        ctl_rx: &mut mpsc::UnboundedReceiver<Control>,
        mut wr: OwnedWriteHalf,
    ) {
        let mut shutdown = self.m.ctx().shutdown.clone();
        loop {
            let wake = Instant::from_std(self.m.poll_timeout());
            tokio::select! {
                r = frame_rx.recv() => match r {
                    Some(r) => self.frame(r),
                    None => break,
                },
                Some(d) = done_rx.recv() => self.done(d),
                Some(r) = resume_rx.recv() => self.m.handle_resume(r.itt, r.generation, r.until),
                Some(c) = ctl_rx.recv() => self.m.handle_control(c),
                () = tokio::time::sleep_until(wake) => self.m.handle_timeout(std::time::Instant::now()),
                _ = shutdown.changed() => {
                    debug!("connection shut down by the session registry");
                    break;
                }
            }
            // Batch: take whatever else is ready before writing.
            for _ in 0..BATCH_INPUTS_MAX {
                if let Ok(d) = done_rx.try_recv() {
                    self.done(d);
                } else if let Ok(r) = frame_rx.try_recv() {
                    self.frame(r);
                } else {
                    break;
                }
            }
            self.run_polled();
            let hooks = self.m.poll_transmit(&mut self.out);
            if !self.out.is_empty() {
                if let Err(e) = write_pieces(&mut wr, &mut self.out).await {
                    debug!("write failed: {e}");
                    // Their data never left: the hooks hear 0 bytes as they drop.
                    break;
                }
                self.out.clear();
                for (hook, bytes) in hooks {
                    hook.sent(bytes);
                }
            }
            if self.m.is_closed() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }

    fn frame(&mut self, r: Result<Frame, FrameError>) {
        let now = std::time::Instant::now();
        match r {
            Ok(f) => self.m.handle_frame(&f, now),
            Err(e) => self.m.handle_frame_error(e, now),
        }
        // Commands run in the order they were delivered, each before the next frame is
        // looked at, as they did before the machine queued them.
        self.run_polled();
    }

    fn done(&mut self, d: Done) {
        self.m
            .handle_done(d.itt, d.generation, d.outcome, std::time::Instant::now());
        self.run_polled();
    }

    /// Runs the commands and starts the waits the machine asked for, and ends the waits
    /// of parked tasks that are gone.
    fn run_polled(&mut self) {
        while let Some(e) = self.m.poll_execute() {
            self.execute(e);
        }
        while let Some(p) = self.m.poll_park() {
            self.park(p);
        }
        if !self.waits.is_empty() {
            let m = &self.m;
            self.waits.retain(|&itt, (g, _)| m.is_parked(itt, *g));
        }
    }

    /// Runs a command on the SCSI layer: inline when it cannot block (a write into the
    /// cache, a read from memory), on a blocking thread otherwise or when the inline try
    /// would have blocked.
    fn execute(&mut self, e: Exec) {
        let ctx = self.m.ctx();
        let SessionKind::Normal(scsi) = &ctx.kind else {
            return;
        };
        let scsi = Arc::clone(scsi);
        let nexus = ctx.nexus.clone();
        let tx = self.done_tx.clone();
        let rt = tokio::runtime::Handle::current();
        let Exec {
            itt,
            generation,
            lun,
            cdb,
            data,
            expected_len,
            attr,
            resume_until,
            arrived,
            end,
        } = e;
        if scsi.runs_inline(lun, &cdb, data.len()) {
            let cmd = ExecCmd {
                lun,
                cdb: &cdb,
                data_out: &data,
                expected_len,
                attr,
                resume_until,
            };
            let inline = inline::run_inline(|| {
                defer_commits(|| scsi.execute_arrived(&nexus, &cmd, arrived))
            });
            scsi.record_inline(lun, &cdb, inline.is_some());
            if let Some((outcome, commits)) = inline {
                // Ran to its end here: nothing of it is left for an abort to wait for.
                drop(end);
                let done = Done {
                    itt,
                    generation,
                    outcome,
                };
                complete(&rt, tx, scsi, lun, done, commits);
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
                attr,
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
    }

    /// Waits on the async side for a parked command's wake-up or deadline, then asks
    /// for it to run again.
    fn park(&mut self, p: ParkRequest) {
        let tx = self.resume_tx.clone();
        let ParkRequest {
            itt,
            generation,
            park,
        } = p;
        let crate::scsi::Park { mut wake, until } = park;
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
        self.waits
            .insert(itt, (generation, ParkedWait(h.abort_handle())));
    }

    /// The connection and its nexus are gone: tasks still collecting data end, and those
    /// still executing are waited for (bounded by [`DRAIN_MAX`]) while aborts from other
    /// nexuses keep being answered, so a PREEMPT AND ABORT meanwhile waits for them too.
    async fn drain(
        &mut self,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
        ctl_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) {
        self.m.close_and_drain();
        self.waits.clear();
        let deadline = Instant::now() + DRAIN_MAX;
        while self.m.running_tasks() > 0 {
            tokio::select! {
                Some(d) = done_rx.recv() => {
                    self.m.handle_done(d.itt, d.generation, d.outcome, std::time::Instant::now());
                }
                Some(c) = ctl_rx.recv() => self.m.handle_control(c),
                () = tokio::time::sleep_until(deadline) => {
                    warn!(initiator = %self.m.ctx().nexus.initiator_name, tasks = self.m.running_tasks(), "commands still executing {DRAIN_MAX:?} after the connection closed");
                    break;
                }
            }
            // Nothing goes out any more: what the machine answers is dropped.
            drop(self.m.poll_transmit(&mut self.out));
            self.out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `step` bytes per write, vectored or not.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
        writes: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            self.writes += 1;
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            self.writes += 1;
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn pieces_arrive_whole_and_in_order_through_short_writes() {
        let sizes = [48usize, 0, 4096, 3, 0, 0, 130_000, 1, 48, 65_536];
        let pieces: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8 + 1; n]))
            .collect();
        let want: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        for step in [1, 7, 4096, 1 << 20] {
            let mut w = Trickle {
                got: Vec::new(),
                step,
                writes: 0,
            };
            let mut p = pieces.clone();
            write_pieces(&mut w, &mut p).await.expect("write");
            assert!(p.is_empty(), "the list is emptied");
            assert_eq!(w.got, want, "step {step}");
            if step == 1 << 20 {
                assert_eq!(
                    w.writes, 1,
                    "one vectored write when the socket takes it all"
                );
            }
        }
        // A socket that takes nothing is an error, not a spin.
        let mut w = Trickle {
            got: Vec::new(),
            step: 0,
            writes: 0,
        };
        let mut p = pieces.clone();
        let e = write_pieces(&mut w, &mut p).await.expect_err("write zero");
        assert_eq!(e.kind(), std::io::ErrorKind::WriteZero);
    }
}
