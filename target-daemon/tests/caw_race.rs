//! COMPARE AND WRITE is atomic against other initiators: two sessions race it on one
//! block, round after round, both expecting the block's current state and both writing
//! the next one. Exactly one must win each round; the other must see MISCOMPARE. Were the
//! compare and the write separable, both could compare before either wrote and both win.

mod common;

use bytes::Bytes;
use ftss_initiator::{Session, SessionConfig};
use ftss_proto::sense::key;

const ROUNDS: u64 = 200;
const LBA: u64 = 7;
const BS: usize = 512;

/// The block's content in round `r`.
fn state(r: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&r.to_be_bytes());
    }
    b
}

fn caw_cdb() -> Vec<u8> {
    let mut cdb = vec![0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&LBA.to_be_bytes());
    cdb[13] = 1;
    cdb
}

async fn login(addr: std::net::SocketAddr, name: &str) -> Session {
    let s = Session::connect(addr, SessionConfig::new(name, Some(common::TARGET)))
        .await
        .expect("login");
    // The first command reports the power-on unit attention.
    let _ = s
        .execute(0, &[0u8; 6], None, 0)
        .await
        .expect("TEST UNIT READY");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_initiators_race_compare_and_write_and_exactly_one_wins_each_round() {
    let d = common::daemon("caw-race").await;
    let a = login(d.addr, "iqn.2026-11.org.ftss:race-a").await;
    let b = login(d.addr, "iqn.2026-11.org.ftss:race-b").await;
    let mut write = vec![0x2a, 0, 0, 0, 0, LBA as u8, 0, 0, 1, 0];
    write[2..6].copy_from_slice(&(LBA as u32).to_be_bytes());
    let r = a
        .execute(0, &write, Some(Bytes::from(state(0))), 0)
        .await
        .expect("WRITE(10)");
    assert_eq!(r.status, 0, "initial write: {:?}", r.sense);
    let cdb = caw_cdb();
    let mut wins = [0u64; 2];
    for round in 0..ROUNDS {
        let mut data = state(round);
        data.extend(state(round + 1));
        let data = Bytes::from(data);
        let (ra, rb) = tokio::join!(
            a.execute(0, &cdb, Some(data.clone()), 0),
            b.execute(0, &cdb, Some(data), 0)
        );
        let (ra, rb) = (ra.expect("a's CAW"), rb.expect("b's CAW"));
        let won: Vec<bool> = [&ra, &rb].iter().map(|r| r.status == 0).collect();
        assert_eq!(
            won.iter().filter(|&&w| w).count(),
            1,
            "round {round}: exactly one winner (a {:?}, b {:?})",
            ra.sense,
            rb.sense
        );
        for (i, r) in [&ra, &rb].iter().enumerate() {
            if won[i] {
                wins[i] += 1;
            } else {
                assert_eq!(r.status, 2, "round {round}: loser status");
                let s = r.sense.expect("loser sense");
                assert_eq!((s.key, s.asc, s.ascq), (key::MISCOMPARE, 0x1d, 0));
            }
        }
    }
    assert_eq!(wins[0] + wins[1], ROUNDS);
    // The block went through every state once: it holds the last one.
    let mut read = vec![0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    read[2..6].copy_from_slice(&(LBA as u32).to_be_bytes());
    let r = a
        .execute(0, &read, None, BS as u32)
        .await
        .expect("READ(10)");
    assert_eq!(&r.data_in[..], &state(ROUNDS)[..]);
    let _ = a.logout().await;
    let _ = b.logout().await;
}
