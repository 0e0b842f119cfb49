//! The initiator's side of one connection in the full feature phase (RFC 7143), as a
//! sans-IO state machine.
//!
//! [`Initiator`] is fed the target's frames ([`Initiator::handle_frame`]) and the time
//! ([`Initiator::handle_timeout`]), is handed requests (SCSI commands, pings, text, task
//! management, logout), and is polled for bytes to send ([`Initiator::poll_transmit`]),
//! the next instant it wants to be woken ([`Initiator::poll_timeout`]) and completed
//! requests ([`Initiator::poll_event`]). It reads no clock and owns no socket: a tokio
//! shell (the initiator library) or a test harness drives it.
//!
//! What it decides: ITTs, CmdSN assignment inside the target's window (non-immediate
//! requests beyond MaxCmdSN wait here, in order), ExpStatSN, immediate and unsolicited
//! data within FirstBurstLength, Data-Out sequences answering R2Ts, Data-In reassembly,
//! answers to the target's pings, and the timeout of our own pings. Error recovery level
//! is 0: anything that breaks the connection's framing or sequencing closes it, and every
//! waiting request fails.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::frame::Frame;
use crate::login::LoginOutcome;
use crate::negotiate::Params;
use crate::pdu::{
    AsyncMessage, DataIn, DataOut, DecodeError, Framing, Itt, LogoutRequest, LogoutResponse, Lun,
    NopOut, Pdu, R2t, Residual, ScsiCommand, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, TmfFunction, Ttt, RESERVED_TAG,
};
use crate::serial::{CmdSn, DataSn, StatSn};

/// The largest CDB a SCSI Command carries: 16 bytes in the header plus an Extended CDB
/// AHS of at most 255 words, less its 4-byte header.
pub const CDB_LEN_MAX: usize = 16 + 255 * 4 - 4;

/// The smallest segment we cut Data-Out into, whatever the target declared: RFC 7143
/// 13.12 makes 512 the least legal MaxRecvDataSegmentLength.
const SEGMENT_MIN: u32 = 512;

/// Why a request could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The connection has ended (or a logout is under way).
    #[error("connection closed")]
    Closed,
    /// The request cannot be expressed (bidirectional transfer, oversized CDB, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The ITT asked for is in use by another request.
    #[error("initiator task tag {0:#x} is in use")]
    TagInUse(u32),
    /// Task management names a task this connection does not know.
    #[error("no task with initiator task tag {0:#x}")]
    UnknownTask(u32),
}

/// Why one request failed; the connection may live on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The target answered with a Reject PDU (RFC 7143 11.17.1 reason code).
    #[error("rejected by the target, reason {reason:#04x}")]
    Rejected {
        /// Reject reason code.
        reason: u8,
    },
    /// SCSI Response with a non-zero iSCSI response code.
    #[error("target failure, iSCSI response {response:#04x}")]
    TargetFailure {
        /// Response code.
        response: u8,
    },
    /// The target broke the protocol for this task (R2T outside the write, Data-In out of
    /// order, an answer of the wrong kind).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// ABORT TASK (or a local abort of a command never sent) ended it.
    #[error("aborted")]
    Aborted,
    /// A ping was not answered in time (the connection is closed as well).
    #[error("timed out")]
    Timeout,
    /// The connection ended before the answer came.
    #[error("connection closed")]
    ConnectionClosed,
}

/// Why the connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// A frame that does not decode (at ErrorRecoveryLevel 0 the connection ends).
    #[error("undecodable PDU: {0}")]
    Decode(#[from] DecodeError),
    /// The target broke the connection's protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Our ping went unanswered for the ping timeout.
    #[error("ping not answered in time")]
    PingTimeout,
    /// The logout completed.
    #[error("logged out")]
    LoggedOut,
    /// The shell's transport ended (EOF, socket error), as it reported.
    #[error("transport: {0}")]
    Transport(String),
}

/// A SCSI command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiRequest {
    /// Logical unit.
    pub lun: Lun,
    /// The CDB (1 to [`CDB_LEN_MAX`] bytes).
    pub cdb: Bytes,
    /// Data to write; empty for none.
    pub data_out: Bytes,
    /// The most the command may read.
    pub data_in_len: u32,
    /// Send as an immediate command (no CmdSN taken, not held by the window).
    pub immediate: bool,
    /// Task attribute (0 untagged, 1 simple, ...).
    pub attr: u8,
}

/// What a completed SCSI command returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiOutcome {
    /// SCSI status byte.
    pub status: u8,
    /// Raw sense data (empty when none).
    pub sense: Bytes,
    /// Data read, in order, as much as the target sent.
    pub data_in: Bytes,
    /// Residual against the expected transfer length.
    pub residual: Residual,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A SCSI command completed (a CHECK CONDITION is a completion too).
    Scsi(ScsiOutcome),
    /// Our ping came back with this data.
    Nop(Bytes),
    /// A Text Response (one PDU of a possibly continued answer).
    Text(TextResponse),
    /// The Task Management Function Response.
    TaskMgmt(TaskMgmtResponse),
    /// The Logout Response.
    Logout(LogoutResponse),
}

/// Something the shell should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The request with this ITT ended.
    Done {
        /// Its ITT.
        itt: Itt,
        /// The answer, or why there is none.
        result: Result<Outcome, TaskError>,
    },
    /// The target sent an Asynchronous Message (RFC 7143 11.9).
    Async(AsyncMessage),
    /// The connection ended; nothing more will be sent or completed.
    Closed(ConnError),
}

/// A SCSI command's transfer state.
#[derive(Debug)]
struct Scsi {
    lun: Lun,
    write: Bytes,
    data_in_len: u32,
    data_in: Vec<u8>,
    next_data_sn: DataSn,
    /// End of the unsolicited data (immediate plus unsolicited Data-Out).
    unsolicited_end: usize,
}

#[derive(Debug)]
enum Kind {
    Scsi(Box<Scsi>),
    /// No deadline when the timeout reaches past what `Instant` can hold.
    Ping {
        deadline: Option<Instant>,
    },
    Text,
    TaskMgmt {
        rtt: Option<u32>,
    },
    Logout,
}

#[derive(Debug)]
struct Task {
    kind: Kind,
    /// The CmdSN it was sent with; None while it waits for the window.
    cmd_sn: Option<CmdSn>,
}

/// The initiator's connection state machine; see the module documentation.
#[derive(Debug)]
pub struct Initiator {
    params: Params,
    framing: Framing,
    ping_timeout: Duration,
    cmd_sn: CmdSn,
    exp_cmd_sn: CmdSn,
    max_cmd_sn: CmdSn,
    exp_stat_sn: StatSn,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    /// Non-immediate requests waiting for the window, in submission order; the PDU's
    /// CmdSN is filled in when it leaves.
    queued: VecDeque<(u32, Pdu)>,
    out: VecDeque<Pdu>,
    events: VecDeque<Event>,
    /// A logout is under way: no new requests.
    logging_out: bool,
    closed: Option<ConnError>,
}

impl Initiator {
    /// The machine for a connection whose login ended with `login`. `framing` is how we
    /// frame our PDUs and cut the target's (digests, our MaxRecvDataSegmentLength);
    /// `ping_timeout` bounds how long our pings wait for their echo.
    #[must_use]
    pub fn new(login: &LoginOutcome, framing: Framing, ping_timeout: Duration) -> Self {
        Initiator {
            params: login.params.clone(),
            framing,
            ping_timeout,
            cmd_sn: login.cmd_sn,
            exp_cmd_sn: login.exp_cmd_sn,
            max_cmd_sn: login.max_cmd_sn,
            exp_stat_sn: login.exp_stat_sn,
            next_itt: 1,
            tasks: HashMap::new(),
            queued: VecDeque::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            logging_out: false,
            closed: None,
        }
    }

    /// The negotiated parameters.
    #[must_use]
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Our framing.
    #[must_use]
    pub fn framing(&self) -> &Framing {
        &self.framing
    }

    /// The CmdSN the next non-immediate request will take.
    #[must_use]
    pub fn cmd_sn(&self) -> CmdSn {
        self.cmd_sn
    }

    /// The largest ExpCmdSN the target reported.
    #[must_use]
    pub fn exp_cmd_sn(&self) -> CmdSn {
        self.exp_cmd_sn
    }

    /// The largest MaxCmdSN the target reported.
    #[must_use]
    pub fn max_cmd_sn(&self) -> CmdSn {
        self.max_cmd_sn
    }

    /// The StatSN we expect next.
    #[must_use]
    pub fn exp_stat_sn(&self) -> StatSn {
        self.exp_stat_sn
    }

    /// Requests waiting for the CmdSN window.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Requests sent or queued and not yet answered.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.tasks.len()
    }

    /// Why the connection ended, once it has.
    #[must_use]
    pub fn closed(&self) -> Option<&ConnError> {
        self.closed.as_ref()
    }

    /// Whether the connection has ended.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    // ---- requests ----

    /// Submits a SCSI command. It is sent at once when the window allows (or it is
    /// immediate), else it waits; its completion comes as [`Event::Done`] with its ITT.
    pub fn submit_scsi(&mut self, req: ScsiRequest) -> Result<Itt, SubmitError> {
        self.check_open()?;
        if !req.data_out.is_empty() && req.data_in_len > 0 {
            return Err(SubmitError::Invalid(
                "bidirectional commands are not supported".into(),
            ));
        }
        if req.cdb.is_empty() || req.cdb.len() > CDB_LEN_MAX {
            return Err(SubmitError::Invalid(format!(
                "CDB of {} bytes",
                req.cdb.len()
            )));
        }
        let write = !req.data_out.is_empty();
        let edtl = if write {
            u32::try_from(req.data_out.len())
                .map_err(|_| SubmitError::Invalid("write longer than 4 GiB".into()))?
        } else {
            req.data_in_len
        };
        let p = &self.params;
        let len = req.data_out.len();
        let seg = self.send_segment();
        // RFC 7143 13.13/13.14: immediate data, then unsolicited Data-Out, together at
        // most FirstBurstLength; the rest only as the target asks with R2Ts.
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
        let itt = self.alloc_itt();
        let pdu = Pdu::ScsiCommand(ScsiCommand {
            immediate: req.immediate,
            final_: unsolicited_end == imm,
            read: req.data_in_len > 0,
            write,
            attr: req.attr,
            lun: req.lun,
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: req.cdb,
            bidi_read_length: None,
            data: req.data_out.slice(..imm),
        });
        let scsi = Scsi {
            lun: req.lun,
            write: req.data_out,
            data_in_len: req.data_in_len,
            data_in: Vec::new(),
            next_data_sn: DataSn(0),
            unsolicited_end,
        };
        self.start(itt, Kind::Scsi(Box::new(scsi)), req.immediate, pdu);
        Ok(itt)
    }

    /// Sends a ping (an immediate NOP-Out asking for an echo of `data`). Unanswered by
    /// `now` plus the ping timeout, it closes the connection ([`ConnError::PingTimeout`]).
    pub fn ping(&mut self, data: Bytes, now: Instant) -> Result<Itt, SubmitError> {
        self.check_open()?;
        let itt = self.alloc_itt();
        let pdu = Pdu::NopOut(NopOut {
            immediate: true,
            lun: Lun(0),
            itt,
            ttt: Ttt(RESERVED_TAG),
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data,
        });
        let deadline = now.checked_add(self.ping_timeout);
        self.start(itt, Kind::Ping { deadline }, true, pdu);
        Ok(itt)
    }

    /// Sends one Text Request (RFC 7143 11.10) of at most the target's
    /// MaxRecvDataSegmentLength (longer text goes in parts with `continue_` set). A
    /// continuation keeps the ITT of the negotiation (`itt`) and quotes the target's TTT.
    pub fn submit_text(
        &mut self,
        itt: Option<Itt>,
        ttt: Ttt,
        data: Bytes,
        continue_: bool,
    ) -> Result<Itt, SubmitError> {
        self.check_open()?;
        if data.len() > self.send_segment() {
            return Err(SubmitError::Invalid(format!(
                "{} bytes of text above the target's MaxRecvDataSegmentLength: split them",
                data.len()
            )));
        }
        let itt = match itt {
            Some(i) if i.0 == RESERVED_TAG || self.tasks.contains_key(&i.0) => {
                return Err(SubmitError::TagInUse(i.0))
            }
            Some(i) => i,
            None => self.alloc_itt(),
        };
        let pdu = Pdu::TextRequest(TextRequest {
            immediate: false,
            final_: !continue_,
            continue_,
            lun: Lun(0),
            itt,
            ttt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data,
        });
        self.start(itt, Kind::Text, false, pdu);
        Ok(itt)
    }

    /// ABORT TASK for the SCSI command `rtt` (RFC 7143 11.5.1). A command still waiting
    /// for the window never reached the target: it ends here with [`TaskError::Aborted`]
    /// and `Ok(None)` is returned. Otherwise the request's ITT: when the target answers
    /// "function complete" (or "task does not exist"), the command ends as aborted too,
    /// since the target sends no response for it.
    pub fn abort_task(&mut self, rtt: Itt) -> Result<Option<Itt>, SubmitError> {
        self.check_open()?;
        let (lun, ref_cmd_sn) = match self.tasks.get(&rtt.0) {
            Some(Task {
                kind: Kind::Scsi(s),
                cmd_sn,
            }) => (s.lun, *cmd_sn),
            _ => return Err(SubmitError::UnknownTask(rtt.0)),
        };
        let Some(ref_cmd_sn) = ref_cmd_sn else {
            self.queued.retain(|(i, _)| *i != rtt.0);
            self.tasks.remove(&rtt.0);
            self.done(rtt, Err(TaskError::Aborted));
            return Ok(None);
        };
        let itt = self.alloc_itt();
        let pdu = Pdu::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::AbortTask,
            lun,
            itt,
            rtt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: DataSn(0),
        });
        self.start(itt, Kind::TaskMgmt { rtt: Some(rtt.0) }, true, pdu);
        Ok(Some(itt))
    }

    /// Logs out with `reason` (0: close the session). No request is taken after this.
    pub fn logout(&mut self, reason: u8) -> Result<Itt, SubmitError> {
        self.check_open()?;
        let itt = self.alloc_itt();
        let pdu = Pdu::LogoutRequest(LogoutRequest {
            immediate: true,
            reason,
            itt,
            cid: 1,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.start(itt, Kind::Logout, true, pdu);
        self.logging_out = true;
        Ok(itt)
    }

    /// Forgets a request the caller no longer waits for (timed out, cancelled): one still
    /// waiting for the window is never sent, and a late answer is dropped.
    pub fn forget(&mut self, itt: Itt) {
        if self.tasks.remove(&itt.0).is_some() {
            self.queued.retain(|(i, _)| *i != itt.0);
        }
    }

    /// Ends the connection for a reason the shell saw (EOF, socket error). Every waiting
    /// request fails with [`TaskError::ConnectionClosed`].
    pub fn close(&mut self, why: ConnError) {
        if self.closed.is_some() {
            return;
        }
        self.queued.clear();
        self.out.clear();
        let mut itts: Vec<u32> = self.tasks.keys().copied().collect();
        itts.sort_unstable();
        for itt in itts {
            if let Some(t) = self.tasks.remove(&itt) {
                let err = match (&why, &t.kind) {
                    (ConnError::PingTimeout, Kind::Ping { .. }) => TaskError::Timeout,
                    _ => TaskError::ConnectionClosed,
                };
                self.events.push_back(Event::Done {
                    itt: Itt(itt),
                    result: Err(err),
                });
            }
        }
        self.events.push_back(Event::Closed(why.clone()));
        self.closed = Some(why);
    }

    // ---- input ----

    /// Handles one frame from the target. A frame that does not decode ends the
    /// connection, as does a protocol error that leaves it without sensible recovery;
    /// the error is returned and also reported as [`Event::Closed`].
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) -> Result<(), ConnError> {
        match frame.decode() {
            Ok(p) => self.handle_pdu(p, now),
            Err(e) => {
                let e = ConnError::Decode(e);
                self.close(e.clone());
                Err(e)
            }
        }
    }

    /// Handles one decoded PDU from the target (see [`Self::handle_frame`]).
    pub fn handle_pdu(&mut self, pdu: Pdu, now: Instant) -> Result<(), ConnError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        // Nothing in the answer path depends on time today; `now` keeps the signature in
        // step with the target's machine so shells and the Pair drive both alike.
        let _ = now;
        match self.route(pdu) {
            Ok(()) => {
                self.release();
                Ok(())
            }
            Err(e) => {
                self.close(e.clone());
                Err(e)
            }
        }
    }

    /// Fires what is due at `now`: a ping past its deadline closes the connection.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.close(ConnError::PingTimeout);
        }
    }

    // ---- output ----

    /// Encodes every PDU ready to go into `buf`, in order; false when there was none.
    pub fn poll_transmit(&mut self, buf: &mut BytesMut) -> bool {
        let any = !self.out.is_empty();
        while let Some(mut p) = self.out.pop_front() {
            // Stamped on the way out so it acknowledges everything seen until now.
            set_exp_stat_sn(&mut p, self.exp_stat_sn);
            p.encode(buf, &self.framing);
        }
        any
    }

    /// The earliest instant [`Self::handle_timeout`] has something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        self.tasks
            .values()
            .filter_map(|t| match t.kind {
                Kind::Ping { deadline } => deadline,
                _ => None,
            })
            .min()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- inside ----

    fn check_open(&self) -> Result<(), SubmitError> {
        if self.closed.is_some() || self.logging_out {
            return Err(SubmitError::Closed);
        }
        Ok(())
    }

    fn send_segment(&self) -> usize {
        self.params
            .peer_max_recv_data_segment_length
            .max(SEGMENT_MIN) as usize
    }

    fn alloc_itt(&mut self) -> Itt {
        loop {
            let i = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if i != RESERVED_TAG && !self.tasks.contains_key(&i) {
                return Itt(i);
            }
        }
    }

    fn start(&mut self, itt: Itt, kind: Kind, immediate: bool, pdu: Pdu) {
        self.tasks.insert(itt.0, Task { kind, cmd_sn: None });
        if immediate {
            let sn = self.cmd_sn;
            self.send(itt.0, sn, pdu);
        } else {
            self.queued.push_back((itt.0, pdu));
            self.release();
        }
    }

    /// Sends what waits for the window while the window is open (RFC 7143 3.2.2.1: a
    /// non-immediate request may carry CmdSN up to MaxCmdSN).
    fn release(&mut self) {
        while self.closed.is_none() && self.cmd_sn.le(self.max_cmd_sn) {
            let Some((itt, pdu)) = self.queued.pop_front() else {
                return;
            };
            let sn = self.cmd_sn;
            self.cmd_sn = sn.next();
            self.send(itt, sn, pdu);
        }
    }

    fn send(&mut self, itt: u32, sn: CmdSn, mut pdu: Pdu) {
        match &mut pdu {
            Pdu::ScsiCommand(c) => c.cmd_sn = sn,
            Pdu::NopOut(n) => n.cmd_sn = sn,
            Pdu::TextRequest(t) => t.cmd_sn = sn,
            Pdu::TaskMgmtRequest(t) => t.cmd_sn = sn,
            Pdu::LogoutRequest(l) => l.cmd_sn = sn,
            _ => {}
        }
        let imm = match &pdu {
            Pdu::ScsiCommand(c) => c.data.len(),
            _ => 0,
        };
        self.out.push_back(pdu);
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        task.cmd_sn = Some(sn);
        if let Kind::Scsi(s) = &task.kind {
            if s.unsolicited_end > imm {
                let (lun, data, end) = (s.lun, s.write.clone(), s.unsolicited_end);
                self.data_out(lun, Itt(itt), Ttt(RESERVED_TAG), &data, imm, end);
            }
        }
    }

    /// One Data-Out sequence for `data[from..to]`, cut at the target's segment size; its
    /// DataSN starts at 0 (RFC 7143 11.7.4: per R2T, and for the unsolicited sequence).
    fn data_out(&mut self, lun: Lun, itt: Itt, ttt: Ttt, data: &Bytes, from: usize, to: usize) {
        let seg = self.send_segment();
        let mut off = from;
        let mut sn = DataSn(0);
        while off < to {
            let end = off.saturating_add(seg).min(to);
            self.out.push_back(Pdu::DataOut(DataOut {
                final_: end == to,
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn: sn,
                // `to` is at most a u32 length (checked at submission).
                buffer_offset: u32::try_from(off).unwrap_or(u32::MAX),
                data: data.slice(off..end),
            }));
            sn = sn.next();
            off = end;
        }
    }

    fn done(&mut self, itt: Itt, result: Result<Outcome, TaskError>) {
        self.events.push_back(Event::Done { itt, result });
    }

    /// RFC 7143 4.2.2.1: a pair with MaxCmdSN < ExpCmdSN - 1 is ignored, and neither
    /// number moves backwards (answers may overtake each other).
    fn window(&mut self, exp: CmdSn, max: CmdSn) {
        if max.lt(CmdSn(exp.0.wrapping_sub(1))) {
            return;
        }
        if exp.gt(self.exp_cmd_sn) {
            self.exp_cmd_sn = exp;
        }
        if max.gt(self.max_cmd_sn) {
            self.max_cmd_sn = max;
        }
    }

    fn stat(&mut self, sn: StatSn) {
        if sn.ge(self.exp_stat_sn) {
            self.exp_stat_sn = sn.next();
        }
    }

    fn route(&mut self, pdu: Pdu) -> Result<(), ConnError> {
        if let Some((exp, max, stat_sn)) = sequence_numbers(&pdu) {
            self.window(exp, max);
            if let Some(sn) = stat_sn {
                self.stat(sn);
            }
        }
        match pdu {
            Pdu::DataIn(d) => {
                self.data_in(d);
                Ok(())
            }
            Pdu::ScsiResponse(r) => {
                let itt = r.itt;
                match self.tasks.remove(&itt.0) {
                    Some(Task {
                        kind: Kind::Scsi(_),
                        ..
                    }) if r.response != 0 => self.done(
                        itt,
                        Err(TaskError::TargetFailure {
                            response: r.response,
                        }),
                    ),
                    Some(Task {
                        kind: Kind::Scsi(s),
                        ..
                    }) => self.done(
                        itt,
                        Ok(Outcome::Scsi(ScsiOutcome {
                            status: r.status,
                            sense: r.sense,
                            data_in: Bytes::from(s.data_in),
                            residual: r.residual,
                        })),
                    ),
                    Some(t) => {
                        self.tasks.insert(itt.0, t);
                        return Err(ConnError::Protocol(
                            "SCSI Response to a request that is not a SCSI command".into(),
                        ));
                    }
                    None => {}
                }
                Ok(())
            }
            Pdu::R2t(r) => {
                self.r2t(r);
                Ok(())
            }
            Pdu::NopIn(n) => {
                if n.ttt.0 != RESERVED_TAG {
                    // RFC 7143 11.19: the target pings us; answer with its TTT and data
                    // or it drops the connection.
                    self.out.push_back(Pdu::NopOut(NopOut {
                        immediate: true,
                        lun: n.lun,
                        itt: Itt(RESERVED_TAG),
                        ttt: n.ttt,
                        cmd_sn: self.cmd_sn,
                        exp_stat_sn: self.exp_stat_sn,
                        data: n.data,
                    }));
                    return Ok(());
                }
                if n.itt.0 == RESERVED_TAG {
                    return Ok(());
                }
                self.reply(
                    n.itt,
                    |k| matches!(k, Kind::Ping { .. }),
                    Outcome::Nop(n.data),
                )
            }
            Pdu::TextResponse(r) => {
                self.reply(r.itt, |k| matches!(k, Kind::Text), Outcome::Text(r))
            }
            Pdu::LogoutResponse(r) => {
                let itt = r.itt;
                let ok = r.response == 0;
                self.reply(itt, |k| matches!(k, Kind::Logout), Outcome::Logout(r))?;
                if ok {
                    self.close(ConnError::LoggedOut);
                } else {
                    self.logging_out = false;
                }
                Ok(())
            }
            Pdu::TaskMgmtResponse(r) => {
                let rtt = match self.tasks.get(&r.itt.0) {
                    Some(Task {
                        kind: Kind::TaskMgmt { rtt },
                        ..
                    }) => *rtt,
                    _ => None,
                };
                // 0: function complete; 1: task does not exist. Either way no response
                // for the task will come.
                let ended = matches!(r.response, 0 | 1);
                self.reply(
                    r.itt,
                    |k| matches!(k, Kind::TaskMgmt { .. }),
                    Outcome::TaskMgmt(r),
                )?;
                if let (Some(rtt), true) = (rtt, ended) {
                    if self.tasks.remove(&rtt).is_some() {
                        self.done(Itt(rtt), Err(TaskError::Aborted));
                    }
                }
                Ok(())
            }
            Pdu::Reject(r) => {
                // The rejected PDU's header names the request it belonged to.
                let Some(b) = r.header.get(16..20) else {
                    return Err(ConnError::Protocol(
                        "Reject without the rejected header".into(),
                    ));
                };
                let itt = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                if self.tasks.remove(&itt).is_some() {
                    self.queued.retain(|(i, _)| *i != itt);
                    self.done(Itt(itt), Err(TaskError::Rejected { reason: r.reason }));
                }
                Ok(())
            }
            Pdu::AsyncMessage(a) => {
                self.events.push_back(Event::Async(a));
                Ok(())
            }
            other => Err(ConnError::Protocol(format!(
                "the target sent opcode {:#04x}",
                other.opcode()
            ))),
        }
    }

    /// Completes the request `itt` with `outcome` when `kind` says it is of the right
    /// sort; a known ITT answered by the wrong kind of PDU breaks the connection.
    fn reply(
        &mut self,
        itt: Itt,
        kind: impl Fn(&Kind) -> bool,
        outcome: Outcome,
    ) -> Result<(), ConnError> {
        match self.tasks.get(&itt.0) {
            None => Ok(()),
            Some(t) if !kind(&t.kind) => Err(ConnError::Protocol(format!(
                "an answer of the wrong kind for initiator task tag {:#x}",
                itt.0
            ))),
            Some(_) => {
                self.tasks.remove(&itt.0);
                self.done(itt, Ok(outcome));
                Ok(())
            }
        }
    }

    fn data_in(&mut self, d: DataIn) {
        let Some(Task {
            kind: Kind::Scsi(s),
            ..
        }) = self.tasks.get_mut(&d.itt.0)
        else {
            return;
        };
        let end = u64::from(d.buffer_offset) + d.data.len() as u64;
        // DataPDUInOrder and DataSequenceInOrder are Yes (the only values we offer):
        // data arrives in order, so each PDU must continue exactly where the last ended.
        let bad = if d.data_sn != s.next_data_sn {
            Some("Data-In DataSN out of order")
        } else if d.buffer_offset as usize != s.data_in.len() {
            Some("Data-In buffer offset out of order")
        } else if end > u64::from(s.data_in_len) {
            Some("Data-In beyond the expected length")
        } else {
            None
        };
        if let Some(why) = bad {
            self.tasks.remove(&d.itt.0);
            self.done(d.itt, Err(TaskError::Protocol(why.into())));
            return;
        }
        s.data_in.extend_from_slice(&d.data);
        s.next_data_sn = s.next_data_sn.next();
        let Some(status) = d.status else {
            return;
        };
        // RFC 7143 11.7.4: the S bit carries the status; no SCSI Response follows.
        if let Some(Task {
            kind: Kind::Scsi(s),
            ..
        }) = self.tasks.remove(&d.itt.0)
        {
            self.done(
                d.itt,
                Ok(Outcome::Scsi(ScsiOutcome {
                    status,
                    sense: Bytes::new(),
                    data_in: Bytes::from(s.data_in),
                    residual: d.residual,
                })),
            );
        }
    }

    fn r2t(&mut self, r: R2t) {
        let max_burst = self.params.max_burst_length;
        let (lun, data, unsolicited_end) = match self.tasks.get(&r.itt.0) {
            Some(Task {
                kind: Kind::Scsi(s),
                ..
            }) if !s.write.is_empty() => (s.lun, s.write.clone(), s.unsolicited_end),
            Some(Task {
                kind: Kind::Scsi(_),
                ..
            }) => {
                self.tasks.remove(&r.itt.0);
                self.done(
                    r.itt,
                    Err(TaskError::Protocol(
                        "R2T for a command that writes nothing".into(),
                    )),
                );
                return;
            }
            _ => return,
        };
        let off = r.buffer_offset as usize;
        let end = off.saturating_add(r.desired_len as usize);
        // RFC 7143 11.8: DesiredDataTransferLength is positive and at most
        // MaxBurstLength, and the R2T asks for data the command has (and did not send
        // unsolicited).
        if r.desired_len == 0
            || end > data.len()
            || r.desired_len > max_burst
            || off < unsolicited_end
        {
            self.tasks.remove(&r.itt.0);
            self.done(
                r.itt,
                Err(TaskError::Protocol(format!(
                    "R2T for {} bytes at {off} outside a {}-byte write",
                    r.desired_len,
                    data.len()
                ))),
            );
            return;
        }
        self.data_out(lun, r.itt, r.ttt, &data, off, end);
    }
}

fn set_exp_stat_sn(p: &mut Pdu, sn: StatSn) {
    match p {
        Pdu::ScsiCommand(c) => c.exp_stat_sn = sn,
        Pdu::NopOut(n) => n.exp_stat_sn = sn,
        Pdu::TextRequest(t) => t.exp_stat_sn = sn,
        Pdu::TaskMgmtRequest(t) => t.exp_stat_sn = sn,
        Pdu::LogoutRequest(l) => l.exp_stat_sn = sn,
        Pdu::DataOut(d) => d.exp_stat_sn = sn,
        _ => {}
    }
}

/// ExpCmdSN, MaxCmdSN and, when the PDU advances it, StatSN. Data-In carries StatSN
/// only with status, and a NOP-In with the reserved ITT does not advance it.
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

#[cfg(test)]
mod tests {
    //! The machine against a scripted target: hand-built target PDUs in, the PDUs it
    //! sends decoded and checked. The end-to-end rules against the real target machine
    //! live in the target daemon's connection Pair.

    use super::*;
    use crate::frame::FrameDecoder;
    use crate::pdu::{NopIn, Reject, ScsiResponse};
    use proptest::prelude::*;

    const T0: u32 = 100;

    fn params() -> Params {
        Params {
            immediate_data: true,
            initial_r2t: false,
            first_burst_length: 2048,
            max_burst_length: 4096,
            peer_max_recv_data_segment_length: 1024,
            ..Params::default()
        }
    }

    /// A machine with `window` free CmdSNs.
    fn machine(window: u32) -> Initiator {
        let login = LoginOutcome {
            params: params(),
            tsih: 1,
            cmd_sn: CmdSn(T0),
            exp_cmd_sn: CmdSn(T0),
            max_cmd_sn: CmdSn(T0.wrapping_add(window).wrapping_sub(1)),
            exp_stat_sn: StatSn(7),
        };
        Initiator::new(&login, Framing::default(), Duration::from_secs(10))
    }

    /// What the machine sends, decoded.
    fn sent(m: &mut Initiator) -> Vec<Pdu> {
        let mut b = BytesMut::new();
        m.poll_transmit(&mut b);
        let mut dec = FrameDecoder::new(Framing {
            max_recv_data_segment: 1 << 20,
            ..Framing::default()
        });
        dec.feed(&b);
        let mut out = Vec::new();
        while let Ok(Some(f)) = dec.next_frame() {
            out.push(f.decode().expect("the machine sends PDUs that decode"));
        }
        assert_eq!(dec.buffered(), 0, "whole frames only");
        out
    }

    fn events(m: &mut Initiator) -> Vec<Event> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn tur(immediate: bool) -> ScsiRequest {
        ScsiRequest {
            lun: Lun::from_number(0),
            cdb: Bytes::from_static(&[0; 6]),
            data_out: Bytes::new(),
            data_in_len: 0,
            immediate,
            attr: 1,
        }
    }

    fn write(len: usize) -> ScsiRequest {
        ScsiRequest {
            cdb: Bytes::from_static(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
            data_out: (0..len).map(|i| (i % 251) as u8).collect(),
            ..tur(false)
        }
    }

    fn response(itt: Itt, stat_sn: u32, max: u32) -> Pdu {
        Pdu::ScsiResponse(ScsiResponse {
            bidi_residual: Residual::default(),
            residual: Residual::default(),
            response: 0,
            status: 0,
            itt,
            snack_tag: 0,
            stat_sn: StatSn(stat_sn),
            exp_cmd_sn: CmdSn(T0 + 1),
            max_cmd_sn: CmdSn(max),
            exp_data_sn: DataSn(0),
            sense: Bytes::new(),
        })
    }

    fn data_in(itt: Itt, sn: u32, off: u32, len: usize, status: Option<u8>) -> Pdu {
        Pdu::DataIn(DataIn {
            final_: status.is_some(),
            ack: false,
            residual: Residual::default(),
            status,
            lun: Lun(0),
            itt,
            ttt: Ttt(RESERVED_TAG),
            stat_sn: StatSn(7),
            exp_cmd_sn: CmdSn(T0 + 1),
            max_cmd_sn: CmdSn(T0 + 8),
            data_sn: DataSn(sn),
            buffer_offset: off,
            data: Bytes::from(vec![sn as u8; len]),
        })
    }

    fn r2t(itt: Itt, ttt: u32, off: u32, len: u32) -> Pdu {
        Pdu::R2t(R2t {
            lun: Lun(0),
            itt,
            ttt: Ttt(ttt),
            stat_sn: StatSn(7),
            exp_cmd_sn: CmdSn(T0 + 1),
            max_cmd_sn: CmdSn(T0 + 8),
            r2t_sn: crate::serial::R2tSn(0),
            buffer_offset: off,
            desired_len: len,
        })
    }

    fn done(e: &Event) -> (Itt, &Result<Outcome, TaskError>) {
        match e {
            Event::Done { itt, result } => (*itt, result),
            other => panic!("expected a completion, got {other:?}"),
        }
    }

    #[test]
    fn commands_beyond_max_cmd_sn_wait_and_immediate_ones_do_not() {
        let now = Instant::now();
        let mut m = machine(1);
        let a = m.submit_scsi(tur(false)).expect("submit");
        let b = m.submit_scsi(tur(false)).expect("submit");
        let out = sent(&mut m);
        assert_eq!(out.len(), 1, "one CmdSN free: one command goes");
        let Pdu::ScsiCommand(c) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!((c.itt, c.cmd_sn, c.exp_stat_sn), (a, CmdSn(T0), StatSn(7)));
        assert_eq!(m.queued(), 1);
        // Immediate: goes at once with the next CmdSN, which it does not take.
        let i = m.submit_scsi(tur(true)).expect("submit");
        let Pdu::ScsiCommand(c) = &sent(&mut m)[0] else {
            panic!()
        };
        assert!(c.immediate);
        assert_eq!((c.itt, c.cmd_sn), (i, CmdSn(T0 + 1)));
        // A stale (smaller) MaxCmdSN opens nothing; the completion that opens one does.
        m.handle_pdu(response(a, 7, T0), now).expect("response");
        assert!(sent(&mut m).is_empty());
        m.handle_pdu(response(i, 8, T0 + 1), now).expect("response");
        let Pdu::ScsiCommand(c) = &sent(&mut m)[0] else {
            panic!()
        };
        assert_eq!(
            (c.itt, c.cmd_sn, c.exp_stat_sn),
            (b, CmdSn(T0 + 1), StatSn(9))
        );
        assert_eq!(m.cmd_sn(), CmdSn(T0 + 2));
        let ev = events(&mut m);
        assert_eq!(ev.len(), 2);
        assert_eq!(done(&ev[0]).0, a);
        assert!(matches!(done(&ev[1]).1, Ok(Outcome::Scsi(s)) if s.status == 0));
    }

    #[test]
    fn window_pair_with_max_below_exp_minus_one_is_ignored() {
        let mut m = machine(1);
        let mut p = response(Itt(99), 7, T0 - 5);
        if let Pdu::ScsiResponse(r) = &mut p {
            r.exp_cmd_sn = CmdSn(T0 + 50);
        }
        m.handle_pdu(p, Instant::now())
            .expect("unknown ITT is dropped");
        assert_eq!((m.exp_cmd_sn(), m.max_cmd_sn()), (CmdSn(T0), CmdSn(T0)));
    }

    #[test]
    fn write_sends_immediate_then_unsolicited_then_answers_r2t() {
        let now = Instant::now();
        let mut m = machine(8);
        let itt = m.submit_scsi(write(6000)).expect("submit");
        let out = sent(&mut m);
        assert_eq!(out.len(), 2);
        let Pdu::ScsiCommand(c) = &out[0] else {
            panic!()
        };
        // Immediate data: one segment; the command is not final as Data-Out follows.
        assert_eq!((c.data.len(), c.final_, c.edtl), (1024, false, 6000));
        let Pdu::DataOut(d) = &out[1] else { panic!() };
        assert_eq!(
            (d.ttt.0, d.data_sn, d.buffer_offset, d.data.len(), d.final_),
            (RESERVED_TAG, DataSn(0), 1024, 1024, true)
        );
        // The R2T for the rest: cut at the target's 1024-byte segments, DataSN from 0.
        m.handle_pdu(r2t(itt, 55, 2048, 3000), now).expect("r2t");
        let out = sent(&mut m);
        let shape: Vec<(u32, u32, u32, usize, bool)> = out
            .iter()
            .map(|p| match p {
                Pdu::DataOut(d) => (
                    d.ttt.0,
                    d.data_sn.0,
                    d.buffer_offset,
                    d.data.len(),
                    d.final_,
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (55, 0, 2048, 1024, false),
                (55, 1, 3072, 1024, false),
                (55, 2, 4096, 952, true)
            ]
        );
        if let Pdu::DataOut(d) = &out[2] {
            assert_eq!(d.data[0], (4096 % 251) as u8);
        }
        // Beyond MaxBurstLength: the command fails, the connection lives.
        let itt2 = m.submit_scsi(write(9000)).expect("submit");
        sent(&mut m);
        m.handle_pdu(r2t(itt2, 56, 2048, 4097), now).expect("r2t");
        assert!(sent(&mut m).is_empty());
        let ev = events(&mut m);
        assert!(matches!(done(&ev[0]), (i, Err(TaskError::Protocol(_))) if i == itt2));
        assert!(!m.is_closed());
    }

    #[test]
    fn initial_r2t_without_immediate_data_sends_nothing_unsolicited() {
        let login = LoginOutcome {
            params: Params {
                immediate_data: false,
                initial_r2t: true,
                ..params()
            },
            tsih: 1,
            cmd_sn: CmdSn(T0),
            exp_cmd_sn: CmdSn(T0),
            max_cmd_sn: CmdSn(T0 + 8),
            exp_stat_sn: StatSn(7),
        };
        let mut m = Initiator::new(&login, Framing::default(), Duration::from_secs(1));
        m.submit_scsi(write(3000)).expect("submit");
        let out = sent(&mut m);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Pdu::ScsiCommand(c) if c.final_ && c.data.is_empty()));
    }

    #[test]
    fn data_in_is_reassembled_and_the_s_bit_completes() {
        let now = Instant::now();
        let mut m = machine(8);
        let itt = m
            .submit_scsi(ScsiRequest {
                data_in_len: 3000,
                ..tur(false)
            })
            .expect("submit");
        sent(&mut m);
        m.handle_pdu(data_in(itt, 0, 0, 1024, None), now)
            .expect("in");
        m.handle_pdu(data_in(itt, 1, 1024, 976, Some(0)), now)
            .expect("in");
        let ev = events(&mut m);
        let Ok(Outcome::Scsi(s)) = done(&ev[0]).1 else {
            panic!("{ev:?}")
        };
        assert_eq!(s.data_in.len(), 2000);
        assert_eq!((s.data_in[0], s.data_in[1500]), (0, 1));
        assert_eq!(
            m.exp_stat_sn(),
            StatSn(8),
            "status in Data-In advances StatSN"
        );
        // A DataSN gap fails the command.
        let itt = m
            .submit_scsi(ScsiRequest {
                data_in_len: 3000,
                ..tur(false)
            })
            .expect("submit");
        m.handle_pdu(data_in(itt, 1, 0, 10, None), now).expect("in");
        let ev = events(&mut m);
        assert!(matches!(done(&ev[0]).1, Err(TaskError::Protocol(w)) if w.contains("DataSN")));
        // More than the command asked for fails it too.
        let itt = m
            .submit_scsi(ScsiRequest {
                data_in_len: 10,
                ..tur(false)
            })
            .expect("submit");
        m.handle_pdu(data_in(itt, 0, 0, 11, None), now).expect("in");
        let ev = events(&mut m);
        assert!(matches!(done(&ev[0]).1, Err(TaskError::Protocol(_))));
    }

    #[test]
    fn response_carries_sense_residual_and_failures() {
        let now = Instant::now();
        let mut m = machine(8);
        let itt = m.submit_scsi(tur(false)).expect("submit");
        let mut p = response(itt, 7, T0 + 8);
        if let Pdu::ScsiResponse(r) = &mut p {
            r.status = 2;
            r.sense = Bytes::from_static(&[0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0]);
            r.residual = Residual::of(512, 0);
        }
        m.handle_pdu(p, now).expect("response");
        let itt2 = m.submit_scsi(tur(false)).expect("submit");
        let mut p = response(itt2, 8, T0 + 8);
        if let Pdu::ScsiResponse(r) = &mut p {
            r.response = 1;
        }
        m.handle_pdu(p, now).expect("response");
        let ev = events(&mut m);
        let Ok(Outcome::Scsi(s)) = done(&ev[0]).1 else {
            panic!("{ev:?}")
        };
        assert_eq!((s.status, s.sense.len(), s.residual.count), (2, 14, 512));
        assert!(s.residual.underflow);
        assert_eq!(
            done(&ev[1]).1,
            &Err(TaskError::TargetFailure { response: 1 })
        );
    }

    #[test]
    fn target_ping_is_echoed_and_our_ping_times_out() {
        let t = Instant::now();
        let mut m = machine(8);
        m.handle_pdu(
            Pdu::NopIn(NopIn {
                lun: Lun(0),
                itt: Itt(RESERVED_TAG),
                ttt: Ttt(42),
                stat_sn: StatSn(7),
                exp_cmd_sn: CmdSn(T0),
                max_cmd_sn: CmdSn(T0 + 8),
                data: Bytes::from_static(b"hi"),
            }),
            t,
        )
        .expect("nop");
        assert_eq!(
            m.exp_stat_sn(),
            StatSn(7),
            "a target ping does not advance StatSN"
        );
        let out = sent(&mut m);
        assert!(matches!(&out[0], Pdu::NopOut(n)
            if n.itt.0 == RESERVED_TAG && n.ttt == Ttt(42) && n.immediate && n.data[..] == b"hi"[..]));
        let cmd = m.submit_scsi(tur(false)).expect("submit");
        let ping = m.ping(Bytes::from_static(b"p"), t).expect("ping");
        assert_eq!(m.poll_timeout(), Some(t + Duration::from_secs(10)));
        m.handle_timeout(t + Duration::from_secs(9));
        assert!(!m.is_closed());
        m.handle_timeout(t + Duration::from_secs(10));
        assert_eq!(m.closed(), Some(&ConnError::PingTimeout));
        let ev = events(&mut m);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[0],
            Event::Done {
                itt: cmd,
                result: Err(TaskError::ConnectionClosed)
            }
        );
        assert_eq!(
            ev[1],
            Event::Done {
                itt: ping,
                result: Err(TaskError::Timeout)
            }
        );
        assert_eq!(ev[2], Event::Closed(ConnError::PingTimeout));
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.submit_scsi(tur(false)), Err(SubmitError::Closed));
    }

    #[test]
    fn reject_fails_the_named_request() {
        let mut m = machine(8);
        let itt = m.submit_scsi(tur(false)).expect("submit");
        let mut header = vec![0u8; 48];
        header[16..20].copy_from_slice(&itt.0.to_be_bytes());
        m.handle_pdu(
            Pdu::Reject(Reject {
                reason: 9,
                stat_sn: StatSn(7),
                exp_cmd_sn: CmdSn(T0),
                max_cmd_sn: CmdSn(T0 + 8),
                data_sn: DataSn(0),
                header: Bytes::from(header),
            }),
            Instant::now(),
        )
        .expect("reject");
        let ev = events(&mut m);
        assert_eq!(done(&ev[0]), (itt, &Err(TaskError::Rejected { reason: 9 })));
    }

    #[test]
    fn abort_task_quotes_ref_cmd_sn_and_ends_the_task() {
        let now = Instant::now();
        let mut m = machine(1);
        let a = m.submit_scsi(tur(false)).expect("submit");
        let queued = m.submit_scsi(tur(false)).expect("submit");
        sent(&mut m);
        // Never sent: ends here, nothing on the wire.
        assert_eq!(m.abort_task(queued), Ok(None));
        assert!(sent(&mut m).is_empty());
        let tmf = m.abort_task(a).expect("abort").expect("sent");
        let out = sent(&mut m);
        let Pdu::TaskMgmtRequest(r) = &out[0] else {
            panic!()
        };
        assert_eq!((r.rtt, r.ref_cmd_sn, r.immediate), (a, CmdSn(T0), true));
        assert_eq!(r.function, TmfFunction::AbortTask);
        m.handle_pdu(
            Pdu::TaskMgmtResponse(TaskMgmtResponse {
                response: 0,
                itt: tmf,
                stat_sn: StatSn(7),
                exp_cmd_sn: CmdSn(T0 + 1),
                max_cmd_sn: CmdSn(T0 + 1),
            }),
            now,
        )
        .expect("tmf");
        let ev = events(&mut m);
        assert_eq!(done(&ev[0]), (queued, &Err(TaskError::Aborted)));
        assert!(matches!(done(&ev[1]), (i, Ok(Outcome::TaskMgmt(_))) if i == tmf));
        assert_eq!(done(&ev[2]), (a, &Err(TaskError::Aborted)));
        assert_eq!(m.outstanding(), 0);
        assert_eq!(m.abort_task(a), Err(SubmitError::UnknownTask(a.0)));
    }

    #[test]
    fn logout_ends_the_connection_and_refuses_new_requests() {
        let mut m = machine(8);
        let itt = m.logout(0).expect("logout");
        assert!(matches!(&sent(&mut m)[0], Pdu::LogoutRequest(l) if l.itt == itt && l.immediate));
        assert_eq!(
            m.ping(Bytes::new(), Instant::now()),
            Err(SubmitError::Closed)
        );
        m.handle_pdu(
            Pdu::LogoutResponse(LogoutResponse {
                response: 0,
                itt,
                stat_sn: StatSn(7),
                exp_cmd_sn: CmdSn(T0),
                max_cmd_sn: CmdSn(T0 + 8),
                time2wait: 0,
                time2retain: 0,
            }),
            Instant::now(),
        )
        .expect("logout response");
        assert_eq!(m.closed(), Some(&ConnError::LoggedOut));
        let ev = events(&mut m);
        assert!(matches!(done(&ev[0]), (i, Ok(Outcome::Logout(_))) if i == itt));
    }

    #[test]
    fn text_above_the_targets_segment_is_refused() {
        let mut m = machine(8);
        let r = m.submit_text(
            None,
            Ttt(RESERVED_TAG),
            Bytes::from(vec![b'a'; 1025]),
            false,
        );
        assert!(matches!(r, Err(SubmitError::Invalid(_))));
        let itt = m
            .submit_text(None, Ttt(RESERVED_TAG), Bytes::from(vec![b'a'; 1024]), true)
            .expect("one segment");
        assert!(
            matches!(&sent(&mut m)[0], Pdu::TextRequest(t) if t.itt == itt && t.continue_ && !t.final_)
        );
        assert_eq!(
            m.submit_text(Some(itt), Ttt(5), Bytes::new(), false),
            Err(SubmitError::TagInUse(itt.0)),
            "one request at a time per negotiation"
        );
    }

    #[test]
    fn an_answer_of_the_wrong_kind_closes_the_connection() {
        let mut m = machine(8);
        let ping = m.ping(Bytes::new(), Instant::now()).expect("ping");
        let r = m.handle_pdu(response(ping, 7, T0 + 8), Instant::now());
        assert!(matches!(r, Err(ConnError::Protocol(_))));
        assert!(m.is_closed());
    }

    /// Valid target PDUs for a machine with a read, a write and a ping outstanding.
    fn seeds(itts: [Itt; 3]) -> Vec<u8> {
        let [read, wr, ping] = itts;
        let mut b = BytesMut::new();
        let f = Framing::default();
        for p in [
            data_in(read, 0, 0, 100, None),
            r2t(wr, 9, 2048, 2048),
            data_in(read, 1, 100, 50, Some(0)),
            response(wr, 8, T0 + 9),
            Pdu::NopIn(NopIn {
                lun: Lun(0),
                itt: ping,
                ttt: Ttt(RESERVED_TAG),
                stat_sn: StatSn(9),
                exp_cmd_sn: CmdSn(T0),
                max_cmd_sn: CmdSn(T0 + 8),
                data: Bytes::from_static(b"x"),
            }),
        ] {
            p.encode(&mut b, &f);
        }
        b.to_vec()
    }

    /// The unmutated seeds are a valid exchange, so mutations start from real traffic.
    #[test]
    fn seeds_are_a_valid_exchange() {
        let now = Instant::now();
        let mut m = machine(8);
        let read = m
            .submit_scsi(ScsiRequest {
                data_in_len: 4096,
                ..tur(false)
            })
            .expect("read");
        let wr = m.submit_scsi(write(4096)).expect("write");
        let ping = m.ping(Bytes::from_static(b"x"), now).expect("ping");
        sent(&mut m);
        let mut dec = FrameDecoder::new(Framing::default());
        dec.feed(&seeds([read, wr, ping]));
        while let Some(f) = dec.next_frame().expect("seeds frame") {
            m.handle_frame(&f, now).expect("seeds are valid");
        }
        assert_eq!(
            sent(&mut m).len(),
            2,
            "the R2T is answered with two Data-Out"
        );
        let ev = events(&mut m);
        let itts: Vec<Itt> = ev.iter().map(|e| done(e).0).collect();
        assert_eq!(itts, vec![read, wr, ping]);
        assert!(ev.iter().all(|e| done(e).1.is_ok()));
    }

    proptest! {
        /// Nothing the target sends makes the machine panic: mutated and truncated
        /// streams of valid PDUs are decoded and handled (or refused) without one.
        #[test]
        fn mutated_target_bytes_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
            cut in any::<usize>(),
        ) {
            let now = Instant::now();
            let mut m = machine(8);
            let read = m.submit_scsi(ScsiRequest { data_in_len: 4096, ..tur(false) }).expect("read");
            let wr = m.submit_scsi(write(4096)).expect("write");
            let ping = m.ping(Bytes::from_static(b"x"), now).expect("ping");
            let mut bytes = seeds([read, wr, ping]);
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            let mut dec = FrameDecoder::new(Framing::default());
            dec.feed(&bytes);
            while let Ok(Some(f)) = dec.next_frame() {
                let _ = m.handle_frame(&f, now);
                let mut out = BytesMut::new();
                m.poll_transmit(&mut out);
            }
            m.handle_timeout(now + Duration::from_secs(60));
            while m.poll_event().is_some() {}
            // Past the ping timeout either the ping was answered or the connection is
            // closed: no input leaves a request waiting forever.
            prop_assert!(m.is_closed() || m.poll_timeout().is_none());
        }
    }
}
