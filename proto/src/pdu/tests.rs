use super::*;
use crate::serial::{CmdSn, DataSn, R2tSn, StatSn};
use proptest::prelude::*;

fn roundtrip(p: &Pdu, framing: &Framing) {
    let mut out = BytesMut::new();
    p.encode(&mut out, framing);
    let (q, n) = Pdu::decode(&out, framing).expect("own encoding decodes");
    assert_eq!(n, out.len());
    assert_eq!(&q, p);
}

fn cmd() -> ScsiCommand {
    ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: Lun::from_number(3),
        itt: Itt(7),
        edtl: 4096,
        cmd_sn: CmdSn(u32::MAX),
        exp_stat_sn: StatSn(9),
        cdb: Bytes::from_static(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]),
        bidi_read_length: None,
        data: Bytes::new(),
    }
}

#[test]
fn scsi_command_with_ahs_and_digests() {
    let mut c = cmd();
    c.cdb = Bytes::from((0u8..32).collect::<Vec<_>>());
    c.bidi_read_length = Some(512);
    c.data = Bytes::from_static(b"abcde");
    for hd in [false, true] {
        for dd in [false, true] {
            let f = Framing {
                header_digest: hd,
                data_digest: dd,
                max_recv_data_segment: 8192,
            };
            roundtrip(&Pdu::ScsiCommand(c.clone()), &f);
        }
    }
}

#[test]
fn digest_errors_are_detected() {
    let f = Framing {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment: 8192,
    };
    let mut c = cmd();
    c.data = Bytes::from_static(b"payload");
    let mut out = BytesMut::new();
    Pdu::ScsiCommand(c).encode(&mut out, &f);
    let mut bad = out.clone();
    bad[20] ^= 1;
    assert_eq!(Pdu::decode(&bad, &f), Err(DecodeError::HeaderDigest));
    let mut bad = out.clone();
    bad[BHS_LEN + 4] ^= 1;
    assert_eq!(Pdu::decode(&bad, &f), Err(DecodeError::DataDigest));
    assert_eq!(
        DecodeError::DataDigest.reject_reason(),
        Some(RejectReason::DataDigestError)
    );
}

#[test]
fn oversized_segment_refused_before_buffering() {
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = opcode::SCSI_COMMAND;
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    let f = Framing::default();
    assert!(matches!(
        f.frame_len(&bhs),
        Err(DecodeError::DataSegmentTooLong {
            len: 0xff_ffff,
            max: 8192
        })
    ));
}

#[test]
fn incomplete_frames_ask_for_more() {
    let mut c = cmd();
    c.data = Bytes::from_static(&[1; 100]);
    let mut out = BytesMut::new();
    Pdu::ScsiCommand(c).encode(&mut out, &Framing::default());
    for cut in [0, 10, 47, 48, 100, out.len() - 1] {
        assert!(matches!(
            Pdu::decode(&out[..cut], &Framing::default()),
            Err(DecodeError::Incomplete(_))
        ));
    }
}

#[test]
fn every_pdu_roundtrips() {
    let f = Framing::default();
    let d = Bytes::from_static(b"key=value\0");
    for pdus in [scsi_pdus(), task_pdus(), login_pdus(&d), control_pdus(&d)] {
        for p in &pdus {
            roundtrip(p, &f);
        }
    }
}

/// One of each SCSI Command, Response, Data-Out, Data-In and R2T.
fn scsi_pdus() -> Vec<Pdu> {
    vec![
        Pdu::ScsiCommand(cmd()),
        Pdu::DataOut(DataOut {
            final_: true,
            lun: Lun(0),
            itt: Itt(1),
            ttt: Ttt(77),
            exp_stat_sn: StatSn(3),
            data_sn: DataSn(2),
            buffer_offset: 8192,
            data: Bytes::from_static(&[7; 13]),
        }),
        Pdu::ScsiResponse(ScsiResponse {
            bidi_residual: Residual::default(),
            residual: Residual::of(512, 0),
            response: 0,
            status: 2,
            itt: Itt(4),
            snack_tag: 0,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            exp_data_sn: DataSn(0),
            sense: Bytes::from_static(&[
                0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
            ]),
        }),
        Pdu::DataIn(DataIn {
            final_: true,
            ack: false,
            residual: Residual::of(4096, 512),
            status: Some(0),
            lun: Lun(0),
            itt: Itt(1),
            ttt: Ttt(RESERVED_TAG),
            stat_sn: StatSn(4),
            exp_cmd_sn: CmdSn(5),
            max_cmd_sn: CmdSn(6),
            data_sn: DataSn(0),
            buffer_offset: 0,
            data: Bytes::from_static(&[1; 512]),
        }),
        Pdu::R2t(R2t {
            lun: Lun(0),
            itt: Itt(1),
            ttt: Ttt(2),
            stat_sn: StatSn(3),
            exp_cmd_sn: CmdSn(4),
            max_cmd_sn: CmdSn(5),
            r2t_sn: R2tSn(6),
            buffer_offset: 7,
            desired_len: 8,
        }),
    ]
}

/// One of each Task management.
fn task_pdus() -> Vec<Pdu> {
    vec![
        Pdu::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::AbortTask,
            lun: Lun::from_number(1),
            itt: Itt(2),
            rtt: Itt(3),
            cmd_sn: CmdSn(4),
            exp_stat_sn: StatSn(5),
            ref_cmd_sn: CmdSn(6),
            exp_data_sn: DataSn(7),
        }),
        Pdu::TaskMgmtResponse(TaskMgmtResponse {
            response: 0,
            itt: Itt(1),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
        }),
    ]
}

/// One of each Login and Text.
fn login_pdus(d: &Bytes) -> Vec<Pdu> {
    vec![
        Pdu::LoginRequest(LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Security,
            nsg: Stage::Operational,
            version_max: 0,
            version_min: 0,
            isid: [0x40, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: Itt(0),
            cid: 1,
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(0),
            data: d.clone(),
        }),
        Pdu::TextRequest(TextRequest {
            immediate: false,
            final_: true,
            continue_: false,
            lun: Lun(0),
            itt: Itt(9),
            ttt: Ttt(RESERVED_TAG),
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(1),
            data: d.clone(),
        }),
        Pdu::LoginResponse(LoginResponse {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_active: 0,
            isid: [0x40, 1, 2, 3, 4, 5],
            tsih: 9,
            itt: Itt(0),
            stat_sn: StatSn(0),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(32),
            status_class: 0,
            status_detail: 0,
            data: d.clone(),
        }),
        Pdu::TextResponse(TextResponse {
            final_: false,
            continue_: true,
            lun: Lun(0),
            itt: Itt(9),
            ttt: Ttt(1),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            data: d.clone(),
        }),
    ]
}

/// One of each NOP, Logout, SNACK, Asynchronous Message and Reject.
fn control_pdus(d: &Bytes) -> Vec<Pdu> {
    vec![
        Pdu::NopOut(NopOut {
            immediate: true,
            lun: Lun(0),
            itt: Itt(1),
            ttt: Ttt(RESERVED_TAG),
            cmd_sn: CmdSn(5),
            exp_stat_sn: StatSn(6),
            data: d.clone(),
        }),
        Pdu::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: 0,
            itt: Itt(1),
            cid: 1,
            cmd_sn: CmdSn(1),
            exp_stat_sn: StatSn(2),
        }),
        Pdu::SnackRequest(SnackRequest {
            snack_type: 1,
            lun: Lun(0),
            itt: Itt(1),
            ttt: Ttt(0),
            exp_stat_sn: StatSn(2),
            beg_run: 3,
            run_length: 4,
        }),
        Pdu::NopIn(NopIn {
            lun: Lun(0),
            itt: Itt(RESERVED_TAG),
            ttt: Ttt(5),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(2),
            max_cmd_sn: CmdSn(3),
            data: Bytes::new(),
        }),
        Pdu::LogoutResponse(LogoutResponse {
            response: 0,
            itt: Itt(1),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            time2wait: 2,
            time2retain: 20,
        }),
        Pdu::AsyncMessage(AsyncMessage {
            lun: Lun(0),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            event: 1,
            vcode: 0,
            params: [0, 2, 20],
            data: Bytes::new(),
        }),
        Pdu::Reject(Reject {
            reason: 9,
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            data_sn: DataSn(0),
            header: Bytes::from_static(&[0; BHS_LEN]),
        }),
    ]
}

#[test]
fn lun_addressing() {
    assert_eq!(Lun::from_number(0).number(), Some(0));
    assert_eq!(Lun::from_number(255).number(), Some(255));
    assert_eq!(Lun::from_number(300).number(), Some(300));
    assert_eq!(Lun::from_number(300).0 >> 56, 0x41);
    assert_eq!(Lun(0x0001_0000_0000_0000).number(), Some(1));
    assert_eq!(Lun(0x0000_0000_0000_0001).number(), None);
    assert_eq!(Lun(0xc000_0000_0000_0000).number(), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    /// Random headers with plausible lengths, so most cases reach the field decoders
    /// rather than stopping at "incomplete".
    #[test]
    fn hostile_input_never_panics_and_renormalizes(
        mut bhs in proptest::collection::vec(any::<u8>(), BHS_LEN),
        ahs_words in 0u8..4,
        dsl in 0u32..64,
        tail in proptest::collection::vec(any::<u8>(), 0..400),
        hd in any::<bool>(),
        dd in any::<bool>(),
    ) {
        bhs[4] = ahs_words;
        bhs[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
        let mut bytes = bhs;
        bytes.extend_from_slice(&tail);
        let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: 256 };
        if let Ok((p, n)) = Pdu::decode(&bytes, &f) {
            prop_assert!(n <= bytes.len());
            let mut out = BytesMut::new();
            p.encode(&mut out, &f);
            let (q, m) = Pdu::decode(&out, &f).expect("re-encoded PDU decodes");
            prop_assert_eq!(m, out.len());
            prop_assert_eq!(q, p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    /// The split encoding (header, the data itself, padding and digest) is byte for byte
    /// the whole one, for every data length and digest choice; other PDUs do not split.
    #[test]
    fn a_split_data_in_is_the_whole_encoding_in_three_pieces(
        len in 1usize..9000,
        offset in 0usize..8,
        hd in any::<bool>(),
        dd in any::<bool>(),
    ) {
        let f = Framing { header_digest: hd, data_digest: dd, max_recv_data_segment: 8192 };
        // A slice of a larger buffer, as a read's data is.
        let buf: Vec<u8> = (0..len + 8).map(|i| (i * 7 + 3) as u8).collect();
        let pdu = Pdu::DataIn(DataIn {
            final_: true,
            ack: false,
            residual: Residual::default(),
            status: Some(0),
            lun: Lun(0),
            itt: Itt(9),
            ttt: Ttt(RESERVED_TAG),
            stat_sn: StatSn(4),
            exp_cmd_sn: CmdSn(5),
            max_cmd_sn: CmdSn(6),
            data_sn: DataSn(0),
            buffer_offset: 0,
            data: Bytes::from(buf).slice(offset..offset + len),
        });
        let mut whole = BytesMut::from(&b"before"[..]);
        pdu.encode(&mut whole, &f);
        let mut split = BytesMut::from(&b"before"[..]);
        let data = pdu.encode_split(&mut split, &f).expect("a Data-In with data splits");
        split.extend_from_slice(&data);
        encode_data_tail(&data, &f, &mut split);
        prop_assert_eq!(&whole[..], &split[..]);
        let nop = Pdu::NopIn(NopIn {
            itt: Itt(1),
            ttt: Ttt(RESERVED_TAG),
            lun: Lun(0),
            stat_sn: StatSn(1),
            exp_cmd_sn: CmdSn(1),
            max_cmd_sn: CmdSn(1),
            data: Bytes::from_static(b"ping"),
        });
        let mut out = BytesMut::new();
        prop_assert!(nop.encode_split(&mut out, &f).is_none());
        prop_assert!(out.is_empty(), "nothing written for a PDU that does not split");
    }
}
