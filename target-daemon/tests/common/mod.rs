//! A raw PDU-level iSCSI client and an in-process daemon, for protocol tests that need to
//! break the rules on purpose (out-of-window CmdSN, SNACK, odd Data-Out) and see exactly
//! what the target sends back.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ftss_proto::pdu::*;
use ftss_proto::serial::{CmdSn, DataSn, StatSn};
use ftss_target::config::Config;
use ftss_target::startup::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TARGET: &str = "iqn.2026-11.org.ftss:test";
pub const INITIATOR: &str = "iqn.2026-11.org.ftss:init1";

/// A daemon on a free loopback port with one 16 MiB LUN in a temp dir.
pub struct Daemon {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ftss-test-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

pub async fn daemon_with(tag: &str, extra: &str) -> Daemon {
    let dir = temp_dir(tag);
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
{extra}
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "16MiB"
"#,
        dir.display()
    );
    let config = Config::parse(&text).expect("test config");
    let server = Server::start(config).await.expect("daemon starts");
    let addr = server.local_addrs()[0];
    Daemon {
        server: Some(server),
        addr,
        dir,
    }
}

pub async fn daemon(tag: &str) -> Daemon {
    daemon_with(tag, "").await
}

/// A raw connection.
pub struct Raw {
    pub s: TcpStream,
    pub framing: Framing,
    pub cmd_sn: CmdSn,
    pub exp_stat_sn: StatSn,
    pub next_itt: u32,
    pub max_cmd_sn: CmdSn,
}

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
    pub async fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Raw {
            s,
            framing: Framing {
                max_recv_data_segment: DATA_SEGMENT_LEN_MAX,
                ..Framing::default()
            },
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(0),
            next_itt: 1,
            max_cmd_sn: CmdSn(1),
        }
    }

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

    pub async fn recv(&mut self) -> Pdu {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("a PDU from the target")
    }

    async fn recv_inner(&mut self) -> Option<Pdu> {
        let mut bhs = vec![0u8; BHS_LEN];
        self.s.read_exact(&mut bhs).await.ok()?;
        let len = self.framing.frame_len(&bhs).ok()?;
        bhs.resize(len, 0);
        self.s.read_exact(&mut bhs[BHS_LEN..]).await.ok()?;
        let (p, _) = Pdu::decode(&bhs, &self.framing).expect("target PDUs decode");
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

    pub fn itt(&mut self) -> Itt {
        let i = self.next_itt;
        self.next_itt += 1;
        Itt(i)
    }

    /// A one-PDU login straight to the full feature phase (no security stage), with the
    /// given extra operational keys. Returns the final response and the answer keys.
    pub async fn login_with(
        &mut self,
        isid: [u8; 6],
        cmd_sn: u32,
        keys: &[(&str, &str)],
    ) -> (LoginResponse, Vec<(String, String)>) {
        let mut all = vec![
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ];
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

    pub async fn login(&mut self) -> LoginResponse {
        let (r, _) = self.login_with([0x40, 0, 0, 0, 0, 1], 1, &[]).await;
        assert_eq!((r.status_class, r.status_detail), (0, 0), "login accepted");
        assert!(r.transit);
        r
    }

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

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

pub const TUR: [u8; 6] = [0; 6];

pub fn data_sn0() -> DataSn {
    DataSn(0)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts the real `ftss-target` binary with `config` and waits for its portal.
pub fn start_binary(config: &std::path::Path, port: u16) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ftss-target"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start ftss-target");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
