//! The per-connection write-buffer budget (64 MiB) is held by a write from when its buffer
//! is granted until the write completes, not given back when it starts executing.

use bytes::Bytes;
use ftss_proto::pdu::{DataOut, Pdu};
use ftss_proto::serial::DataSn;
use ftss_test_support::{temp_dir, write10, Raw};

const WRITE_BYTES: u32 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_holds_its_buffer_budget_until_it_completes() {
    let dir = temp_dir("write-budget");
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
[[target]]
iqn = "{}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "128MiB"
"#,
        dir.display(),
        ftss_test_support::TARGET
    );
    let config = ftss_target::config::Config::parse(&text).expect("config");
    let server = ftss_target::startup::Server::start(config)
        .await
        .expect("daemon");
    let addr = server.local_addrs()[0];
    let mut c = Raw::connect(addr).await;
    c.login().await;
    // Takes the power-on unit attention.
    let tur = c.command(&ftss_test_support::TUR, 0, false, false, Bytes::new());
    let _ = c.run(tur).await;

    // Five 16 MiB writes: the budget grants four, the fifth waits for room.
    let blocks = (WRITE_BYTES / 512) as u16;
    let mut itts = Vec::new();
    for i in 0..5u32 {
        let cmd = c.command(
            &write10(i * u32::from(blocks), blocks),
            WRITE_BYTES,
            false,
            true,
            Bytes::new(),
        );
        itts.push(cmd.itt);
        c.send(&Pdu::ScsiCommand(cmd)).await;
    }
    let (first, last) = (itts[0], itts[4]);
    let mut first_done = false;
    loop {
        match c.recv().await {
            Pdu::R2t(r) if r.itt == first => {
                let data = vec![0x3c; r.desired_len as usize];
                let p = Pdu::DataOut(DataOut {
                    final_: true,
                    lun: r.lun,
                    itt: r.itt,
                    ttt: r.ttt,
                    exp_stat_sn: c.exp_stat_sn,
                    data_sn: DataSn(0),
                    buffer_offset: r.buffer_offset,
                    data: Bytes::from(data),
                });
                c.send(&p).await;
            }
            Pdu::R2t(r) if r.itt == last => {
                assert!(
                    first_done,
                    "the fifth write got its buffer while the first still held the budget"
                );
                break;
            }
            Pdu::R2t(_) | Pdu::NopIn(_) => {}
            Pdu::ScsiResponse(r) if r.itt == first => {
                assert_eq!(r.status, 0, "first write");
                first_done = true;
            }
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
