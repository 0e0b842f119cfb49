//! A test harness in the manner of quinn-proto's `Pair` for the full feature phase: the
//! target's connection [`Machine`] and either a scripted initiator (hand-built PDUs, for
//! malformed input) or the initiator's own machine ([`Initiator`], see
//! [`Pair::with_initiator`]), joined by byte pipes and a virtual clock. Every PDU is encoded, cut by the one frame decoder and decoded again on
//! the other side, as on a socket; commands the machine hands out run on a real
//! [`ScsiTarget`] over a LUN in memory, at once or when the test says (so a test can
//! abort a command while it "executes"). No socket, no thread and no sleep is involved.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ftss_proto::frame::{FrameDecoder, FrameError};
use ftss_proto::initiator::{Event, Initiator};
use ftss_proto::login::LoginOutcome;
use ftss_proto::negotiate::Params;
use ftss_proto::pdu::{
    DataOut, Framing, Itt, LogoutRequest, Lun, NopOut, Pdu, ScsiCommand, TaskMgmtRequest,
    TmfFunction, Ttt, RESERVED_TAG,
};
use ftss_proto::serial::{CmdSn, DataSn, StatSn};

use super::machine::{Exec, Machine, ParkRequest};
use super::ConnParams;
use crate::config::Config;
use crate::iscsi::session::{SessionCtx, SessionKind, Shared, TargetEntry};
use crate::iscsi::transfer::XferLimits;
use crate::media::mem::MemStore;
use crate::scsi::target::{LunSpec, ScsiTarget, TargetIdentity};
use crate::scsi::{ItNexus, ScsiCommand as ExecCmd, ScsiOutcome};

/// The target every Pair serves.
const TARGET: &str = "iqn.2026-11.org.ftss:conn-pair";
/// Blocks of the LUN in memory.
const LUN_BLOCKS: u64 = 2048;
/// The first CmdSN of every Pair (any value works; one far from 0 catches sign slips).
pub(super) const FIRST_CMD_SN: u32 = 1000;
/// The NOP-In interval and timeout of every Pair, in seconds.
pub(super) const NOP_INTERVAL_S: u32 = 5;
pub(super) const NOP_TIMEOUT_S: u32 = 10;
/// The CmdSN window the target offers.
pub(super) const CMD_WINDOW: u32 = 8;
/// How long the initiator machine waits for the echo of its ping, in seconds: longer
/// than the target's interval plus timeout, so a test can tell which side gave up first.
pub(super) const PING_TIMEOUT_S: u64 = 20;
/// The target's MaxRecvDataSegmentLength in a two-machine Pair: small, so the
/// initiator's Data-Out is cut by it and not only by MaxBurstLength.
pub(super) const TARGET_RECV_SEGMENT: u32 = 1024;
/// Steps [`Pair::drive`] takes before it calls the exchange a livelock.
const DRIVE_STEPS_MAX: usize = 10_000;

/// The limits of most tests: small enough that a few KiB cross every boundary.
pub(super) fn limits() -> XferLimits {
    XferLimits {
        send_segment_max: 1024,
        burst_max: 4096,
        first_burst: 2048,
        initial_r2t: false,
        immediate_data: true,
        outstanding_r2t_max: 1,
    }
}

/// The target's side, the pipes and the clock.
pub(super) struct Pair {
    pub(super) m: Machine,
    /// Virtual time: moves only when a test advances it.
    pub(super) now: Instant,
    scsi: Arc<ScsiTarget>,
    nexus: ItNexus,
    /// Framing both ways (the tests use the same on each side).
    framing: Framing,
    /// What the target reads.
    to_target: FrameDecoder,
    /// What the initiator reads.
    to_initiator: FrameDecoder,
    /// PDUs the target sent that the test has not looked at yet.
    received: VecDeque<Pdu>,
    /// Commands handed out and not yet run (with [`Self::auto_run`] off).
    pub(super) executing: Vec<Exec>,
    /// Run each command on the SCSI target as soon as it is handed out.
    pub(super) auto_run: bool,
    /// Commands the SCSI layer parked.
    pub(super) parks: Vec<ParkRequest>,
    /// Frame errors that ended the target's reading, as a reader task would stop.
    reader_stopped: bool,
    /// The next ITT [`Self::itt`] gives out.
    next_itt: u32,
    /// The initiator's machine, when the Pair runs one instead of a script.
    initiator: Option<Initiator>,
    /// Every PDU the target was sent, decoded again: what the initiator put on the wire.
    pub(super) sent_to_target: Vec<Pdu>,
    /// The link is down: bytes either way are lost (a peer that went silent).
    pub(super) link_down: bool,
}

impl Pair {
    /// A normal session on LUN 0 with [`limits`], the clock at an arbitrary instant.
    pub(super) fn new() -> Self {
        Self::with(limits())
    }

    /// A normal session with the given data movement limits.
    pub(super) fn with(xfer: XferLimits) -> Self {
        Self::build(xfer, false, 8192)
    }

    /// A normal session with `xfer` and the initiator's own machine on the other side,
    /// its operational parameters those the target runs with (as a login would have
    /// negotiated them) and the target's MaxRecvDataSegmentLength
    /// [`TARGET_RECV_SEGMENT`].
    pub(super) fn with_initiator(xfer: XferLimits) -> Self {
        Self::initiator_pair(xfer, false)
    }

    /// [`Self::with_initiator`] with [`limits`] and CRC32C header and data digests both
    /// ways.
    pub(super) fn with_initiator_digests() -> Self {
        Self::initiator_pair(limits(), true)
    }

    fn initiator_pair(xfer: XferLimits, digests: bool) -> Self {
        let mut pair = Self::build(xfer, digests, TARGET_RECV_SEGMENT);
        let login = LoginOutcome {
            params: Params {
                immediate_data: xfer.immediate_data,
                initial_r2t: xfer.initial_r2t,
                first_burst_length: xfer.first_burst,
                max_burst_length: xfer.burst_max,
                max_outstanding_r2t: xfer.outstanding_r2t_max,
                peer_max_recv_data_segment_length: TARGET_RECV_SEGMENT,
                header_digest: digests,
                data_digest: digests,
                ..Params::default()
            },
            tsih: 1,
            cmd_sn: CmdSn(FIRST_CMD_SN),
            exp_cmd_sn: CmdSn(FIRST_CMD_SN),
            max_cmd_sn: CmdSn(FIRST_CMD_SN + CMD_WINDOW - 1),
            exp_stat_sn: StatSn(1),
        };
        let framing = *pair.to_initiator.framing();
        pair.initiator = Some(Initiator::new(
            &login,
            framing,
            Duration::from_secs(PING_TIMEOUT_S),
        ));
        pair
    }

    /// The initiator's machine of a Pair made by [`Self::with_initiator`].
    pub(super) fn ini(&mut self) -> &mut Initiator {
        self.initiator
            .as_mut()
            .expect("the test made the Pair with_initiator")
    }

    /// Everything the initiator's machine reported since the last look.
    pub(super) fn events(&mut self) -> Vec<Event> {
        let i = self.ini();
        std::iter::from_fn(|| i.poll_event()).collect()
    }

    /// A normal session with [`limits`] and CRC32C header and data digests both ways.
    pub(super) fn with_digests() -> Self {
        Self::build(limits(), true, 8192)
    }

    fn build(xfer: XferLimits, digests: bool, recv_segment: u32) -> Self {
        let mut config = Config::default_config();
        for t in &mut config.targets {
            t.iqn = TARGET.to_owned();
            t.chap = None;
            t.initiators = None;
        }
        let scsi = Arc::new(
            ScsiTarget::new(
                TargetIdentity {
                    iqn: TARGET.to_owned(),
                },
                vec![LunSpec {
                    lun: 0,
                    store: Arc::new(MemStore::new(vec![0; LUN_BLOCKS as usize * 512])),
                    read_only: false,
                    removable: false,
                    initiators: None,
                    physical_block_size: None,
                }],
            )
            .expect("a target with one LUN in memory is valid"),
        );
        let entry = Arc::new(TargetEntry {
            iqn: TARGET.to_owned(),
            alias: None,
            scsi: Arc::clone(&scsi),
            connections: std::sync::atomic::AtomicU64::new(0),
        });
        let shared = Arc::new(Shared::new(config, vec![entry]));
        let nexus = ItNexus {
            id: 1,
            initiator_name: Arc::from("iqn.2026-11.org.ftss:pair-initiator"),
            isid: [0x80, 0, 0, 0, 0, 1],
            tpgt: 1,
        };
        scsi.nexus_added(&nexus);
        // Nothing sends on it: the Pair's session is never shut down from outside.
        let (_, shutdown) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(SessionCtx {
            shared,
            kind: SessionKind::Normal(Arc::clone(&scsi)),
            target_iqn: Some(TARGET.to_owned()),
            nexus: nexus.clone(),
            tsih: 1,
            local: ([127, 0, 0, 1], 3260).into(),
            cmd_window: CMD_WINDOW,
            nop_interval_s: NOP_INTERVAL_S,
            nop_timeout_s: NOP_TIMEOUT_S,
            shutdown,
            released: std::sync::atomic::AtomicBool::new(false),
        });
        let framing = Framing {
            header_digest: digests,
            data_digest: digests,
            max_recv_data_segment: recv_segment,
        };
        let params = ConnParams { framing, xfer };
        let now = Instant::now();
        let m = Machine::new(ctx, params, CmdSn(FIRST_CMD_SN), StatSn(1), now);
        let pair = Pair {
            m,
            now,
            scsi,
            nexus,
            framing,
            to_target: FrameDecoder::new(framing),
            to_initiator: FrameDecoder::new(Framing {
                max_recv_data_segment: xfer.send_segment_max,
                ..framing
            }),
            received: VecDeque::new(),
            executing: Vec::new(),
            auto_run: true,
            parks: Vec::new(),
            reader_stopped: false,
            next_itt: 1,
            initiator: None,
            sent_to_target: Vec::new(),
            link_down: false,
        };
        // A fresh nexus meets a power-on unit attention first; the tests start past it,
        // as an initiator does after its first TEST UNIT READY.
        for _ in 0..4 {
            let tur = ExecCmd {
                lun: 0,
                cdb: &TUR,
                data_out: &[],
                expected_len: 0,
                attr: crate::scsi::TaskAttr::Simple,
                resume_until: None,
            };
            if pair.scsi.execute(&pair.nexus, &tur).status == 0 {
                break;
            }
        }
        pair
    }

    /// A fresh initiator task tag.
    pub(super) fn itt(&mut self) -> Itt {
        let i = self.next_itt;
        self.next_itt += 1;
        Itt(i)
    }

    /// Sends one PDU as the initiator would, and lets the target answer.
    pub(super) fn send(&mut self, p: &Pdu) {
        let b = self.encode(p);
        self.send_bytes(&b);
    }

    /// `p` as the initiator puts it on the wire (digests included when in use).
    pub(super) fn encode(&self, p: &Pdu) -> BytesMut {
        let mut b = BytesMut::new();
        p.encode(&mut b, &self.framing);
        b
    }

    /// Sends raw bytes (a malformed PDU, several PDUs at once), and lets the target
    /// answer.
    pub(super) fn send_bytes(&mut self, bytes: &[u8]) {
        self.feed_target(bytes);
        self.drive();
    }

    /// Hands the target bytes from the initiator and lets it read every whole frame.
    fn feed_target(&mut self, bytes: &[u8]) {
        if self.reader_stopped || self.link_down {
            return;
        }
        self.to_target.feed(bytes);
        loop {
            match self.to_target.next_frame() {
                Ok(Some(f)) => {
                    if let Ok(p) = f.decode() {
                        self.sent_to_target.push(p);
                    }
                    self.m.handle_frame(&f, self.now);
                }
                Ok(None) => break,
                Err(e) => {
                    // As the shell's reader: only an oversized segment leaves framing
                    // intact.
                    let fatal = !matches!(e, FrameError::TooLong { .. });
                    self.m.handle_frame_error(e, self.now);
                    if fatal {
                        self.reader_stopped = true;
                        break;
                    }
                }
            }
        }
    }

    /// Moves the clock by `d`, firing each machine's timer whenever it is due on the way.
    pub(super) fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.next_timer() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            if !self.m.is_closed() && self.m.poll_timeout() <= self.now {
                self.m.handle_timeout(self.now);
            }
            let now = self.now;
            if let Some(i) = self.initiator.as_mut() {
                if i.poll_timeout().is_some_and(|w| w <= now) {
                    i.handle_timeout(now);
                }
            }
            self.drive();
            if self.next_timer() == Some(t) {
                // No timer moved (a connection closed): stop here.
                break;
            }
        }
        self.now = end;
    }

    /// The earliest timer of either machine still running.
    fn next_timer(&self) -> Option<Instant> {
        let target = (!self.m.is_closed()).then(|| self.m.poll_timeout());
        let initiator = self.initiator.as_ref().and_then(Initiator::poll_timeout);
        match (target, initiator) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs what the machine polls out until it has nothing more: commands (when
    /// [`Self::auto_run`]), parks and PDUs to the initiator.
    pub(super) fn drive(&mut self) {
        for _ in 0..DRIVE_STEPS_MAX {
            if !self.step() {
                return;
            }
        }
        panic!("the connection did not settle in {DRIVE_STEPS_MAX} steps: a livelock");
    }

    /// One round of output; false when there was none.
    fn step(&mut self) -> bool {
        let mut progress = false;
        while let Some(e) = self.m.poll_execute() {
            progress = true;
            if self.auto_run {
                self.run(e);
            } else {
                self.executing.push(e);
            }
        }
        while let Some(p) = self.m.poll_park() {
            progress = true;
            self.parks.push(p);
        }
        let mut pieces = Vec::new();
        let hooks = self.m.poll_transmit(&mut pieces);
        let out: BytesMut = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        if !out.is_empty() && !self.link_down {
            progress = true;
            self.to_initiator.feed(&out);
            while let Ok(Some(f)) = self.to_initiator.next_frame() {
                let p = f.decode().expect("the target sends only PDUs that decode");
                self.received.push_back(p);
                if let Some(i) = self.initiator.as_mut() {
                    // An error closes the initiator's side; a test sees it in its events.
                    let _ = i.handle_frame(&f, self.now);
                }
            }
        }
        for (hook, bytes) in hooks {
            hook.sent(bytes);
        }
        let mut out = BytesMut::new();
        if self
            .initiator
            .as_mut()
            .is_some_and(|i| i.poll_transmit(&mut out))
        {
            progress = true;
            self.feed_target(&out);
        }
        progress
    }

    /// Runs one command on the SCSI target and hands its outcome back.
    fn run(&mut self, e: Exec) {
        let cmd = ExecCmd {
            lun: e.lun,
            cdb: &e.cdb,
            data_out: &e.data,
            expected_len: e.expected_len,
            attr: e.attr,
            resume_until: e.resume_until,
        };
        let outcome = self.scsi.execute_arrived(&self.nexus, &cmd, e.arrived);
        let (itt, generation) = (e.itt, e.generation);
        // The execution has returned: what an abort waits for (`Exec::end`) goes now.
        drop(e);
        self.m.handle_done(itt, generation, outcome, self.now);
    }

    /// Runs the held command with `itt` (see [`Self::auto_run`]).
    pub(super) fn run_held(&mut self, itt: Itt) {
        let i = self
            .executing
            .iter()
            .position(|e| e.itt == itt.0)
            .expect("the test names a command the machine handed out");
        let e = self.executing.remove(i);
        self.run(e);
        self.drive();
    }

    /// Ends the held command with `itt` with `outcome`, as if the SCSI layer returned it.
    pub(super) fn finish_held(&mut self, itt: Itt, outcome: ScsiOutcome) {
        let i = self
            .executing
            .iter()
            .position(|e| e.itt == itt.0)
            .expect("the test names a command the machine handed out");
        let e = self.executing.remove(i);
        let (itt, generation) = (e.itt, e.generation);
        drop(e);
        self.m.handle_done(itt, generation, outcome, self.now);
        self.drive();
    }

    /// The next PDU the target sent, if any.
    pub(super) fn recv(&mut self) -> Option<Pdu> {
        self.received.pop_front()
    }

    /// Every PDU the target sent since the last look.
    pub(super) fn recv_all(&mut self) -> Vec<Pdu> {
        self.received.drain(..).collect()
    }
}

/// LUN 0's LUN field.
pub(super) fn lun0() -> Lun {
    Lun::from_number(0)
}

/// A non-immediate SCSI command without data.
pub(super) fn command(itt: Itt, cmd_sn: u32, cdb: &[u8], edtl: u32) -> ScsiCommand {
    ScsiCommand {
        immediate: false,
        final_: true,
        read: edtl > 0,
        write: false,
        attr: 0,
        lun: lun0(),
        itt,
        edtl,
        cmd_sn: CmdSn(cmd_sn),
        exp_stat_sn: StatSn(0),
        cdb: Bytes::copy_from_slice(cdb),
        bidi_read_length: None,
        data: Bytes::new(),
    }
}

/// TEST UNIT READY.
pub(super) const TUR: [u8; 6] = [0; 6];

/// READ (10) of `blocks` 512-byte blocks at LBA 0.
pub(super) fn read10(blocks: u16) -> [u8; 10] {
    let b = blocks.to_be_bytes();
    [0x28, 0, 0, 0, 0, 0, 0, b[0], b[1], 0]
}

/// A WRITE (10) of `len` bytes (whole blocks) at LBA 0, carrying `immediate` bytes of
/// immediate data, with the F bit set when no unsolicited Data-Out follows.
pub(super) fn write10(
    itt: Itt,
    cmd_sn: u32,
    len: u32,
    immediate: u32,
    final_: bool,
) -> ScsiCommand {
    let blocks = u16::try_from(len / 512).expect("tests write small transfers");
    let b = blocks.to_be_bytes();
    ScsiCommand {
        read: false,
        write: true,
        final_,
        data: pattern(0, immediate),
        ..command(itt, cmd_sn, &[0x2a, 0, 0, 0, 0, 0, 0, b[0], b[1], 0], len)
    }
}

/// The bytes at `offset..offset + len` of the data every test writes.
pub(super) fn pattern(offset: u32, len: u32) -> Bytes {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// A Data-Out of the test pattern for `itt`.
pub(super) fn data_out(
    itt: Itt,
    ttt: u32,
    data_sn: u32,
    offset: u32,
    len: u32,
    final_: bool,
) -> Pdu {
    Pdu::DataOut(DataOut {
        final_,
        lun: lun0(),
        itt,
        ttt: Ttt(ttt),
        exp_stat_sn: StatSn(0),
        data_sn: DataSn(data_sn),
        buffer_offset: offset,
        data: pattern(offset, len),
    })
}

/// A NOP-Out: a ping that wants an answer with `itt`, or (with the reserved ITT) an
/// answer to the target's ping `ttt`.
pub(super) fn nop_out(itt: u32, ttt: u32, cmd_sn: u32, immediate: bool) -> Pdu {
    Pdu::NopOut(NopOut {
        immediate,
        lun: lun0(),
        itt: Itt(itt),
        ttt: Ttt(ttt),
        cmd_sn: CmdSn(cmd_sn),
        exp_stat_sn: StatSn(0),
        data: Bytes::new(),
    })
}

/// A task management request (immediate, as initiators send them).
pub(super) fn tmf(function: TmfFunction, itt: Itt, rtt: Itt, cmd_sn: u32, ref_cmd_sn: u32) -> Pdu {
    Pdu::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function,
        lun: lun0(),
        itt,
        rtt,
        cmd_sn: CmdSn(cmd_sn),
        exp_stat_sn: StatSn(0),
        ref_cmd_sn: CmdSn(ref_cmd_sn),
        exp_data_sn: DataSn(0),
    })
}

/// A Logout Request closing the session (reason 0).
pub(super) fn logout(itt: Itt, cmd_sn: u32, reason: u8) -> Pdu {
    Pdu::LogoutRequest(LogoutRequest {
        immediate: false,
        reason,
        itt,
        cid: 0,
        cmd_sn: CmdSn(cmd_sn),
        exp_stat_sn: StatSn(0),
    })
}

/// The reserved tag, for NOP-Outs that answer a ping.
pub(super) const RESERVED: u32 = RESERVED_TAG;
