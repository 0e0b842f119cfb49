//! One iSCSI session over one connection: the tokio shell around the sans-IO
//! [`ftss_proto::initiator::Initiator`].
//!
//! The machine makes every protocol decision (ITTs, the CmdSN window, immediate and
//! unsolicited data, answers to R2Ts and to the target's pings, Data-In reassembly, the
//! ping timeout). This shell owns the socket, the clock and the callers: a reader task
//! feeds it the target's PDUs, a driver task writes what it polls out and fires its
//! timer, and each request waits on a oneshot under its ITT for the machine's
//! completion event.
//!
//! Many requests may be in flight at once; the machine sits behind one mutex that is held
//! only to hand it input and take its output, never across an await, so a slow socket in
//! one direction cannot stall the other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ftss_proto::initiator::{
    ConnError, Event, Initiator, Outcome, ScsiRequest, SubmitError, TaskError,
};
use ftss_proto::negotiate::Params;
use ftss_proto::pdu::{Framing, Itt, Lun, Ttt, RESERVED_TAG};
use ftss_proto::sense::Sense;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::SessionConfig;
use crate::login::{self, RECV_SEGMENT};
use crate::scsi::ScsiResult;
use crate::wire;
use crate::Error;

type Reply = oneshot::Sender<Result<Outcome, TaskError>>;

/// The machine and who waits for what it completes.
struct State {
    m: Initiator,
    waiters: HashMap<u32, Reply>,
}

impl State {
    /// Hands every completion to its waiter. Called after anything that may complete
    /// requests: input, timeouts, submissions, closing.
    fn deliver(&mut self) {
        while let Some(e) = self.m.poll_event() {
            match e {
                Event::Done { itt, result } => {
                    if let Some(tx) = self.waiters.remove(&itt.0) {
                        let _ = tx.send(result);
                    }
                }
                // Logout requests and drop notices end in EOF soon enough; at
                // ErrorRecoveryLevel 0 there is nothing better to do than let them.
                Event::Async(a) => warn!(event = a.event, "asynchronous message from the target"),
                Event::Closed(why) => debug!("session closed: {why}"),
            }
        }
    }
}

pub(crate) struct Inner {
    params: Params,
    tsih: u16,
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes the driver: there is output, or the timer moved.
    wake: Notify,
}

/// Forgets its request when the caller stops waiting in any way, including cancellation
/// and timeout, so a late answer finds no one and a command still waiting for the window
/// is never sent.
struct Pending<'a> {
    inner: &'a Inner,
    itt: Itt,
    rx: Option<oneshot::Receiver<Result<Outcome, TaskError>>>,
}

impl Pending<'_> {
    async fn wait(&mut self) -> Result<Outcome, Error> {
        let rx = self.rx.take().ok_or(Error::ConnectionClosed)?;
        rx.await
            .map_err(|_| Error::ConnectionClosed)?
            .map_err(task_error)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        // Still registered: the machine has not completed it, so it must forget it.
        if st.waiters.remove(&self.itt.0).is_some() {
            st.m.forget(self.itt);
        }
    }
}

/// A logged-in session. Share it between tasks with `Arc<Session>`: every method takes
/// `&self` and requests run concurrently.
pub struct Session {
    inner: Arc<Inner>,
    reader: Mutex<Option<JoinHandle<()>>>,
    driver: JoinHandle<()>,
    peer: SocketAddr,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(h) = self.reader.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
        self.driver.abort();
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
        let inner = Arc::new(Inner {
            params: out.params.clone(),
            tsih: out.tsih,
            timeout: config.timeout,
            state: Mutex::new(State {
                m: Initiator::new(&out, framing, config.timeout),
                waiters: HashMap::new(),
            }),
            wake: Notify::new(),
        });
        let reader = tokio::spawn(reader(Arc::clone(&inner), rd, framing));
        let driver = tokio::spawn(driver(Arc::clone(&inner), wr));
        Ok(Session {
            inner,
            reader: Mutex::new(Some(reader)),
            driver,
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
        self.inner.lock().m.is_closed()
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
        if lun > 0x3fff {
            return Err(Error::InvalidArgument(format!("LUN {lun} above 16383")));
        }
        // The caller's buffer, not the target, sets how much a read may gather.
        if data_in_len > 1 << 30 {
            return Err(Error::InvalidArgument(format!(
                "read of {data_in_len} bytes"
            )));
        }
        let req = ScsiRequest {
            lun: Lun::from_number(lun),
            cdb: Bytes::copy_from_slice(cdb),
            data_out: data_out.unwrap_or_default(),
            data_in_len,
            immediate: false,
            attr: 1,
        };
        let inner = &*self.inner;
        let fut = async {
            let mut p = inner.submit(|m| m.submit_scsi(req))?;
            match p.wait().await? {
                Outcome::Scsi(s) => Ok(ScsiResult {
                    status: s.status,
                    sense: Sense::parse(&s.sense).map(|(k, asc, ascq)| Sense::new(k, asc, ascq)),
                    sense_data: s.sense,
                    data_in: s.data_in,
                    residual: s.residual,
                }),
                other => Err(unexpected(&other, "SCSI Response")),
            }
        };
        tokio::time::timeout(inner.timeout, fut)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// Sends a NOP-Out ping and waits for the echo; returns the round-trip time. No echo
    /// within the session's timeout means the connection is dead: the session closes and
    /// the ping fails with [`Error::Timeout`].
    pub async fn nop_ping(&self) -> Result<Duration, Error> {
        let inner = &*self.inner;
        let start = Instant::now();
        let payload = Bytes::from_static(b"ftss-ping");
        let expect = payload.clone();
        // The machine times the ping out itself (and closes): no timer here.
        let mut p = inner.submit(|m| m.ping(payload, start))?;
        match p.wait().await? {
            Outcome::Nop(data) if data == expect => Ok(start.elapsed()),
            Outcome::Nop(_) => Err(Error::Protocol("NOP-In did not echo the ping data".into())),
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
                let mut p = inner.submit(|m| m.submit_text(itt, ttt, data, more))?;
                itt = Some(p.itt);
                let reply = p.wait().await?;
                let Outcome::Text(r) = reply else {
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
        let fut = async {
            let mut p = inner.submit(|m| m.logout(0))?;
            p.wait().await
        };
        let reply = tokio::time::timeout(inner.timeout, fut)
            .await
            .map_err(|_| Error::Timeout)??;
        let Outcome::Logout(r) = reply else {
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
        Ok(())
    }
}

fn unexpected(o: &Outcome, want: &str) -> Error {
    let got = match o {
        Outcome::Scsi(_) => "a SCSI completion",
        Outcome::Nop(_) => "a NOP-In",
        Outcome::Text(_) => "a Text Response",
        Outcome::TaskMgmt(_) => "a Task Management Response",
        Outcome::Logout(_) => "a Logout Response",
    };
    Error::Protocol(format!("expected {want}, got {got}"))
}

fn task_error(e: TaskError) -> Error {
    match e {
        TaskError::Rejected { reason } => Error::Rejected { reason },
        TaskError::TargetFailure { response } => Error::TargetFailure { response },
        TaskError::Timeout => Error::Timeout,
        TaskError::ConnectionClosed => Error::ConnectionClosed,
        other => Error::Protocol(other.to_string()),
    }
}

fn submit_error(e: SubmitError) -> Error {
    match e {
        SubmitError::Closed => Error::ConnectionClosed,
        SubmitError::Invalid(why) => Error::InvalidArgument(why),
        other => Error::Protocol(other.to_string()),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock is a bug in the machine; failing every later request on
        // a poisoned lock would turn one bad command into a dead session.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the machine a request and registers its waiter; the driver sends it.
    fn submit(
        &self,
        f: impl FnOnce(&mut Initiator) -> Result<Itt, SubmitError>,
    ) -> Result<Pending<'_>, Error> {
        let (tx, rx) = oneshot::channel();
        let itt = {
            let mut st = self.lock();
            let itt = f(&mut st.m).map_err(submit_error)?;
            st.waiters.insert(itt.0, tx);
            st.deliver();
            itt
        };
        self.wake.notify_one();
        Ok(Pending {
            inner: self,
            itt,
            rx: Some(rx),
        })
    }

    /// Ends the connection for a reason the shell saw; every waiter fails.
    fn close(&self, why: ConnError) {
        let mut st = self.lock();
        st.m.close(why);
        st.deliver();
        drop(st);
        self.wake.notify_one();
    }
}

/// The connection's only reader. Any framing or digest error ends the connection: at
/// ErrorRecoveryLevel 0 the recovery is a new session.
async fn reader(inner: Arc<Inner>, rd: OwnedReadHalf, framing: Framing) {
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut frames = wire::PduReader::new(framing);
    loop {
        let pdu = match frames.read_pdu(&mut rd).await {
            Ok(p) => p,
            Err(e) => {
                inner.close(ConnError::Transport(e.to_string()));
                return;
            }
        };
        let ended = {
            let mut st = inner.lock();
            let r = st.m.handle_pdu(pdu, Instant::now());
            st.deliver();
            r.is_err()
        };
        // An answer may have opened the window or asked for data: let the driver send.
        inner.wake.notify_one();
        if ended {
            return;
        }
    }
}

/// The connection's only writer, and the machine's timer. It stops once the machine has
/// closed and everything it polled out is written (or the socket fails), and half-closes
/// the socket on the way out.
async fn driver(inner: Arc<Inner>, mut wr: OwnedWriteHalf) {
    let mut buf = BytesMut::new();
    loop {
        let (deadline, closed) = {
            let mut st = inner.lock();
            st.m.poll_transmit(&mut buf);
            (st.m.poll_timeout(), st.m.is_closed())
        };
        if !buf.is_empty() {
            if let Err(e) = wr.write_all(&buf).await {
                inner.close(ConnError::Transport(format!("write failed: {e}")));
                break;
            }
            buf.clear();
            continue;
        }
        if closed {
            break;
        }
        match deadline {
            Some(t) => {
                tokio::select! {
                    () = inner.wake.notified() => {}
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {
                        let mut st = inner.lock();
                        st.m.handle_timeout(Instant::now());
                        st.deliver();
                    }
                }
            }
            None => inner.wake.notified().await,
        }
    }
    let _ = wr.shutdown().await;
}
