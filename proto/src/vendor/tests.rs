use super::*;
use proptest::prelude::*;

fn addr(s: &str) -> NodeAddr {
    NodeAddr::from(s.parse::<IpAddr>().expect("ip"))
}

fn packet(dest: &str, id: u64, payload: &[u8]) -> SendRecord {
    SendRecord {
        dest: addr(dest),
        broadcast: false,
        packet_id: id,
        payload: payload.to_vec(),
    }
}

#[test]
fn addresses_map_ipv4() {
    let a = addr("192.0.2.7");
    assert_eq!(&a.0[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    assert_eq!(&a.0[12..], &[192, 0, 2, 7]);
    assert_eq!(a.ip(), "192.0.2.7".parse::<IpAddr>().expect("ip"));
    assert_eq!(addr("2001:db8::1").to_string(), "2001:db8::1");
    assert_eq!(
        format!("{:?}", addr("::ffff:10.0.0.1")),
        "NodeAddr(10.0.0.1)"
    );
    assert!(NodeAddr::UNSPECIFIED.is_unspecified());
}

#[test]
fn outcome_sense_table() {
    use key::*;
    let want = [
        (Outcome::Delivered, None),
        (Outcome::Accepted, Some((RECOVERED_ERROR, 0x80, 0x01))),
        (
            Outcome::UnknownDestination,
            Some((ABORTED_COMMAND, 0x80, 0x02)),
        ),
        (
            Outcome::DestinationDown,
            Some((ABORTED_COMMAND, 0x80, 0x03)),
        ),
        (
            Outcome::DestinationMaintenance,
            Some((ABORTED_COMMAND, 0x80, 0x04)),
        ),
    ];
    for (o, s) in want {
        assert_eq!(o.sense_code(), s, "{o:?}");
        assert_eq!(Outcome::from_code(o.code()), Some(o));
        let st = SendStatus::All(o);
        let sense = st.sense().map(|s| s.fixed()).unwrap_or_default();
        assert_eq!(SendStatus::from_reply(st.status(), &sense), Some(st));
        let sense = st.sense().map(|s| s.descriptor()).unwrap_or_default();
        assert_eq!(SendStatus::from_reply(st.status(), &sense), Some(st));
        if let Some((k, a, q)) = s {
            assert_eq!(Outcome::from_sense_code(k, a, q), Some(o));
        }
    }
    let mixed = SendStatus::Mixed.sense().expect("sense").fixed();
    assert_eq!(Sense::parse(&mixed), Some((RECOVERED_ERROR, 0x80, 0x10)));
    assert_eq!(
        SendStatus::from_reply(status::CHECK_CONDITION, &mixed),
        Some(SendStatus::Mixed)
    );
    assert_eq!(
        SendStatus::from_reply(status::BUSY, &[]),
        Some(SendStatus::MediaFull)
    );
    assert_eq!(
        SendStatus::from_reply(status::TASK_SET_FULL, &[]),
        Some(SendStatus::MediaFull)
    );
    let bad = common::INVALID_FIELD_IN_PARAM_LIST.fixed();
    assert_eq!(SendStatus::from_reply(status::CHECK_CONDITION, &bad), None);
    assert_eq!(Outcome::from_code(0x10), None);
    assert_eq!(
        SendStatus::of([Outcome::Accepted, Outcome::Accepted]),
        SendStatus::All(Outcome::Accepted)
    );
    assert_eq!(
        SendStatus::of([Outcome::Delivered, Outcome::DestinationDown]),
        SendStatus::Mixed
    );
    assert_eq!(SendStatus::of([]), SendStatus::All(Outcome::Delivered));
}

#[test]
fn send_list_layout() {
    let l = SendList {
        records: vec![packet("192.0.2.7", 1, b"ping")],
    };
    let b = l.encode();
    assert_eq!(b.len(), 48);
    assert_eq!(&b[..8], b"FP\x01\x00\x00\x01\x00\x00");
    assert_eq!(&b[8 + 28..8 + 32], &4u32.to_be_bytes());
    assert_eq!(&b[8 + 32..8 + 36], &crc32c(b"ping").to_be_bytes());
    assert_eq!(SendList::decode(&b), Ok(l));
    // An odd payload is padded with zeros to 4 bytes.
    let l = SendList {
        records: vec![packet("2001:db8::2", 2, b"abcde")],
    };
    let b = l.encode();
    assert_eq!(b.len(), 8 + 36 + 8);
    assert_eq!(&b[49..52], &[0, 0, 0]);
    assert_eq!(SendList::decode(&b), Ok(l));
}

fn err_at(e: Result<impl fmt::Debug, VendorError>) -> (usize, VendorError) {
    let e = e.expect_err("must fail");
    let off = match e {
        VendorError::Truncated { offset, .. }
        | VendorError::ParamField { offset, .. }
        | VendorError::Crc { offset, .. } => offset,
        VendorError::CdbField { byte, .. } => usize::from(byte),
        _ => usize::MAX,
    };
    (off, e)
}

#[test]
fn hostile_send_lists() {
    let good = SendList {
        records: vec![
            packet("192.0.2.7", 1, b"ping"),
            packet("192.0.2.8", 2, b"x"),
        ],
    }
    .encode();
    // Every truncation fails, at or before the cut, without panicking.
    for n in 0..good.len() {
        let (off, e) = err_at(SendList::decode(&good[..n]));
        assert!(off <= n, "cut {n}: {e:?}");
    }
    let patched = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        SendList::decode(&b)
    };
    assert_eq!(err_at(patched(0, b"FX")).0, 0);
    assert_eq!(err_at(patched(2, &[2])).0, 2);
    assert_eq!(err_at(patched(3, &[1])).0, 3);
    // Oversized count: refused before any allocation by it.
    let (off, e) = err_at(patched(4, &[0xff, 0xff]));
    assert_eq!(off, 4);
    assert_eq!(
        e.sense().field.map(|f| (f.in_cdb, f.byte)),
        Some((false, 4))
    );
    // A count above the records present is a truncation, below leaves extra bytes.
    assert!(matches!(
        err_at(patched(4, &[0, 3])).1,
        VendorError::Truncated { .. }
    ));
    assert_eq!(err_at(patched(4, &[0, 1])).0, 8 + 40);
    // Oversized payload length.
    let (off, e) = err_at(patched(8 + 28, &[0, 1, 0, 0]));
    assert_eq!((off, e.sense().asc), (8 + 28, 0x26));
    // A length beyond the data, within the limit.
    assert!(matches!(
        err_at(patched(8 + 28, &[0, 0, 0xff, 0xff])).1,
        VendorError::Truncated { offset: 44, .. }
    ));
    // Bad CRC: ABORTED COMMAND, offset of the crc field in INFORMATION.
    let (off, e) = err_at(patched(8 + 36, b"pong"));
    assert_eq!(off, 8 + 32);
    let s = e.sense();
    assert_eq!((s.key, s.asc, s.ascq, s.info), (0xb, 0x47, 0x01, Some(40)));
    // Reserved flag bit 15 names byte 16 bit 7; bit 1 names byte 17 bit 1.
    assert_eq!(
        patched(8 + 16, &[0x80, 0]).expect_err("flag"),
        VendorError::ParamField {
            offset: 24,
            bit: Some(7),
            what: "reserved flag set"
        }
    );
    let e = patched(8 + 16, &[0, 2]).expect_err("flag");
    assert_eq!(
        e.sense().field.map(|f| (f.byte, f.bit)),
        Some((25, Some(1)))
    );
    // BROADCAST with a destination, reserved field, non-zero padding.
    assert_eq!(err_at(patched(8 + 16, &[0, 1])).0, 8);
    assert_eq!(err_at(patched(8 + 19, &[1])).0, 27);
    assert_eq!(err_at(patched(48 + 36 + 1, &[1])).0, 85);
    // Trailing bytes.
    let mut b = good.clone();
    b.extend_from_slice(&[0; 4]);
    assert_eq!(err_at(SendList::decode(&b)).0, good.len());
}

#[test]
fn limits() {
    let big = SendList {
        records: vec![packet("192.0.2.7", 1, &vec![7u8; PAYLOAD_MAX])],
    };
    assert_eq!(SendList::decode(&big.encode()), Ok(big));
    let many = SendList {
        records: (0..SEND_RECORDS_MAX as u64)
            .map(|i| packet("192.0.2.7", i, b""))
            .collect(),
    };
    assert_eq!(
        SendList::decode(&many.encode()).map(|l| l.records.len()),
        Ok(1024)
    );
    let mut too_many = many.clone();
    too_many.records.push(packet("192.0.2.7", 0, b""));
    assert_eq!(err_at(SendList::decode(&too_many.encode())).0, 4);
    let acks = AckList {
        seqs: (0..1025).collect(),
    };
    assert_eq!(err_at(AckList::decode(&acks.encode())).0, 8192);
    assert!(matches!(
        AckList::decode(&[0; 12]),
        Err(VendorError::Truncated { offset: 8, .. })
    ));
    let addrs = AddressList {
        addrs: (0..65u32)
            .map(|i| NodeAddr::from(Ipv4Addr::from(i + 1)))
            .collect(),
    };
    assert_eq!(err_at(AddressList::decode(&addrs.encode())).0, 4);
    let zero = AddressList {
        addrs: vec![NodeAddr::UNSPECIFIED],
    };
    assert_eq!(err_at(AddressList::decode(&zero.encode())).0, 8);
    // Offsets past 64 KiB stay in INFORMATION only.
    let e = VendorError::ParamField {
        offset: 70_000,
        bit: None,
        what: "x",
    };
    assert_eq!((e.sense().field, e.sense().info), (None, Some(70_000)));
}

#[test]
fn hostile_record_lists() {
    let l = RecordList {
        more: true,
        records: vec![DeliveredRecord {
            seq: 9,
            source: addr("192.0.2.8"),
            flags: DeliveryFlags {
                broadcast: true,
                ..DeliveryFlags::default()
            },
            packet_id: 3,
            timestamp_ms: 1_700_000_000_000,
            payload: b"hello".to_vec(),
        }],
    };
    let b = l.encode();
    assert_eq!(b.len(), 12 + 52 + 8);
    assert_eq!(&b[8..12], &72u32.to_be_bytes());
    // A whole allocation-length buffer decodes: the list length bounds it.
    let mut padded = b.clone();
    padded.resize(4096, 0xee);
    assert_eq!(RecordList::decode(&padded), Ok(l.clone()));
    for n in 0..b.len() {
        assert!(RecordList::decode(&b[..n]).is_err(), "cut {n}");
    }
    let patched = |at: usize, v: &[u8]| {
        let mut x = b.clone();
        x[at..at + v.len()].copy_from_slice(v);
        RecordList::decode(&x)
    };
    assert_eq!(err_at(patched(0, b"FP")).0, 0);
    assert_eq!(err_at(patched(3, &[2])).0, 3);
    assert!(matches!(
        err_at(patched(4, &[0xff, 0xff])).1,
        VendorError::Truncated { .. }
    ));
    assert_eq!(err_at(patched(8, &[0, 0, 0, 4])).0, 8);
    assert!(matches!(
        err_at(patched(8, &[0xff, 0xff, 0xff, 0xff])).1,
        VendorError::Truncated { .. }
    ));
    assert_eq!(err_at(patched(12 + 24, &[0, 8])).0, 12 + 25);
    assert!(matches!(
        err_at(patched(12 + 52, b"j")).1,
        VendorError::Crc { offset: 60, .. }
    ));
    let n = DeliveredRecord::notice(4, addr("192.0.2.9"), 77, 5, Outcome::DestinationDown);
    assert_eq!(n.failure_notice(), Some(Outcome::DestinationDown));
    assert_eq!(l.records[0].failure_notice(), None);
}

#[test]
fn cdb_errors_point_at_fields() {
    let send = SendCdb {
        batch_tag: 1,
        param_len: 48,
    }
    .encode();
    let patched = |at: usize, v: u8| {
        let mut c = send.clone();
        c[at] = v;
        VendorCdb::parse(&c)
    };
    assert_eq!(err_at(patched(15, 4)).0, 15);
    assert_eq!(err_at(patched(14, 1)).0, 14);
    assert_eq!(err_at(patched(1, 1)).0, 1);
    assert_eq!(err_at(patched(10, 2)).0, 10); // 32 MiB
    assert_eq!(
        patched(0, 0xc6).expect_err("opcode").sense(),
        common::INVALID_OPCODE.cdb_field(0, None)
    );
    assert_eq!(
        VendorCdb::parse(&send[..10]),
        Err(VendorError::CdbLength(10))
    );
    assert_eq!(VendorCdb::parse(&[]), Err(VendorError::CdbLength(0)));
    let node = |b1: u8, b2: u8| {
        let mut c = vec![0u8; 16];
        c[0] = op::NODE;
        c[1] = b1;
        c[2] = b2;
        VendorCdb::parse(&c)
    };
    assert_eq!(
        node(5, 0)
            .expect_err("sa")
            .sense()
            .field
            .map(|f| (f.byte, f.bit)),
        Some((1, Some(4)))
    );
    assert_eq!(
        node(0x21, 0).expect_err("bit 5"),
        cdb_field(1, Some(5), "reserved bit set")
    );
    assert_eq!(err_at(node(1, 2)).0, 2);
    assert_eq!(err_at(node(2, 1)).0, 2);
    assert_eq!(
        node(1, 1),
        Ok(VendorCdb::Node(NodeCdb::SetState(NodeState::Maintenance)))
    );
    let recv = |b1: u8, alloc: u32, timeout: u16| {
        VendorCdb::parse(
            &ReceiveCdb {
                wait: false,
                max_records: 0,
                alloc_len: alloc,
                timeout,
            }
            .encode()
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 1 { b1 } else { b })
            .collect::<Vec<_>>(),
        )
    };
    assert_eq!(err_at(recv(0, 4096, 10)).0, 10);
    assert_eq!(err_at(recv(0, 11, 0)).0, 6);
    assert!(recv(0, 0, 0).is_ok());
    assert!(recv(1, 4096, 10).is_ok());
    assert_eq!(err_at(recv(2, 4096, 0)).0, 1);
    let ack = |b1: u8, len: u32| {
        let mut c = AckCdb::List { param_len: len }.encode();
        c[1] = b1;
        VendorCdb::parse(&c)
    };
    assert_eq!(err_at(ack(1, 12)).0, 10);
    assert_eq!(err_at(ack(1, 8200)).0, 10);
    assert_eq!(err_at(ack(0, 8)).0, 10);
    assert!(ack(1, 8192).is_ok());
}

fn arb_addr() -> impl Strategy<Value = NodeAddr> {
    any::<[u8; 16]>().prop_map(NodeAddr)
}

fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    proptest::sample::select(Outcome::ALL.to_vec())
}

fn arb_cdb() -> impl Strategy<Value = VendorCdb> {
    prop_oneof![
        (any::<u64>(), 8..=PARAM_LIST_MAX).prop_map(|(batch_tag, param_len)| {
            VendorCdb::Send(SendCdb {
                batch_tag,
                param_len,
            })
        }),
        (any::<bool>(), any::<u32>(), 12..=u32::MAX, any::<u16>()).prop_map(
            |(wait, max_records, alloc_len, t)| VendorCdb::Receive(ReceiveCdb {
                wait,
                max_records,
                alloc_len,
                timeout: if wait { t } else { 0 },
            })
        ),
        any::<u64>().prop_map(|s| VendorCdb::Ack(AckCdb::UpTo(s))),
        (0..=ACK_LIST_MAX as u32).prop_map(|n| VendorCdb::Ack(AckCdb::List { param_len: n * 8 })),
        (any::<bool>(), any::<u64>(), 12..=u32::MAX).prop_map(|(t, v, alloc_len)| {
            VendorCdb::Replay(ReplayCdb {
                from: if t {
                    ReplayFrom::Time(v)
                } else {
                    ReplayFrom::Seq(v)
                },
                alloc_len,
            })
        }),
        (8..=REGISTER_LIST_MAX)
            .prop_map(|param_len| VendorCdb::Node(NodeCdb::Register { param_len })),
        any::<bool>().prop_map(|m| VendorCdb::Node(NodeCdb::SetState(if m {
            NodeState::Maintenance
        } else {
            NodeState::Available
        }))),
        (8..=u32::MAX, 0..3u8).prop_map(|(alloc_len, k)| VendorCdb::Node(match k {
            0 => NodeCdb::Query { alloc_len },
            1 => NodeCdb::RoutingTable { alloc_len },
            _ => NodeCdb::QueueStats { alloc_len },
        })),
        (any::<u64>(), 16..=u32::MAX).prop_map(|(batch_tag, alloc_len)| {
            VendorCdb::SendResults(SendResultsCdb {
                batch_tag,
                alloc_len,
            })
        }),
    ]
}

proptest! {
    #[test]
    fn cdbs_round_trip(c in arb_cdb()) {
        let b = c.encode();
        prop_assert_eq!(b.len(), CDB_LEN);
        prop_assert_eq!(VendorCdb::parse(&b), Ok(c));
    }

    #[test]
    fn send_lists_round_trip(
        recs in proptest::collection::vec(
            (arb_addr(), any::<bool>(), any::<u64>(), arb_payload()), 0..8)
    ) {
        let l = SendList {
            records: recs
                .into_iter()
                .map(|(dest, broadcast, packet_id, payload)| SendRecord {
                    dest: if broadcast { NodeAddr::UNSPECIFIED } else { dest },
                    broadcast,
                    packet_id,
                    payload,
                })
                .collect(),
        };
        let b = l.encode();
        prop_assert_eq!(b.len() % 4, 0);
        prop_assert_eq!(SendList::decode(&b), Ok(l));
    }

    #[test]
    fn record_lists_round_trip(
        more in any::<bool>(),
        recs in proptest::collection::vec(
            (any::<u64>(), arb_addr(), 0..8u16, any::<u64>(), any::<u64>(), arb_payload()),
            0..8)
    ) {
        let l = RecordList {
            more,
            records: recs
                .into_iter()
                .map(|(seq, source, f, packet_id, timestamp_ms, payload)| DeliveredRecord {
                    seq,
                    source,
                    flags: DeliveryFlags::from_bits(f),
                    packet_id,
                    timestamp_ms,
                    payload,
                })
                .collect(),
        };
        let b = l.encode();
        prop_assert_eq!(b.len(), l.encoded_len());
        prop_assert_eq!(RecordList::decode(&b), Ok(l));
    }

    #[test]
    fn small_lists_round_trip(
        seqs in proptest::collection::vec(any::<u64>(), 0..40),
        addrs in proptest::collection::vec(arb_addr(), 0..ADDRESSES_MAX),
        extra in 0..4u16,
        maint in any::<bool>(),
        routes in proptest::collection::vec(
            (arb_addr(), 0..3u8, 0..4u8, any::<u32>()), 0..20),
        stats in any::<[u64; 6]>(),
        tag in any::<u64>(),
        results in proptest::collection::vec((any::<u64>(), arb_outcome()), 0..40),
    ) {
        let addrs: Vec<NodeAddr> =
            addrs.into_iter().filter(|a| !a.is_unspecified()).collect();
        let a = AckList { seqs };
        prop_assert_eq!(AckList::decode(&a.encode()), Ok(a));
        // NODE REGISTER takes one to 64 unicast addresses; anything else is refused.
        let a = AddressList { addrs: addrs.clone() };
        if !addrs.is_empty() && addrs.iter().all(NodeAddr::is_unicast) {
            prop_assert_eq!(AddressList::decode(&a.encode()), Ok(a));
        } else {
            prop_assert!(AddressList::decode(&a.encode()).is_err());
        }
        let n = NodeInfo {
            state: if maint { NodeState::Maintenance } else { NodeState::Available },
            total: addrs.len() as u16 + extra,
            addrs,
        };
        prop_assert_eq!(NodeInfo::decode(&n.encode()), Ok(n));
        let t = RouteList {
            total: routes.len() as u16 + extra,
            entries: routes
                .into_iter()
                .map(|(addr, s, f, node_id)| RouteEntry {
                    addr,
                    state: RouteState::from_code(s).unwrap_or(RouteState::Down),
                    local: f & 1 != 0,
                    external: f & 2 != 0,
                    node_id,
                })
                .collect(),
        };
        prop_assert_eq!(RouteList::decode(&t.encode()), Ok(t));
        let q = QueueStats {
            queued_records: stats[0],
            queued_bytes: stats[1],
            first_unacked: stats[2],
            last_delivered: stats[3],
            last_assigned: stats[4],
            capacity_bytes: stats[5],
        };
        prop_assert_eq!(q.encode().len(), QUEUE_STATS_LEN);
        prop_assert_eq!(QueueStats::decode(&q.encode()), Ok(q));
        let r = SendResults {
            batch_tag: tag,
            total: results.len() as u16 + extra,
            results: results
                .into_iter()
                .map(|(packet_id, outcome)| PacketResult { packet_id, outcome })
                .collect(),
        };
        prop_assert_eq!(SendResults::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = VendorCdb::parse(&data);
        let _ = SendList::decode(&data);
        let _ = RecordList::decode(&data);
        let _ = AckList::decode(&data);
        let _ = AddressList::decode(&data);
        let _ = NodeInfo::decode(&data);
        let _ = RouteList::decode(&data);
        let _ = QueueStats::decode(&data);
        let _ = SendResults::decode(&data);
    }

    #[test]
    fn decoders_never_panic_past_the_magic(
        magic in proptest::sample::select(vec![*b"FP", *b"FR", *b"FA", *b"FN", *b"FT", *b"FQ", *b"FS"]),
        data in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut d = vec![magic[0], magic[1], VERSION];
        d.extend_from_slice(&data);
        let _ = SendList::decode(&d);
        let _ = RecordList::decode(&d);
        let _ = AddressList::decode(&d);
        let _ = NodeInfo::decode(&d);
        let _ = RouteList::decode(&d);
        let _ = QueueStats::decode(&d);
        let _ = SendResults::decode(&d);
    }

    #[test]
    fn cdb_fields_never_panic(
        opcode in op::SEND..=0xc7u8,
        rest in any::<[u8; 15]>(),
    ) {
        let mut c = vec![opcode];
        c.extend_from_slice(&rest);
        if let Err(e) = VendorCdb::parse(&c) {
            let s = e.sense();
            prop_assert!(s.key == key::ILLEGAL_REQUEST);
        }
    }
}
