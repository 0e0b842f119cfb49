//! The initiator against a scripted target that does what the ftss daemon never does:
//! continued login and text responses, a closed CmdSN window, status in a separate SCSI
//! Response after Data-In, R2Ts under RFC default limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::frame::FrameDecoder;
use ftss_proto::pdu::*;
use ftss_proto::serial::{CmdSn, DataSn, R2tSn, StatSn};
use ftss_test_support::read_frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Peer {
    s: TcpStream,
    framing: Framing,
    dec: FrameDecoder,
    stat_sn: u32,
}

impl Peer {
    async fn accept(l: &TcpListener) -> Peer {
        let (s, _) = l.accept().await.expect("accept");
        let framing = Framing {
            max_recv_data_segment: DATA_SEGMENT_LEN_MAX,
            ..Framing::default()
        };
        Peer {
            s,
            framing,
            dec: FrameDecoder::new(framing),
            stat_sn: 100,
        }
    }

    async fn recv(&mut self) -> Pdu {
        read_frame(&mut self.s, &mut self.dec)
            .await
            .expect("a whole PDU")
            .decode()
            .expect("initiator PDUs decode")
    }

    async fn send(&mut self, p: Pdu) {
        let mut out = BytesMut::new();
        p.encode(&mut out, &self.framing);
        self.s.write_all(&out).await.expect("send");
    }

    fn next_stat_sn(&mut self) -> StatSn {
        self.stat_sn += 1;
        StatSn(self.stat_sn - 1)
    }

    fn login_response(&mut self, req: &LoginRequest, transit: bool, cont: bool) -> LoginResponse {
        LoginResponse {
            transit,
            continue_: cont,
            csg: req.csg,
            nsg: if transit { Stage::FullFeature } else { req.csg },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: 7,
            itt: req.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: req.cmd_sn,
            // Window closed: ExpCmdSN - 1. Only a later PDU opens it.
            max_cmd_sn: CmdSn(req.cmd_sn.0.wrapping_sub(1)),
            status_class: 0,
            status_detail: 0,
            data: Bytes::new(),
        }
    }

    /// Login with a long initiator name (so the request continues) answered with a long
    /// text (so the response continues), straight to the full feature phase.
    async fn login(&mut self) -> CmdSn {
        let mut text = Vec::new();
        let first = loop {
            let Pdu::LoginRequest(r) = self.recv().await else {
                panic!("expected a login request");
            };
            text.extend_from_slice(&r.data);
            assert!(
                r.data.len() <= 8192,
                "login PDUs respect the default segment size"
            );
            if !r.continue_ {
                break r;
            }
            assert!(!r.transit, "C and T never both set");
            let ack = self.login_response(&r, false, false);
            self.send(Pdu::LoginResponse(ack)).await;
        };
        assert!(first.transit && first.nsg == Stage::FullFeature);
        let s = String::from_utf8(text).expect("utf-8");
        assert!(s.contains(&format!("InitiatorName={}", long_name())));
        // Our answer in two parts: 6000 + some bytes; the first with C=1 and no T.
        let mut answer = format!("X-com.example.Pad={}\0", "p".repeat(6000)).into_bytes();
        answer.extend_from_slice(b"TargetAlias=scripted\0MaxRecvDataSegmentLength=8192\0");
        let (a, b) = answer.split_at(4096);
        let mut r = self.login_response(&first, false, true);
        r.data = Bytes::copy_from_slice(a);
        self.send(Pdu::LoginResponse(r)).await;
        let Pdu::LoginRequest(pull) = self.recv().await else {
            panic!("expected an empty login request pulling the rest");
        };
        assert!(pull.data.is_empty() && !pull.continue_);
        let mut r = self.login_response(&pull, true, false);
        r.data = Bytes::copy_from_slice(b);
        self.send(Pdu::LoginResponse(r)).await;
        first.cmd_sn
    }
}

fn long_name() -> String {
    format!("iqn.2026-11.org.ftss:{}", "n".repeat(9000))
}

async fn listen() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

#[tokio::test]
async fn continuations_window_and_separate_status() {
    let (l, addr) = listen().await;
    let target = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let cmd_sn = p.login().await;
        // The window is closed: nothing may arrive until we open it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.send(Pdu::NopIn(NopIn {
            lun: Lun(0),
            itt: Itt(RESERVED_TAG),
            ttt: Ttt(RESERVED_TAG),
            stat_sn: StatSn(p.stat_sn),
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn.add(8),
            data: Bytes::new(),
        }))
        .await;

        // SendTargets, answered in two Text Responses.
        let Pdu::TextRequest(t) = p.recv().await else {
            panic!("expected SendTargets");
        };
        assert_eq!(t.cmd_sn, cmd_sn, "first command uses the login CmdSN");
        assert_eq!(&t.data[..], b"SendTargets=All\0");
        let all = b"TargetName=iqn.a\0TargetAddress=10.0.0.1:3260,1\0\
                    TargetAddress=10.0.0.2:3260,1\0TargetName=iqn.b\0";
        let (a, b) = all.split_at(20);
        let (exp, max) = (cmd_sn.next(), cmd_sn.add(8));
        let stat_sn = p.next_stat_sn();
        p.send(Pdu::TextResponse(TextResponse {
            final_: false,
            continue_: true,
            lun: Lun(0),
            itt: t.itt,
            ttt: Ttt(55),
            stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            data: Bytes::copy_from_slice(a),
        }))
        .await;
        let Pdu::TextRequest(t2) = p.recv().await else {
            panic!("expected the continuation request");
        };
        assert_eq!((t2.itt, t2.ttt), (t.itt, Ttt(55)));
        assert!(t2.data.is_empty());
        assert_eq!(t2.exp_stat_sn, stat_sn.next());
        // A ping must be answered; sent before the last text part so the answer comes
        // before the next command.
        p.send(Pdu::NopIn(NopIn {
            lun: Lun(0),
            itt: Itt(RESERVED_TAG),
            ttt: Ttt(77),
            stat_sn: StatSn(p.stat_sn),
            exp_cmd_sn: exp.next(),
            max_cmd_sn: max,
            data: Bytes::from_static(b"hi"),
        }))
        .await;
        let stat_sn = p.next_stat_sn();
        p.send(Pdu::TextResponse(TextResponse {
            final_: true,
            continue_: false,
            lun: Lun(0),
            itt: t.itt,
            ttt: Ttt(RESERVED_TAG),
            stat_sn,
            exp_cmd_sn: exp.next(),
            max_cmd_sn: max,
            data: Bytes::copy_from_slice(b),
        }))
        .await;

        let Pdu::NopOut(n) = p.recv().await else {
            panic!("expected the ping answer");
        };
        assert_eq!(
            (n.itt, n.ttt, &n.data[..]),
            (Itt(RESERVED_TAG), Ttt(77), &b"hi"[..])
        );

        // A read: two Data-In without status, then a SCSI Response with an underflow.
        let Pdu::ScsiCommand(c) = p.recv().await else {
            panic!("expected a read");
        };
        assert!(c.read && !c.write && c.edtl == 4096);
        for (i, chunk) in [[1u8; 1000], [2u8; 1000]].iter().enumerate() {
            p.send(Pdu::DataIn(DataIn {
                final_: i == 1,
                ack: false,
                residual: Residual::default(),
                status: None,
                lun: c.lun,
                itt: c.itt,
                ttt: Ttt(RESERVED_TAG),
                stat_sn: StatSn(0),
                exp_cmd_sn: c.cmd_sn.next(),
                max_cmd_sn: c.cmd_sn.add(8),
                data_sn: DataSn(i as u32),
                buffer_offset: 1000 * i as u32,
                data: Bytes::copy_from_slice(chunk),
            }))
            .await;
        }
        let stat_sn = p.next_stat_sn();
        p.send(Pdu::ScsiResponse(ScsiResponse {
            bidi_residual: Residual::default(),
            residual: Residual::of(4096, 2000),
            response: 0,
            status: 0,
            itt: c.itt,
            snack_tag: 0,
            stat_sn,
            exp_cmd_sn: c.cmd_sn.next(),
            max_cmd_sn: c.cmd_sn.add(8),
            exp_data_sn: DataSn(2),
            sense: Bytes::new(),
        }))
        .await;

        // A 20000-byte write under RFC defaults (InitialR2T=Yes, 8 KiB segments): 8 KiB
        // immediate, the rest by two R2Ts.
        let Pdu::ScsiCommand(w) = p.recv().await else {
            panic!("expected a write");
        };
        assert!(w.write && w.final_ && w.edtl == 20000);
        assert_eq!(w.data.len(), 8192);
        let mut got = w.data.to_vec();
        for (i, (off, len)) in [(8192u32, 6000u32), (14192, 5808)].into_iter().enumerate() {
            p.send(Pdu::R2t(R2t {
                lun: w.lun,
                itt: w.itt,
                ttt: Ttt(900 + i as u32),
                stat_sn: StatSn(p.stat_sn),
                exp_cmd_sn: w.cmd_sn.next(),
                max_cmd_sn: w.cmd_sn.add(8),
                r2t_sn: R2tSn(i as u32),
                buffer_offset: off,
                desired_len: len,
            }))
            .await;
            let mut sn = 0;
            loop {
                let Pdu::DataOut(d) = p.recv().await else {
                    panic!("expected Data-Out");
                };
                assert_eq!(d.ttt, Ttt(900 + i as u32));
                assert_eq!(d.data_sn, DataSn(sn));
                assert_eq!(d.buffer_offset as usize, got.len());
                assert!(d.data.len() <= 8192, "target's MaxRecvDataSegmentLength");
                got.extend_from_slice(&d.data);
                sn += 1;
                if d.final_ {
                    break;
                }
            }
            assert_eq!(got.len() as u32, off + len);
        }
        let stat_sn = p.next_stat_sn();
        p.send(Pdu::ScsiResponse(ScsiResponse {
            bidi_residual: Residual::default(),
            residual: Residual::default(),
            response: 0,
            status: 0,
            itt: w.itt,
            snack_tag: 0,
            stat_sn,
            exp_cmd_sn: w.cmd_sn.next(),
            max_cmd_sn: w.cmd_sn.add(8),
            exp_data_sn: DataSn(0),
            sense: Bytes::new(),
        }))
        .await;
        got
    });

    let mut c = SessionConfig::new(&long_name(), Some("iqn.scripted"));
    c.timeout = Duration::from_secs(10);
    let s = Arc::new(Session::connect(addr, c).await.expect("login"));
    assert_eq!(s.tsih(), 7);
    assert_eq!(s.params().peer_max_recv_data_segment_length, 8192);
    let started = std::time::Instant::now();
    let targets = s.send_targets().await.expect("SendTargets");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the window"
    );
    assert_eq!(
        targets,
        vec![
            (
                "iqn.a".to_owned(),
                vec!["10.0.0.1:3260,1".to_owned(), "10.0.0.2:3260,1".to_owned()]
            ),
            ("iqn.b".to_owned(), vec![]),
        ]
    );
    let r = s
        .execute(0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0], None, 4096)
        .await
        .expect("read");
    assert_eq!(r.status, 0);
    assert_eq!(r.data_in.len(), 2000);
    assert!(r.data_in[..1000].iter().all(|&b| b == 1) && r.data_in[1000..].iter().all(|&b| b == 2));
    assert!(r.residual.underflow && r.residual.count == 2096);
    let data: Bytes = (0..20000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let r = s
        .execute(
            0,
            &[0x2a, 0, 0, 0, 0, 0, 0, 0, 40, 0],
            Some(data.clone()),
            0,
        )
        .await
        .expect("write");
    assert_eq!(r.status, 0);
    assert_eq!(target.await.expect("script ran"), data.to_vec());
}

/// RFC 7143 11.19 on the shell: a ping the target never echoes fails with a timeout
/// after the session's timeout and closes the connection (the machine times it out;
/// the shell only runs its timer), so waiting requests and new ones fail at once.
#[tokio::test]
async fn unanswered_ping_times_out_and_closes() {
    let (l, addr) = listen().await;
    let target = tokio::spawn(async move {
        let mut p = Peer::accept(&l).await;
        let cmd_sn = p.login().await;
        p.send(Pdu::NopIn(NopIn {
            lun: Lun(0),
            itt: Itt(RESERVED_TAG),
            ttt: Ttt(RESERVED_TAG),
            stat_sn: StatSn(p.stat_sn),
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn.add(8),
            data: Bytes::new(),
        }))
        .await;
        let Pdu::NopOut(n) = p.recv().await else {
            panic!("expected the ping");
        };
        assert!(n.immediate && n.itt.0 != RESERVED_TAG);
        // Never answered: the initiator gives up and half-closes its side.
        let mut rest = Vec::new();
        p.s.read_to_end(&mut rest).await.expect("read to EOF");
        rest.len()
    });
    let mut c = SessionConfig::new(&long_name(), Some("iqn.scripted"));
    c.timeout = Duration::from_millis(1500);
    let s = Session::connect(addr, c).await.expect("login");
    let started = std::time::Instant::now();
    let r = s.nop_ping().await;
    assert!(matches!(r, Err(ftss_initiator::Error::Timeout)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert!(s.is_closed());
    let r = s.execute(0, &[0; 6], None, 0).await;
    assert!(
        matches!(r, Err(ftss_initiator::Error::ConnectionClosed)),
        "{r:?}"
    );
    assert_eq!(
        target.await.expect("script ran"),
        0,
        "nothing after the ping"
    );
}
