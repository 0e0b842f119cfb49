//! A raw PDU-level iSCSI client, for protocol tests that need to break the rules on
//! purpose (out-of-window CmdSN, SNACK, odd Data-Out) and see exactly what the target
//! sends back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ftss_proto::frame::FrameDecoder;
use ftss_proto::pdu::*;
use ftss_proto::serial::{CmdSn, DataSn, StatSn};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::wire::read_frame;

/// The target [`crate::daemon_with`] serves and [`Raw::login`] logs in to.
pub const TARGET: &str = "iqn.2026-11.org.ftss:test";
/// The initiator name [`Raw`] logs in with.
pub const INITIATOR: &str = "iqn.2026-11.org.ftss:init1";

/// A raw connection: the test decides every field of every PDU; the client only keeps
/// the sequence numbers a well-behaved initiator would.
pub struct Raw {
    /// The socket, for tests that write bytes no PDU encodes to.
    pub s: TcpStream,
    /// Digests and segment limit PDUs are sent and received under.
    pub framing: Framing,
    /// CmdSN of the next command.
    pub cmd_sn: CmdSn,
    /// The StatSN after the last one received.
    pub exp_stat_sn: StatSn,
    /// ITT of the next task.
    pub next_itt: u32,
    /// The highest MaxCmdSN received.
    pub max_cmd_sn: CmdSn,
    dec: FrameDecoder,
}

/// `key=value` pairs as a login or text data segment.
pub fn kv(pairs: &[(&str, &str)]) -> Bytes {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    Bytes::from(v)
}

/// The `key=value` pairs of a login or text data segment.
pub fn parse_kv(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let t = String::from_utf8_lossy(s);
            t.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned()))
        })
        .collect()
}

impl Raw {
    /// Connects to `addr` (no login yet).
    pub async fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let framing = Framing {
            max_recv_data_segment: DATA_SEGMENT_LEN_MAX,
            ..Framing::default()
        };
        Raw {
            s,
            framing,
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(0),
            next_itt: 1,
            max_cmd_sn: CmdSn(1),
            dec: FrameDecoder::new(framing),
        }
    }

    /// Sends `p` under [`Raw::framing`].
    pub async fn send(&mut self, p: &Pdu) {
        let mut out = BytesMut::new();
        p.encode(&mut out, &self.framing);
        self.s.write_all(&out).await.expect("send");
    }

    /// Next PDU, or None on EOF / timeout.
    pub async fn recv_within(&mut self, t: Duration) -> Option<Pdu> {
        tokio::time::timeout(t, self.recv_inner())
            .await
            .ok()
            .flatten()
    }

    /// Next PDU; panics after 10 s or on EOF.
    pub async fn recv(&mut self) -> Pdu {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("a PDU from the target")
    }

    async fn recv_inner(&mut self) -> Option<Pdu> {
        // Tests change `framing` directly (digests after login).
        self.dec.set_framing(self.framing);
        let frame = read_frame(&mut self.s, &mut self.dec).await?;
        let p = frame.decode().expect("target PDUs decode");
        match &p {
            Pdu::ScsiResponse(r) => self.seen(r.stat_sn, r.max_cmd_sn),
            Pdu::DataIn(d) if d.status.is_some() => self.seen(d.stat_sn, d.max_cmd_sn),
            Pdu::NopIn(n) if n.itt.0 != RESERVED_TAG => self.seen(n.stat_sn, n.max_cmd_sn),
            Pdu::TaskMgmtResponse(r) => self.seen(r.stat_sn, r.max_cmd_sn),
            Pdu::TextResponse(r) => self.seen(r.stat_sn, r.max_cmd_sn),
            Pdu::LogoutResponse(r) => self.seen(r.stat_sn, r.max_cmd_sn),
            Pdu::Reject(r) => self.seen(r.stat_sn, r.max_cmd_sn),
            _ => {}
        }
        Some(p)
    }

    fn seen(&mut self, stat_sn: StatSn, max: CmdSn) {
        self.exp_stat_sn = stat_sn.next();
        if max.gt(self.max_cmd_sn) {
            self.max_cmd_sn = max;
        }
    }

    /// A fresh ITT.
    pub fn itt(&mut self) -> Itt {
        let i = self.next_itt;
        self.next_itt += 1;
        Itt(i)
    }

    /// A one-PDU login straight to the full feature phase (no security stage), with the
    /// given extra operational keys; a key of `keys` replaces the default of the same name
    /// (`InitiatorName` to log in as another initiator). Returns the final response and the
    /// answer keys.
    pub async fn login_with(
        &mut self,
        isid: [u8; 6],
        cmd_sn: u32,
        keys: &[(&str, &str)],
    ) -> (LoginResponse, Vec<(String, String)>) {
        let mut all: Vec<(&str, &str)> = [
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ]
        .into_iter()
        .filter(|(d, _)| !keys.iter().any(|(k, _)| k == d))
        .collect();
        all.extend_from_slice(keys);
        self.cmd_sn = CmdSn(cmd_sn);
        let req = Pdu::LoginRequest(LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid,
            tsih: 0,
            itt: Itt(0),
            cid: 1,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: StatSn(0),
            data: kv(&all),
        });
        self.send(&req).await;
        let Pdu::LoginResponse(r) = self.recv().await else {
            panic!("expected a login response");
        };
        self.exp_stat_sn = r.stat_sn.next();
        self.max_cmd_sn = r.max_cmd_sn;
        let answers = parse_kv(&r.data);
        let on = |k: &str| answers.iter().any(|(a, b)| a == k && b == "CRC32C");
        if r.status_class == 0 && r.transit {
            self.framing.header_digest = on("HeaderDigest");
            self.framing.data_digest = on("DataDigest");
        }
        (r, answers)
    }

    /// [`Raw::login_with`] the test ISID, CmdSN 1 and no extra keys; asserts success.
    pub async fn login(&mut self) -> LoginResponse {
        let (r, _) = self.login_with([0x40, 0, 0, 0, 0, 1], 1, &[]).await;
        assert_eq!((r.status_class, r.status_detail), (0, 0), "login accepted");
        assert!(r.transit);
        r
    }

    /// A SCSI command to LUN 0 with the next ITT and CmdSN (which it takes).
    pub fn command(
        &mut self,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
        data: Bytes,
    ) -> ScsiCommand {
        let itt = self.itt();
        let c = ScsiCommand {
            immediate: false,
            final_: true,
            read,
            write,
            attr: 1,
            lun: Lun::from_number(0),
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: Bytes::copy_from_slice(cdb),
            bidi_read_length: None,
            data,
        };
        self.cmd_sn = self.cmd_sn.next();
        c
    }

    /// Sends a command and collects its Data-In and final status.
    pub async fn run(&mut self, c: ScsiCommand) -> (u8, Vec<u8>, Residual, Bytes) {
        let itt = c.itt;
        self.send(&Pdu::ScsiCommand(c)).await;
        let mut data = Vec::new();
        loop {
            match self.recv().await {
                Pdu::DataIn(d) if d.itt == itt => {
                    assert_eq!(d.buffer_offset as usize, data.len(), "Data-In in order");
                    data.extend_from_slice(&d.data);
                    if let Some(s) = d.status {
                        return (s, data, d.residual, Bytes::new());
                    }
                }
                Pdu::ScsiResponse(r) if r.itt == itt => {
                    return (r.status, data, r.residual, r.sense)
                }
                Pdu::NopIn(_) => {}
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    /// An immediate NOP-Out ping with `data`; returns the NOP-In answer.
    pub async fn nop(&mut self, data: &[u8]) -> NopIn {
        let itt = self.itt();
        let p = Pdu::NopOut(NopOut {
            immediate: true,
            lun: Lun(0),
            itt,
            ttt: Ttt(RESERVED_TAG),
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            data: Bytes::copy_from_slice(data),
        });
        self.send(&p).await;
        match self.recv().await {
            Pdu::NopIn(n) => n,
            other => panic!("expected NOP-In, got {other:?}"),
        }
    }
}

/// READ (10) of `blocks` at `lba`.
pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

/// WRITE (10) of `blocks` at `lba`.
pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

/// TEST UNIT READY.
pub const TUR: [u8; 6] = [0; 6];

/// The first DataSN of a sequence.
pub fn data_sn0() -> DataSn {
    DataSn(0)
}
