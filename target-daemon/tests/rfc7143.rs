//! The RFC 7143 rules userspace targets most often get wrong, each checked on the wire
//! against the real daemon over TCP. The login rules are checked without a socket, on
//! the login machines and virtual time (`src/iscsi/login/rfc7143.rs`), and so are the
//! full feature rules whose check is an answer that must not come (commands outside the
//! CmdSN window, NOP-Out with the reserved ITT): on the connection machine, where "no
//! answer" is exact rather than a wait (`src/iscsi/connection/rfc7143.rs`).

use std::time::Duration;

use bytes::Bytes;
use ftss_proto::pdu::*;
use ftss_proto::serial::{CmdSn, DataSn};
use ftss_test_support::*;

/// Clears the power-on unit attention every new nexus starts with.
async fn clear_ua(c: &mut Raw) {
    for _ in 0..4 {
        let cmd = c.command(&TUR, 0, false, false, Bytes::new());
        let (status, _, _, _) = c.run(cmd).await;
        if status == 0 {
            return;
        }
    }
    panic!("unit attention did not clear");
}

#[tokio::test]
async fn immediate_commands_do_not_advance_the_window() {
    let d = daemon("immediate").await;
    let mut c = Raw::connect(d.addr).await;
    c.login().await;
    clear_ua(&mut c).await;
    let before = c.nop(b"").await.exp_cmd_sn;
    let mut cmd = c.command(&TUR, 0, false, false, Bytes::new());
    cmd.immediate = true;
    c.cmd_sn = CmdSn(c.cmd_sn.0 - 1);
    let itt = cmd.itt;
    c.send(&Pdu::ScsiCommand(cmd)).await;
    match c.recv().await {
        Pdu::ScsiResponse(r) => {
            assert_eq!(r.itt, itt);
            assert_eq!(r.exp_cmd_sn, before, "immediate command moved ExpCmdSN");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn cmdsn_wraps_around() {
    let d = daemon("wrap").await;
    let mut c = Raw::connect(d.addr).await;
    let (r, _) = c.login_with([0x40, 0, 0, 0, 0, 2], u32::MAX - 2, &[]).await;
    assert_eq!(r.status_class, 0);
    let mut last = CmdSn(0);
    for _ in 0..6 {
        let cmd = c.command(&TUR, 0, false, false, Bytes::new());
        let itt = cmd.itt;
        c.send(&Pdu::ScsiCommand(cmd)).await;
        match c.recv().await {
            Pdu::ScsiResponse(r) => {
                assert_eq!(r.itt, itt);
                last = r.exp_cmd_sn;
            }
            other => panic!("{other:?}"),
        }
    }
    // CmdSNs 2^32-3 .. 2, so ExpCmdSN is now 3.
    assert_eq!(last, CmdSn(3), "ExpCmdSN wrapped past 2^32");
}

#[tokio::test]
async fn many_commands_in_flight_complete() {
    let d = daemon("inflight").await;
    let mut c = Raw::connect(d.addr).await;
    c.login().await;
    clear_ua(&mut c).await;
    let mut itts = Vec::new();
    for i in 0..32u32 {
        let cmd = c.command(&read10(i * 8, 8), 4096, true, false, Bytes::new());
        itts.push(cmd.itt);
        c.send(&Pdu::ScsiCommand(cmd)).await;
    }
    let mut done = std::collections::HashSet::new();
    let mut last_stat = None;
    while done.len() < 32 {
        match c.recv().await {
            Pdu::DataIn(dd) => {
                if dd.status.is_some() {
                    if let Some(prev) = last_stat {
                        assert_eq!(
                            dd.stat_sn,
                            ftss_proto::serial::StatSn::next(prev),
                            "StatSN in order"
                        );
                    }
                    last_stat = Some(dd.stat_sn);
                    done.insert(dd.itt);
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(itts.iter().all(|i| done.contains(i)));
}

#[tokio::test]
async fn target_pings_idle_connections() {
    let d = daemon_with("ping", "nop_timeout_s = 5\n").await;
    // nop_interval_s is 60 in the test config; use a dedicated config for a 1 s interval.
    drop(d);
    let dir = temp_dir("ping2");
    let text = format!(
        "[server]\nportals=[\"127.0.0.1:0\"]\ndata_dir=\"{}\"\nnop_interval_s=1\nnop_timeout_s=2\n[[target]]\niqn=\"{TARGET}\"\n[[target.lun]]\nlun=0\npath=\"l.img\"\nsize=\"1MiB\"\n",
        dir.display()
    );
    let server = ftss_target::startup::Server::start(
        ftss_target::config::Config::parse(&text).expect("config"),
    )
    .await
    .expect("start");
    let mut c = Raw::connect(server.local_addrs()[0]).await;
    c.login().await;
    let ping = match c.recv_within(Duration::from_secs(3)).await {
        Some(Pdu::NopIn(n)) => n,
        other => panic!("expected a NOP-In ping, got {other:?}"),
    };
    assert_eq!(ping.itt, Itt(RESERVED_TAG));
    assert_ne!(
        ping.ttt,
        Ttt(RESERVED_TAG),
        "a ping that wants an answer carries a TTT"
    );
    // Answer it: ITT reserved, TTT echoed.
    c.send(&Pdu::NopOut(NopOut {
        immediate: true,
        lun: Lun(0),
        itt: Itt(RESERVED_TAG),
        ttt: ping.ttt,
        cmd_sn: c.cmd_sn,
        exp_stat_sn: c.exp_stat_sn,
        data: Bytes::new(),
    }))
    .await;
    // Ignore the next ping: the target drops the connection after nop_timeout_s.
    let mut closed = false;
    for _ in 0..10 {
        match c.recv_within(Duration::from_secs(5)).await {
            Some(Pdu::NopIn(_)) => {}
            None => {
                closed = true;
                break;
            }
            Some(other) => panic!("{other:?}"),
        }
    }
    assert!(closed, "unanswered pings must end the connection");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn snack_at_erl0_is_rejected_not_stalled() {
    let d = daemon("snack").await;
    let mut c = Raw::connect(d.addr).await;
    c.login().await;
    c.send(&Pdu::SnackRequest(SnackRequest {
        snack_type: 1,
        lun: Lun(0),
        itt: Itt(RESERVED_TAG),
        ttt: Ttt(RESERVED_TAG),
        exp_stat_sn: c.exp_stat_sn,
        beg_run: 0,
        run_length: 0,
    }))
    .await;
    match c.recv().await {
        Pdu::Reject(r) => {
            assert_eq!(r.reason, RejectReason::ProtocolError as u8);
            assert_eq!(r.header[0] & 0x3f, opcode::SNACK_REQUEST);
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    assert_eq!(&c.nop(b"x").await.data[..], b"x");
}

#[tokio::test]
async fn data_in_respects_segment_and_burst_limits() {
    let d = daemon("datain").await;
    let mut c = Raw::connect(d.addr).await;
    let (r, _) = c
        .login_with(
            [0x40, 0, 0, 0, 0, 3],
            1,
            &[
                ("MaxRecvDataSegmentLength", "4096"),
                ("MaxBurstLength", "16384"),
            ],
        )
        .await;
    assert_eq!(r.status_class, 0);
    clear_ua(&mut c).await;
    let cmd = c.command(&read10(0, 128), 65536, true, false, Bytes::new());
    c.send(&Pdu::ScsiCommand(cmd)).await;
    let mut expect_sn = 0u32;
    let mut total = 0u32;
    loop {
        let Pdu::DataIn(dd) = c.recv().await else {
            panic!("Data-In expected")
        };
        assert!(
            dd.data.len() <= 4096,
            "Data-In segment over MaxRecvDataSegmentLength"
        );
        assert_eq!(dd.data_sn, DataSn(expect_sn));
        expect_sn += 1;
        total += dd.data.len() as u32;
        if total.is_multiple_of(16384) {
            assert!(dd.final_, "F must close each MaxBurstLength sequence");
        } else {
            assert!(!dd.final_);
        }
        if dd.status.is_some() {
            assert_eq!(total, 65536);
            break;
        }
    }
}

#[tokio::test]
async fn r2t_sequences_and_data_sn_restart_per_r2t() {
    let d = daemon("r2t").await;
    let mut c = Raw::connect(d.addr).await;
    let (r, _) = c
        .login_with(
            [0x40, 0, 0, 0, 0, 4],
            1,
            &[
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("MaxBurstLength", "65536"),
                ("MaxOutstandingR2T", "1"),
            ],
        )
        .await;
    assert_eq!(r.status_class, 0);
    clear_ua(&mut c).await;
    let len = 256 * 1024u32;
    let cmd = c.command(
        &write10(64, (len / 512) as u16),
        len,
        false,
        true,
        Bytes::new(),
    );
    let itt = cmd.itt;
    c.send(&Pdu::ScsiCommand(cmd)).await;
    let mut r2t_sn = 0;
    let mut covered = 0u32;
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let status = loop {
        match c.recv().await {
            Pdu::R2t(r) => {
                assert_eq!(r.itt, itt);
                assert_eq!(r.r2t_sn.0, r2t_sn, "R2TSN counts from 0");
                r2t_sn += 1;
                assert!(r.desired_len <= 65536, "R2T beyond MaxBurstLength");
                assert_eq!(r.buffer_offset, covered);
                covered += r.desired_len;
                // Two Data-Out PDUs per R2T, DataSN restarting at 0.
                let half = r.desired_len / 2;
                for (k, off) in [(0u32, 0u32), (1, half)] {
                    let o = r.buffer_offset + off;
                    c.send(&Pdu::DataOut(DataOut {
                        final_: k == 1,
                        lun: Lun::from_number(0),
                        itt,
                        ttt: r.ttt,
                        exp_stat_sn: c.exp_stat_sn,
                        data_sn: DataSn(k),
                        buffer_offset: o,
                        data: Bytes::copy_from_slice(&pattern[o as usize..(o + half) as usize]),
                    }))
                    .await;
                }
            }
            Pdu::ScsiResponse(r) => {
                assert_eq!(r.exp_data_sn, DataSn(r2t_sn), "ExpDataSN counts the R2Ts");
                break r.status;
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(status, 0);
    assert_eq!(covered, len);
    let cmd = c.command(
        &read10(64, (len / 512) as u16),
        len,
        true,
        false,
        Bytes::new(),
    );
    let (st, data, _, _) = c.run(cmd).await;
    assert_eq!(st, 0);
    assert!(data == pattern, "data read back differs");
}

#[tokio::test]
async fn unsolicited_data_bounded_by_first_burst() {
    let d = daemon("firstburst").await;
    let mut c = Raw::connect(d.addr).await;
    let (r, answers) = c
        .login_with(
            [0x40, 0, 0, 0, 0, 5],
            1,
            &[
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("FirstBurstLength", "8192"),
                ("MaxBurstLength", "65536"),
            ],
        )
        .await;
    assert_eq!(r.status_class, 0);
    assert!(answers
        .iter()
        .any(|(k, v)| k == "FirstBurstLength" && v == "8192"));
    clear_ua(&mut c).await;
    let len = 32768u32;
    let mut cmd = c.command(
        &write10(0, (len / 512) as u16),
        len,
        false,
        true,
        Bytes::from(vec![7u8; 4096]),
    );
    cmd.final_ = false;
    let itt = cmd.itt;
    c.send(&Pdu::ScsiCommand(cmd)).await;
    c.send(&Pdu::DataOut(DataOut {
        final_: true,
        lun: Lun::from_number(0),
        itt,
        ttt: Ttt(RESERVED_TAG),
        exp_stat_sn: c.exp_stat_sn,
        data_sn: DataSn(0),
        buffer_offset: 4096,
        data: Bytes::from(vec![7u8; 4096]),
    }))
    .await;
    let mut first_r2t = None;
    loop {
        match c.recv().await {
            Pdu::R2t(r) => {
                first_r2t.get_or_insert(r.buffer_offset);
                c.send(&Pdu::DataOut(DataOut {
                    final_: true,
                    lun: Lun::from_number(0),
                    itt,
                    ttt: r.ttt,
                    exp_stat_sn: c.exp_stat_sn,
                    data_sn: DataSn(0),
                    buffer_offset: r.buffer_offset,
                    data: Bytes::from(vec![7u8; r.desired_len as usize]),
                }))
                .await;
            }
            Pdu::ScsiResponse(r) => {
                assert_eq!(r.status, 0);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        first_r2t,
        Some(8192),
        "R2Ts start where FirstBurstLength ends"
    );
}

#[tokio::test]
async fn residual_overflow_and_underflow() {
    let d = daemon("residual").await;
    let mut c = Raw::connect(d.addr).await;
    c.login().await;
    clear_ua(&mut c).await;
    // READ of 8 blocks with room for 1: overflow of 7 blocks, only 512 bytes sent.
    let cmd = c.command(&read10(0, 8), 512, true, false, Bytes::new());
    let (st, data, res, _) = c.run(cmd).await;
    assert_eq!(st, 0);
    assert_eq!(data.len(), 512);
    assert!(res.overflow && !res.underflow);
    assert_eq!(res.count, 7 * 512);
    // READ of 1 block with room for 4: underflow of 3 blocks.
    let cmd = c.command(&read10(0, 1), 2048, true, false, Bytes::new());
    let (st, data, res, _) = c.run(cmd).await;
    assert_eq!(st, 0);
    assert_eq!(data.len(), 512);
    assert!(res.underflow && !res.overflow);
    assert_eq!(res.count, 3 * 512);
}

#[tokio::test]
async fn session_reinstatement_closes_the_old_session_without_blocking() {
    let d = daemon("reinstate").await;
    let isid = [0x40, 0, 0, 0, 0, 9];
    let mut old = Raw::connect(d.addr).await;
    let (r, _) = old.login_with(isid, 1, &[]).await;
    assert_eq!(r.status_class, 0);
    let t0 = std::time::Instant::now();
    let mut new = Raw::connect(d.addr).await;
    let (r2, _) = new.login_with(isid, 1, &[]).await;
    assert_eq!(r2.status_class, 0);
    assert_ne!(r.tsih, r2.tsih);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "reinstatement blocked"
    );
    assert!(
        old.recv_within(Duration::from_secs(3)).await.is_none(),
        "old connection still open"
    );
    assert_eq!(&new.nop(b"new").await.data[..], b"new");
}

#[tokio::test]
async fn abort_task_for_unknown_task_follows_ref_cmd_sn() {
    let d = daemon("abort").await;
    let mut c = Raw::connect(d.addr).await;
    c.login().await;
    clear_ua(&mut c).await;
    let tmf = |c: &mut Raw, ref_cmd_sn: CmdSn| {
        let itt = c.itt();
        TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::AbortTask,
            lun: Lun::from_number(0),
            itt,
            rtt: Itt(0x5555),
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: DataSn(0),
        }
    };
    // RefCmdSN outside the window: "task does not exist".
    let far = c.cmd_sn.add(10_000);
    let t = tmf(&mut c, far);
    c.send(&Pdu::TaskMgmtRequest(t)).await;
    match c.recv().await {
        Pdu::TaskMgmtResponse(r) => assert_eq!(r.response, 1),
        other => panic!("{other:?}"),
    }
    // RefCmdSN below ExpCmdSN (completed long ago): outside the window too.
    let old = CmdSn(c.cmd_sn.0 - 1);
    let t = tmf(&mut c, old);
    c.send(&Pdu::TaskMgmtRequest(t)).await;
    match c.recv().await {
        Pdu::TaskMgmtResponse(r) => assert_eq!(r.response, 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn send_targets_longer_than_max_recv_segment_is_continued() {
    let dir = temp_dir("sendtargets");
    let mut text = format!(
        "[server]\nportals=[\"127.0.0.1:0\"]\ndata_dir=\"{}\"\n",
        dir.display()
    );
    for i in 0..40 {
        text.push_str(&format!(
            "[[target]]\niqn=\"iqn.2026-11.org.ftss:a-rather-long-target-name-to-fill-pdus-{i:03}\"\n"
        ));
    }
    let server = ftss_target::startup::Server::start(
        ftss_target::config::Config::parse(&text).expect("config"),
    )
    .await
    .expect("start");
    let mut c = Raw::connect(server.local_addrs()[0]).await;
    let req = Pdu::LoginRequest(LoginRequest {
        transit: true,
        continue_: false,
        csg: Stage::Operational,
        nsg: Stage::FullFeature,
        version_max: 0,
        version_min: 0,
        isid: [0x40, 0, 0, 0, 0, 7],
        tsih: 0,
        itt: Itt(0),
        cid: 0,
        cmd_sn: CmdSn(1),
        exp_stat_sn: ftss_proto::serial::StatSn(0),
        data: kv(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("MaxRecvDataSegmentLength", "512"),
        ]),
    });
    c.send(&req).await;
    let Pdu::LoginResponse(r) = c.recv().await else {
        panic!("login response")
    };
    assert_eq!(r.status_class, 0);
    let mut all = Vec::new();
    let mut ttt = Ttt(RESERVED_TAG);
    let mut pdus = 0;
    let mut first = true;
    loop {
        let itt = c.itt();
        c.send(&Pdu::TextRequest(TextRequest {
            immediate: false,
            final_: true,
            continue_: false,
            lun: Lun(0),
            itt,
            ttt,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            data: if first {
                kv(&[("SendTargets", "All")])
            } else {
                Bytes::new()
            },
        }))
        .await;
        c.cmd_sn = c.cmd_sn.next();
        first = false;
        let Pdu::TextResponse(t) = c.recv().await else {
            panic!("text response")
        };
        assert!(
            t.data.len() <= 512,
            "text response over the initiator's segment limit"
        );
        pdus += 1;
        all.extend_from_slice(&t.data);
        if t.final_ {
            assert!(!t.continue_);
            break;
        }
        assert!(t.continue_);
        ttt = t.ttt;
    }
    assert!(pdus > 1, "answer should span several PDUs");
    let names = parse_kv(&all)
        .into_iter()
        .filter(|(k, _)| k == "TargetName")
        .count();
    assert_eq!(names, 40);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bad_pdus_are_rejected_and_other_sessions_unaffected() {
    let d = daemon("badpdu").await;
    let mut good = Raw::connect(d.addr).await;
    good.login_with([0x40, 0, 0, 0, 0, 11], 1, &[]).await;
    let mut bad = Raw::connect(d.addr).await;
    bad.login_with([0x40, 0, 0, 0, 0, 12], 1, &[]).await;
    // An opcode no initiator may send.
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x1c;
    use tokio::io::AsyncWriteExt;
    bad.s.write_all(&bhs).await.expect("write");
    match bad.recv().await {
        Pdu::Reject(r) => assert_eq!(r.reason, RejectReason::CommandNotSupported as u8),
        other => panic!("{other:?}"),
    }
    // A data segment far beyond our MaxRecvDataSegmentLength: rejected, skipped, alive.
    let mut big = [0u8; BHS_LEN];
    big[0] = 0x40;
    big[1] = 0x80;
    big[5..8].copy_from_slice(&[0x10, 0x00, 0x00]); // 1 MiB
    big[16..20].copy_from_slice(&[0, 0, 0, 99]);
    big[20..24].copy_from_slice(&[0xff; 4]);
    bad.s.write_all(&big).await.expect("write");
    bad.s.write_all(&vec![0u8; 1 << 20]).await.expect("write");
    match bad.recv().await {
        Pdu::Reject(r) => assert_eq!(r.reason, RejectReason::ProtocolError as u8),
        other => panic!("{other:?}"),
    }
    assert_eq!(&bad.nop(b"still").await.data[..], b"still");
    assert_eq!(&good.nop(b"fine").await.data[..], b"fine");
}
