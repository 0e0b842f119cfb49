//! One iSCSI session over one connection: login, a reader task that routes every PDU
//! from the target to the request waiting on its ITT, CmdSN window accounting, and the
//! full-feature requests (SCSI commands, NOP, text, logout).
//!
//! Many requests may be in flight at once: each registers a waiter under its ITT, writes
//! its PDUs under the writer lock, and awaits its own completion. The reader never
//! writes except by spawning (answers to target pings), so a slow socket in one
//! direction cannot stall the other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ftss_proto::negotiate::Params;
use ftss_proto::pdu::{
    DataOut, Framing, Itt, LogoutRequest, Lun, NopOut, Pdu, R2t, Residual, ScsiCommand,
    TextRequest, Ttt, RESERVED_TAG,
};
use ftss_proto::sense::Sense;
use ftss_proto::serial::{CmdSn, DataSn, StatSn};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::SessionConfig;
use crate::login::{self, RECV_SEGMENT};
use crate::scsi::ScsiResult;
use crate::wire;
use crate::Error;

/// A request waiting for the target.
enum Waiter {
    Scsi(ScsiWaiter),
    /// NOP, text and logout: the response PDU itself.
    Reply(oneshot::Sender<Result<Pdu, Error>>),
}

struct ScsiWaiter {
    /// Data-In lands here by buffer offset; sized by the caller's expected length.
    buf: Vec<u8>,
    filled: usize,
    next_data_sn: DataSn,
    r2t: Option<mpsc::UnboundedSender<R2t>>,
    done: oneshot::Sender<Result<ScsiResult, Error>>,
}

struct State {
    cmd_sn: CmdSn,
    exp_cmd_sn: CmdSn,
    max_cmd_sn: CmdSn,
    exp_stat_sn: StatSn,
    next_itt: u32,
    waiters: HashMap<u32, Waiter>,
    closed: bool,
}

impl State {
    fn window_open(&self) -> bool {
        self.cmd_sn.le(self.max_cmd_sn)
    }

    /// RFC 7143 4.2.2.1: ignore a pair where MaxCmdSN < ExpCmdSN - 1, and never move
    /// either number backwards (responses can arrive out of order relative to them).
    fn window(&mut self, exp: CmdSn, max: CmdSn) -> bool {
        if max.lt(CmdSn(exp.0.wrapping_sub(1))) {
            return false;
        }
        if exp.gt(self.exp_cmd_sn) {
            self.exp_cmd_sn = exp;
        }
        if max.gt(self.max_cmd_sn) {
            self.max_cmd_sn = max;
            return true;
        }
        false
    }

    fn stat(&mut self, sn: StatSn) {
        if sn.ge(self.exp_stat_sn) {
            self.exp_stat_sn = sn.next();
        }
    }

    fn alloc_itt(&mut self) -> Itt {
        loop {
            let i = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if i != RESERVED_TAG && !self.waiters.contains_key(&i) {
                return Itt(i);
            }
        }
    }
}

pub(crate) struct Inner {
    /// Frames for the writer task. Handing whole frames to one task means a request
    /// cancelled mid-way (timeout, dropped future) never leaves half a PDU on the wire.
    /// Unbounded because callers enqueue under a lock; what is queued is bounded by the
    /// CmdSN window and by the R2Ts the target chose to send.
    out: mpsc::UnboundedSender<BytesMut>,
    /// Held from CmdSN assignment to enqueueing, so CmdSNs reach the wire in order
    /// without holding `state` (which the reader needs) while encoding.
    order: Mutex<()>,
    framing: Framing,
    params: Params,
    tsih: u16,
    timeout: Duration,
    state: Mutex<State>,
    /// Woken when MaxCmdSN moves or the session closes.
    window: Notify,
}

/// Removes its waiter when the request ends in any way, including cancellation and
/// timeout, so a late answer from the target finds no one and is dropped.
struct Pending<'a> {
    inner: &'a Inner,
    itt: u32,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.inner.lock().waiters.remove(&self.itt);
    }
}

/// A logged-in session. Share it between tasks with `Arc<Session>`: every method takes
/// `&self` and requests run concurrently.
pub struct Session {
    inner: Arc<Inner>,
    reader: Mutex<Option<JoinHandle<()>>>,
    writer: JoinHandle<()>,
    peer: SocketAddr,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(h) = self.reader.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
        self.writer.abort();
    }
}

impl Session {
    /// Connects to `addr` and logs in as `config` says.
    pub async fn connect(addr: SocketAddr, config: SessionConfig) -> Result<Session, Error> {
        let timeout = config.timeout;
        tokio::time::timeout(timeout, Self::connect_inner(addr, config))
            .await
            .map_err(|_| Error::Timeout)?
    }

    async fn connect_inner(addr: SocketAddr, config: SessionConfig) -> Result<Session, Error> {
        let mut stream = TcpStream::connect(addr).await?;
        // Requests are small and latency-bound; Nagle would hold them back.
        stream.set_nodelay(true)?;
        let out = login::login(&mut stream, &config).await?;
        let framing = Framing {
            header_digest: out.params.header_digest,
            data_digest: out.params.data_digest,
            max_recv_data_segment: RECV_SEGMENT,
        };
        let (rd, wr) = stream.into_split();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            out: out_tx,
            order: Mutex::new(()),
            framing,
            params: out.params,
            tsih: out.tsih,
            timeout: config.timeout,
            state: Mutex::new(State {
                cmd_sn: out.cmd_sn,
                exp_cmd_sn: out.exp_cmd_sn,
                max_cmd_sn: out.max_cmd_sn,
                exp_stat_sn: out.exp_stat_sn,
                next_itt: 1,
                waiters: HashMap::new(),
                closed: false,
            }),
            window: Notify::new(),
        });
        let reader = tokio::spawn(reader(Arc::clone(&inner), rd));
        let writer = tokio::spawn(writer(Arc::downgrade(&inner), wr, out_rx));
        Ok(Session {
            inner,
            reader: Mutex::new(Some(reader)),
            writer,
            peer: addr,
        })
    }

    /// The negotiated operational parameters.
    #[must_use]
    pub fn params(&self) -> &Params {
        &self.inner.params
    }

    /// The target-assigned session handle.
    #[must_use]
    pub fn tsih(&self) -> u16 {
        self.inner.tsih
    }

    /// The portal this session is connected to.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection has ended.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Runs one SCSI command on LUN `lun`. `data_out` is written to the target (a write
    /// command); `data_in_len` is the most the command may read. A CHECK CONDITION is a
    /// successful result here: look at [`ScsiResult::status`].
    pub async fn execute(
        &self,
        lun: u16,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        let data_out = data_out.filter(|d| !d.is_empty());
        if data_out.is_some() && data_in_len > 0 {
            return Err(Error::InvalidArgument(
                "bidirectional commands are not supported".into(),
            ));
        }
        if lun > 0x3fff {
            return Err(Error::InvalidArgument(format!("LUN {lun} above 16383")));
        }
        // 16 bytes in the header plus an Extended CDB AHS of at most 255 words.
        if cdb.is_empty() || cdb.len() > 16 + 255 * 4 - 4 {
            return Err(Error::InvalidArgument(format!(
                "CDB of {} bytes",
                cdb.len()
            )));
        }
        if data_in_len > 1 << 30 {
            return Err(Error::InvalidArgument(format!(
                "read of {data_in_len} bytes"
            )));
        }
        let edtl = match &data_out {
            Some(d) => u32::try_from(d.len())
                .map_err(|_| Error::InvalidArgument("write longer than 4 GiB".into()))?,
            None => data_in_len,
        };
        let inner = &*self.inner;
        tokio::time::timeout(
            inner.timeout,
            inner.scsi(Lun::from_number(lun), cdb, data_out, data_in_len, edtl),
        )
        .await
        .map_err(|_| Error::Timeout)?
    }

    /// Sends a NOP-Out ping and waits for the echo; returns the round-trip time.
    pub async fn nop_ping(&self) -> Result<Duration, Error> {
        let inner = &*self.inner;
        let start = Instant::now();
        let payload = Bytes::from_static(b"ftss-ping");
        let expect = payload.clone();
        let reply = tokio::time::timeout(
            inner.timeout,
            inner.request(None, true, move |itt, cmd_sn, exp_stat_sn| {
                Pdu::NopOut(NopOut {
                    immediate: true,
                    lun: Lun(0),
                    itt,
                    ttt: Ttt(RESERVED_TAG),
                    cmd_sn,
                    exp_stat_sn,
                    data: payload,
                })
            }),
        )
        .await
        .map_err(|_| Error::Timeout)??
        .0;
        match reply {
            Pdu::NopIn(n) if n.data == expect => Ok(start.elapsed()),
            Pdu::NopIn(_) => Err(Error::Protocol("NOP-In did not echo the ping data".into())),
            other => Err(unexpected(&other, "NOP-In")),
        }
    }

    /// Asks the target for its targets and their portals (SendTargets=All).
    pub async fn send_targets(&self) -> Result<Vec<(String, Vec<String>)>, Error> {
        let pairs = self.text(&[("SendTargets".into(), "All".into())]).await?;
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in pairs {
            match (k.as_str(), out.last_mut()) {
                ("TargetName", _) => out.push((v, Vec::new())),
                ("TargetAddress", Some((_, addrs))) => addrs.push(v),
                ("TargetAddress", None) => {
                    return Err(Error::Protocol(
                        "TargetAddress before any TargetName".into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// One text negotiation (RFC 7143 11.10): our keys, split into continuation PDUs
    /// when longer than the target accepts, and the target's answer reassembled from
    /// its continuation responses.
    pub async fn text(&self, keys: &[(String, String)]) -> Result<Vec<(String, String)>, Error> {
        const TEXT_MAX: usize = 1 << 20;
        let inner = &*self.inner;
        let mut out = Vec::new();
        ftss_proto::text::encode(keys, &mut out);
        let seg = inner.params.peer_max_recv_data_segment_length as usize;
        let mut chunks: Vec<Bytes> = ftss_proto::text::split(&out, seg)
            .into_iter()
            .map(Bytes::copy_from_slice)
            .collect();
        chunks.reverse();
        let mut itt = None;
        let mut ttt = Ttt(RESERVED_TAG);
        let mut answer = Vec::new();
        let fut = async {
            loop {
                let data = chunks.pop().unwrap_or_default();
                let more = !chunks.is_empty();
                let (reply, used) = inner
                    .request(itt, false, |itt, cmd_sn, exp_stat_sn| {
                        Pdu::TextRequest(TextRequest {
                            immediate: false,
                            final_: !more,
                            continue_: more,
                            lun: Lun(0),
                            itt,
                            ttt,
                            cmd_sn,
                            exp_stat_sn,
                            data,
                        })
                    })
                    .await?;
                itt = Some(used);
                let Pdu::TextResponse(r) = reply else {
                    return Err(unexpected(&reply, "Text Response"));
                };
                answer.extend_from_slice(&r.data);
                if answer.len() > TEXT_MAX {
                    return Err(Error::Protocol("text response too long".into()));
                }
                ttt = r.ttt;
                if !more && r.final_ && !r.continue_ {
                    return Ok(());
                }
                if !more && ttt.0 == RESERVED_TAG {
                    return Err(Error::Protocol(
                        "text response continues without a target transfer tag".into(),
                    ));
                }
            }
        };
        tokio::time::timeout(inner.timeout, fut)
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(ftss_proto::text::parse(&answer)?)
    }

    /// Logs out (closing the session) and waits for the target to close the connection.
    pub async fn logout(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let reply = tokio::time::timeout(
            inner.timeout,
            inner.request(None, true, |itt, cmd_sn, exp_stat_sn| {
                Pdu::LogoutRequest(LogoutRequest {
                    immediate: true,
                    reason: 0,
                    itt,
                    cid: 1,
                    cmd_sn,
                    exp_stat_sn,
                })
            }),
        )
        .await
        .map_err(|_| Error::Timeout)??
        .0;
        let Pdu::LogoutResponse(r) = reply else {
            return Err(unexpected(&reply, "Logout Response"));
        };
        if r.response != 0 {
            return Err(Error::Protocol(format!(
                "logout refused, response {}",
                r.response
            )));
        }
        let handle = self.reader.lock().ok().and_then(|mut h| h.take());
        if let Some(mut h) = handle {
            if tokio::time::timeout(Duration::from_secs(2), &mut h)
                .await
                .is_err()
            {
                h.abort();
            }
        }
        inner.close("logged out");
        Ok(())
    }
}

fn unexpected(p: &Pdu, want: &str) -> Error {
    Error::Protocol(format!("expected {want}, got opcode {:#04x}", p.opcode()))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain numbers behind, still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the session for every waiter.
    fn close(&self, why: &str) {
        let waiters = {
            let mut st = self.lock();
            if !st.closed {
                debug!("session closed: {why}");
            }
            st.closed = true;
            std::mem::take(&mut st.waiters)
        };
        for (_, w) in waiters {
            match w {
                Waiter::Scsi(s) => {
                    let _ = s.done.send(Err(Error::ConnectionClosed));
                }
                Waiter::Reply(tx) => {
                    let _ = tx.send(Err(Error::ConnectionClosed));
                }
            }
        }
        self.window.notify_waiters();
    }

    async fn wait_window(&self) -> Result<(), Error> {
        loop {
            let notified = self.window.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wakeup between check and await is kept.
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.closed {
                    return Err(Error::ConnectionClosed);
                }
                if st.window_open() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Sends one request PDU built by `build` from (ITT, CmdSN, ExpStatSN), registering
    /// `waiter` under the ITT first so no answer can arrive unseen. Non-immediate
    /// requests wait for the CmdSN window and consume a CmdSN.
    async fn send(
        &self,
        itt: Option<Itt>,
        immediate: bool,
        waiter: Option<Waiter>,
        build: impl FnOnce(Itt, CmdSn, StatSn) -> Pdu,
    ) -> Result<Pending<'_>, Error> {
        loop {
            if !immediate {
                self.wait_window().await?;
            }
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            let mut st = self.lock();
            if st.closed {
                return Err(Error::ConnectionClosed);
            }
            if !immediate && !st.window_open() {
                // Another request took the last slot between the wakeup and here.
                continue;
            }
            let itt = match itt {
                Some(i) => i,
                None if waiter.is_none() => Itt(RESERVED_TAG),
                None => st.alloc_itt(),
            };
            let cmd_sn = st.cmd_sn;
            if !immediate {
                st.cmd_sn = cmd_sn.next();
            }
            if let Some(waiter) = waiter {
                st.waiters.insert(itt.0, waiter);
            }
            let exp_stat_sn = st.exp_stat_sn;
            drop(st);
            let pending = Pending {
                inner: self,
                itt: itt.0,
            };
            self.enqueue(wire::encode(
                &build(itt, cmd_sn, exp_stat_sn),
                &self.framing,
            ))?;
            return Ok(pending);
        }
    }

    fn enqueue(&self, frame: BytesMut) -> Result<(), Error> {
        self.out.send(frame).map_err(|_| Error::ConnectionClosed)
    }

    /// A non-SCSI request answered by one PDU; also tells the ITT it used (text
    /// negotiations keep theirs across PDUs).
    async fn request(
        &self,
        itt: Option<Itt>,
        immediate: bool,
        build: impl FnOnce(Itt, CmdSn, StatSn) -> Pdu,
    ) -> Result<(Pdu, Itt), Error> {
        let (tx, rx) = oneshot::channel();
        let pending = self
            .send(itt, immediate, Some(Waiter::Reply(tx)), build)
            .await?;
        let reply = rx.await.map_err(|_| Error::ConnectionClosed)??;
        Ok((reply, Itt(pending.itt)))
    }

    async fn scsi(
        &self,
        lun: Lun,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
        edtl: u32,
    ) -> Result<ScsiResult, Error> {
        let p = &self.params;
        let seg = p.peer_max_recv_data_segment_length.max(512) as usize;
        let (done_tx, mut done_rx) = oneshot::channel();
        let (r2t_tx, mut r2t_rx) = mpsc::unbounded_channel();
        let out = data_out.unwrap_or_default();
        let write = !out.is_empty();
        let len = out.len();
        // Immediate data, then unsolicited Data-Out up to FirstBurstLength, then R2Ts.
        let imm = if write && p.immediate_data {
            len.min(p.first_burst_length as usize).min(seg)
        } else {
            0
        };
        let unsolicited_end = if write && !p.initial_r2t {
            len.min(p.first_burst_length as usize).max(imm)
        } else {
            imm
        };
        let waiter = Waiter::Scsi(ScsiWaiter {
            buf: vec![0; data_in_len as usize],
            filled: 0,
            next_data_sn: DataSn(0),
            r2t: write.then_some(r2t_tx),
            done: done_tx,
        });
        let cdb = Bytes::copy_from_slice(cdb);
        let imm_data = out.slice(..imm);
        let pending = self
            .send(None, false, Some(waiter), |itt, cmd_sn, exp_stat_sn| {
                Pdu::ScsiCommand(ScsiCommand {
                    immediate: false,
                    final_: unsolicited_end == imm,
                    read: data_in_len > 0,
                    write,
                    attr: 1,
                    lun,
                    itt,
                    edtl,
                    cmd_sn,
                    exp_stat_sn,
                    cdb,
                    bidi_read_length: None,
                    data: imm_data,
                })
            })
            .await?;
        let itt = Itt(pending.itt);
        if unsolicited_end > imm {
            let ttt = Ttt(RESERVED_TAG);
            self.data_out(lun, itt, ttt, &out, imm, unsolicited_end, seg)?;
        }
        loop {
            tokio::select! {
                biased;
                r = &mut done_rx => return r.map_err(|_| Error::ConnectionClosed)?,
                Some(r2t) = r2t_rx.recv() => {
                    let off = r2t.buffer_offset as usize;
                    let end = off.saturating_add(r2t.desired_len as usize);
                    if r2t.desired_len == 0 || end > len || r2t.desired_len > p.max_burst_length {
                        return Err(Error::Protocol(format!(
                            "R2T for {} bytes at {off} outside a {len}-byte write",
                            r2t.desired_len
                        )));
                    }
                    self.data_out(lun, itt, r2t.ttt, &out, off, end, seg)?;
                }
            }
        }
    }

    /// One Data-Out sequence for `data[from..to]`, cut at the target's segment size and
    /// queued as one piece so its PDUs stay together and in order.
    #[allow(clippy::too_many_arguments)]
    fn data_out(
        &self,
        lun: Lun,
        itt: Itt,
        ttt: Ttt,
        data: &Bytes,
        from: usize,
        to: usize,
        seg: usize,
    ) -> Result<(), Error> {
        let exp_stat_sn = self.lock().exp_stat_sn;
        let mut buf = BytesMut::with_capacity(to - from + (to - from) / seg * 60 + 64);
        let mut off = from;
        let mut sn = DataSn(0);
        while off < to {
            let end = (off + seg).min(to);
            Pdu::DataOut(DataOut {
                final_: end == to,
                lun,
                itt,
                ttt,
                exp_stat_sn,
                data_sn: sn,
                buffer_offset: off as u32,
                data: data.slice(off..end),
            })
            .encode(&mut buf, &self.framing);
            sn = sn.next();
            off = end;
        }
        self.enqueue(buf)
    }

    /// Routes one PDU from the target. An error ends the connection.
    fn dispatch(&self, pdu: Pdu) -> Result<(), Error> {
        let ping = match &pdu {
            // The target pings us: answer or it drops the connection.
            Pdu::NopIn(n) if n.ttt.0 != RESERVED_TAG => Some((n.ttt, n.lun, n.data.clone())),
            _ => None,
        };
        self.route(pdu)?;
        if let Some((ttt, lun, data)) = ping {
            // Immediate and without a waiter: `send` neither waits nor registers.
            let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
            let (cmd_sn, exp_stat_sn) = {
                let st = self.lock();
                (st.cmd_sn, st.exp_stat_sn)
            };
            let nop = Pdu::NopOut(NopOut {
                immediate: true,
                lun,
                itt: Itt(RESERVED_TAG),
                ttt,
                cmd_sn,
                exp_stat_sn,
                data,
            });
            self.enqueue(wire::encode(&nop, &self.framing))?;
        }
        Ok(())
    }

    fn route(&self, pdu: Pdu) -> Result<(), Error> {
        let mut st = self.lock();
        if let Some((exp, max, stat_sn)) = sequence_numbers(&pdu) {
            if st.window(exp, max) {
                self.window.notify_waiters();
            }
            if let Some(sn) = stat_sn {
                st.stat(sn);
            }
        }
        let (itt, reply) = match pdu {
            Pdu::DataIn(d) => {
                let Some(Waiter::Scsi(w)) = st.waiters.get_mut(&d.itt.0) else {
                    debug!(itt = d.itt.0, "Data-In for no waiting command");
                    return Ok(());
                };
                let off = d.buffer_offset as usize;
                let end = off + d.data.len();
                // DataPDUInOrder and DataSequenceInOrder are Yes: data arrives in order.
                let bad = if d.data_sn != w.next_data_sn {
                    Some("Data-In DataSN out of order")
                } else if off != w.filled {
                    Some("Data-In buffer offset out of order")
                } else if end > w.buf.len() {
                    Some("Data-In beyond the expected length")
                } else {
                    None
                };
                if bad.is_none() {
                    w.buf[off..end].copy_from_slice(&d.data);
                    w.filled = end;
                    w.next_data_sn = w.next_data_sn.next();
                }
                let done = match (bad, d.status) {
                    (Some(why), _) => Err(Error::Protocol(why.into())),
                    (None, Some(status)) => Ok((status, d.residual, Bytes::new())),
                    (None, None) => return Ok(()),
                };
                if let Some(Waiter::Scsi(w)) = st.waiters.remove(&d.itt.0) {
                    w.complete(done);
                }
                return Ok(());
            }
            Pdu::ScsiResponse(r) => {
                match st.waiters.remove(&r.itt.0) {
                    Some(Waiter::Scsi(w)) if r.response != 0 => {
                        let _ = w.done.send(Err(Error::TargetFailure {
                            response: r.response,
                        }));
                    }
                    Some(Waiter::Scsi(w)) => w.complete(Ok((r.status, r.residual, r.sense))),
                    Some(Waiter::Reply(_)) => {
                        return Err(Error::Protocol(
                            "SCSI Response to a non-SCSI request".into(),
                        ))
                    }
                    None => debug!(itt = r.itt.0, "SCSI Response for no waiting command"),
                }
                return Ok(());
            }
            Pdu::R2t(r) => {
                match st.waiters.get(&r.itt.0) {
                    Some(Waiter::Scsi(ScsiWaiter { r2t: Some(tx), .. })) => {
                        let _ = tx.send(r);
                    }
                    Some(_) => return Err(Error::Protocol("R2T for a command that reads".into())),
                    None => debug!(itt = r.itt.0, "R2T for no waiting command"),
                }
                return Ok(());
            }
            Pdu::Reject(r) => {
                // The rejected PDU's header names the request it belonged to.
                let Some(b) = r.header.get(16..20) else {
                    return Err(Error::Protocol("Reject without the rejected header".into()));
                };
                let itt = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                warn!(itt, reason = r.reason, "target rejected a PDU");
                let err = Error::Rejected { reason: r.reason };
                match st.waiters.remove(&itt) {
                    Some(Waiter::Scsi(w)) => {
                        let _ = w.done.send(Err(err));
                    }
                    Some(Waiter::Reply(tx)) => {
                        let _ = tx.send(Err(err));
                    }
                    None => {}
                }
                return Ok(());
            }
            Pdu::AsyncMessage(a) => {
                // Logout requests and drop notices end in EOF soon enough; at
                // ErrorRecoveryLevel 0 there is nothing better to do than let them.
                warn!(event = a.event, "asynchronous message from the target");
                return Ok(());
            }
            // A ping from the target (ITT reserved) is answered by `dispatch`.
            Pdu::NopIn(n) if n.itt.0 == RESERVED_TAG => return Ok(()),
            Pdu::NopIn(ref n) => (n.itt.0, pdu),
            Pdu::TextResponse(ref r) => (r.itt.0, pdu),
            Pdu::LogoutResponse(ref r) => (r.itt.0, pdu),
            Pdu::TaskMgmtResponse(ref r) => (r.itt.0, pdu),
            other => {
                return Err(Error::Protocol(format!(
                    "the target sent opcode {:#04x}",
                    other.opcode()
                )))
            }
        };
        match st.waiters.remove(&itt) {
            Some(Waiter::Reply(tx)) => {
                let _ = tx.send(Ok(reply));
            }
            Some(Waiter::Scsi(_)) => {
                return Err(Error::Protocol(format!(
                    "opcode {:#04x} answers a SCSI command",
                    reply.opcode()
                )));
            }
            None => debug!(itt, "response for no waiting request"),
        }
        Ok(())
    }
}

impl ScsiWaiter {
    /// Hands the command its result: status, residual and sense with the data so far.
    fn complete(self, r: Result<(u8, Residual, Bytes), Error>) {
        let res = r.map(|(status, residual, sense_data)| {
            let mut data_in = Bytes::from(self.buf);
            data_in.truncate(self.filled);
            ScsiResult {
                status,
                sense: Sense::parse(&sense_data).map(|(k, asc, ascq)| Sense::new(k, asc, ascq)),
                sense_data,
                data_in,
                residual,
            }
        });
        let _ = self.done.send(res);
    }
}

/// ExpCmdSN, MaxCmdSN and, when the PDU advances it, StatSN. Data-In carries StatSN
/// only with status, and a target-initiated NOP-In does not advance it.
fn sequence_numbers(p: &Pdu) -> Option<(CmdSn, CmdSn, Option<StatSn>)> {
    Some(match p {
        Pdu::DataIn(d) => (d.exp_cmd_sn, d.max_cmd_sn, d.status.map(|_| d.stat_sn)),
        Pdu::R2t(r) => (r.exp_cmd_sn, r.max_cmd_sn, None),
        Pdu::NopIn(n) => (
            n.exp_cmd_sn,
            n.max_cmd_sn,
            (n.itt.0 != RESERVED_TAG).then_some(n.stat_sn),
        ),
        Pdu::ScsiResponse(r) => (r.exp_cmd_sn, r.max_cmd_sn, Some(r.stat_sn)),
        Pdu::TextResponse(r) => (r.exp_cmd_sn, r.max_cmd_sn, Some(r.stat_sn)),
        Pdu::LogoutResponse(r) => (r.exp_cmd_sn, r.max_cmd_sn, Some(r.stat_sn)),
        Pdu::TaskMgmtResponse(r) => (r.exp_cmd_sn, r.max_cmd_sn, Some(r.stat_sn)),
        Pdu::Reject(r) => (r.exp_cmd_sn, r.max_cmd_sn, Some(r.stat_sn)),
        Pdu::AsyncMessage(a) => (a.exp_cmd_sn, a.max_cmd_sn, Some(a.stat_sn)),
        _ => return None,
    })
}

/// The connection's only reader. Any framing or digest error ends the connection: at
/// ErrorRecoveryLevel 0 the recovery is a new session.
async fn reader(inner: Arc<Inner>, rd: OwnedReadHalf) {
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut frames = wire::PduReader::new(inner.framing);
    let why = loop {
        let pdu = match frames.read_pdu(&mut rd).await {
            Ok(p) => p,
            Err(e) => break e,
        };
        if let Err(e) = inner.dispatch(pdu) {
            break e;
        }
    };
    inner.close(&why.to_string());
}

/// The connection's only writer. It stops when the session is dropped (the channel
/// closes) or the socket fails, and half-closes the socket on the way out.
async fn writer(
    inner: std::sync::Weak<Inner>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<BytesMut>,
) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            if let Some(inner) = inner.upgrade() {
                inner.close(&format!("write failed: {e}"));
            }
            return;
        }
    }
    let _ = wr.shutdown().await;
}
