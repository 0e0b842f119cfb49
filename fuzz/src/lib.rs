//! Shared pieces of the fuzz targets: a cursor over the fuzzer's bytes, and the daemon's
//! storage and packet system assembled on the simulated file system, as the embedded
//! default assembles it on real files (a LUN mirrored on two files behind the nonvolatile
//! write cache, the packet queue on its own mirrored volume in the same cache).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ftss_proto::vendor::{self, AddressList, NodeAddr, NodeCdb, SendList, SendRecord, VendorCdb};
use ftss_target::media::cache::{CachedVolume, WriteCache};
use ftss_target::media::disk::{Disk, SimFs};
use ftss_target::media::mirror::MirrorSet;
use ftss_target::media::{BlockStore, CacheMode};
use ftss_target::routing::clock::Clock;
use ftss_target::routing::packet_queue::{PacketQueue, QueueOptions};
use ftss_target::routing::{AgentConfig, RoutingAgent};
use ftss_target::scsi::target::{LunSpec, ScsiTarget, TargetIdentity};
use ftss_target::scsi::{ItNexus, ScsiCommand, ScsiOutcome, TaskAttr, VendorHandler};

/// Reads fields off the fuzzer's input; past the end it yields zeros, so every input
/// is a complete program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.data.split_first() else {
            return 0;
        };
        self.data = rest;
        b
    }

    /// Two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Four bytes, big-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// The rest.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// A clock the harness moves.
#[derive(Default)]
pub struct FakeClock(pub AtomicU64);

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Block size of every simulated volume.
pub const BS: u32 = 512;
/// Blocks of the LUN's mirror set.
pub const LUN_BLOCKS: u64 = 128;
/// Blocks of the packet queue's mirror set.
pub const QUEUE_BLOCKS: u64 = 128;
/// The write cache region: 8 KiB of superblocks and a 192 KiB ring.
pub const CACHE_BYTES: u64 = 8192 + (192 << 10);
/// Volume id of the LUN in the cache.
pub const LUN_VOL: u32 = 1;
/// Volume id of the packet queue in the cache.
pub const QUEUE_VOL: u32 = 2;
/// The simulated files: the cache, the LUN's mirrors, the queue's mirrors.
pub const FILES: [&str; 5] = ["cache", "lun.a", "lun.b", "queue.a", "queue.b"];

/// The storage and packet system on one simulated file system.
pub struct System {
    /// The file system underneath.
    pub fs: SimFs,
    /// The nonvolatile write cache.
    pub cache: Arc<WriteCache>,
    /// The LUN's mirror set.
    pub lun_set: Arc<MirrorSet>,
    /// The routing agent (the link unit's vendor side).
    pub agent: Arc<RoutingAgent>,
    /// The SCSI target: LUN 0 on the cache, vendor opcodes to the agent.
    pub target: ScsiTarget,
    /// The agent's and queue's clock.
    pub clock: Arc<FakeClock>,
}

fn mirror(fs: &SimFs, names: [&str; 2], blocks: u64) -> Result<Arc<MirrorSet>, String> {
    let disks: Vec<(PathBuf, Box<dyn Disk>)> = names
        .iter()
        .map(|n| (PathBuf::from(n), Box::new(fs.file(n)) as Box<dyn Disk>))
        .collect();
    MirrorSet::open_disks(disks, blocks, BS)
        .map(Arc::new)
        .map_err(|e| format!("mirror set {names:?}: {e}"))
}

/// Opens (recovers, unless `fresh`) the system on `fs`. Every failure is an error value:
/// recovery must refuse a bad image, never panic on it.
pub fn open_system(fs: &SimFs, fresh: bool) -> Result<System, String> {
    let lun_set = mirror(fs, ["lun.a", "lun.b"], LUN_BLOCKS)?;
    let queue_set = mirror(fs, ["queue.a", "queue.b"], QUEUE_BLOCKS)?;
    let region = fs.file("cache");
    if fresh {
        region.set_size(CACHE_BYTES).map_err(|e| e.to_string())?;
    }
    let cache = WriteCache::open_region_without_destage(
        Box::new(region),
        fresh,
        "cache",
        HashMap::from([
            (LUN_VOL, Arc::clone(&lun_set)),
            (QUEUE_VOL, Arc::clone(&queue_set)),
        ]),
    )
    .map_err(|e| format!("cache: {e}"))?;
    let clock = Arc::new(FakeClock(AtomicU64::new(1_800_000_000_000)));
    let queue = PacketQueue::open_with_clock(
        Arc::clone(&cache),
        QUEUE_VOL,
        QUEUE_BLOCKS,
        BS,
        QueueOptions {
            retain: Duration::from_secs(5),
            dedup_window: 64,
            index_max: 16,
            ..QueueOptions::default()
        },
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .map_err(|e| format!("packet queue: {e}"))?;
    let agent = RoutingAgent::without_threads(
        queue,
        AgentConfig {
            nodes: Vec::new(),
            delivery_timeout: Duration::from_secs(2),
            external: None,
            registry: Some(queue_set),
        },
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .map_err(|e| format!("routing agent: {e}"))?;
    let store: Arc<dyn BlockStore> = Arc::new(CachedVolume::new(
        Arc::clone(&cache),
        Arc::clone(&lun_set),
        LUN_VOL,
        CacheMode::Nonvolatile,
    ));
    let target = ScsiTarget::new(
        TargetIdentity {
            iqn: "iqn.2026-11.org.ftss:fuzz".into(),
        },
        vec![LunSpec {
            lun: 0,
            store,
            read_only: false,
            removable: false,
            initiators: None,
            physical_block_size: None,
        }],
    )
    .map_err(|e| e.to_string())?;
    target.set_vendor_handler(Arc::clone(&agent) as Arc<dyn VendorHandler>);
    Ok(System {
        fs: fs.clone(),
        cache,
        lun_set,
        agent,
        target,
        clock,
    })
}

/// The I_T nexus of node `k` (0, 1 or 2).
pub fn nexus(k: u8) -> ItNexus {
    let k = k % 3;
    ItNexus {
        id: u64::from(k) + 1,
        initiator_name: Arc::from(format!("iqn.2026-11.org.ftss:node{k}").as_str()),
        isid: [0x80, 0, 0, 0, 0, k],
        tpgt: 1,
    }
}

/// Node `k`'s packet address.
pub fn node_addr(k: u8) -> NodeAddr {
    NodeAddr::from(std::net::Ipv4Addr::new(10, 0, 0, k % 3 + 1))
}

/// Runs one command as the transport would: the whole response is taken as sent (a
/// parked command answers as if it had not waited).
pub fn exec(sys: &System, n: &ItNexus, cdb: &[u8], data: &[u8], expected: u32) -> ScsiOutcome {
    let cmd = ScsiCommand {
        lun: 0,
        cdb,
        data_out: data,
        expected_len: expected,
        attr: TaskAttr::Simple,
        resume_until: None,
    };
    let mut out = sys.target.execute(n, &cmd);
    if let Some(h) = out.on_sent.take() {
        h.sent(out.data_in.len().min(expected as usize));
    }
    out
}

/// Logs node `k` in and registers its address.
pub fn join(sys: &System, k: u8) -> ScsiOutcome {
    let n = nexus(k);
    sys.target.nexus_added(&n);
    let list = AddressList {
        addrs: vec![node_addr(k)],
    }
    .encode();
    let cdb = VendorCdb::Node(NodeCdb::Register {
        param_len: list.len() as u32,
    })
    .encode();
    let out = exec(sys, &n, &cdb, &list, list.len() as u32);
    clear_unit_attentions(sys, &n);
    out
}

/// A new nexus first hears POWER ON (and perhaps more) unit attentions on the LUN: TEST
/// UNIT READY until it answers GOOD, so the commands after it run.
fn clear_unit_attentions(sys: &System, n: &ItNexus) {
    for _ in 0..8 {
        if exec(sys, n, &[0u8; 6], &[], 0).status == 0 {
            break;
        }
    }
}

/// Node `from` sends `count` packets of `len` bytes to node `to`, ids from `first_id`.
pub fn send(sys: &System, from: u8, to: u8, first_id: u64, count: u64, len: usize) -> ScsiOutcome {
    let records = (0..count)
        .map(|i| SendRecord {
            dest: node_addr(to),
            broadcast: false,
            packet_id: first_id + i,
            payload: vec![(first_id + i) as u8; len],
        })
        .collect();
    let list = SendList { records }.encode();
    let cdb = VendorCdb::Send(vendor::SendCdb {
        batch_tag: first_id,
        param_len: list.len() as u32,
    })
    .encode();
    exec(sys, &nexus(from), &cdb, &list, list.len() as u32)
}

/// A fresh system with data in every structure recovery reads: LUN blocks written (some
/// destaged to the mirrors, some only in the cache), packets sent and some acknowledged.
/// Returns the file images after a clean stop (everything durable) and, if `destage`,
/// with the cache emptied into the mirrors first.
pub fn base_image(destage: bool) -> HashMap<String, Vec<u8>> {
    let fs = SimFs::new(1);
    let sys = open_system(&fs, true).expect("a fresh system opens");
    for k in 0..2 {
        assert_eq!(join(&sys, k).status, 0, "node {k} registers");
    }
    let n = nexus(0);
    for lba in 0..24u32 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a; // WRITE(10)
        cdb[2..6].copy_from_slice(&(lba * 3).to_be_bytes());
        cdb[8] = 1 + (lba % 3) as u8;
        let len = u32::from(cdb[8]) * BS;
        let data = vec![lba as u8 ^ 0x5a; len as usize];
        assert_eq!(
            exec(&sys, &n, &cdb, &data, len).status,
            0,
            "write lba {lba}"
        );
        if lba == 12 {
            sys.cache.destage_committed().expect("destage");
        }
    }
    for round in 0..6u64 {
        let out = send(
            &sys,
            (round % 2) as u8,
            ((round + 1) % 2) as u8,
            round * 10 + 1,
            3,
            40 + round as usize * 30,
        );
        assert_eq!(out.status, 0, "send round {round}: {:?}", out.sense);
    }
    if destage {
        sys.cache.destage_committed().expect("destage");
    }
    fs.snapshot()
}

/// [`base_image`], built once per process.
pub fn base_image_cached(destage: bool) -> &'static HashMap<String, Vec<u8>> {
    static KEPT: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    static DESTAGED: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    if destage {
        DESTAGED.get_or_init(|| base_image(true))
    } else {
        KEPT.get_or_init(|| base_image(false))
    }
}

/// Corrupts `image` as `input` says, in the files `names` only: a list of patches, each a
/// file choice, an offset (biased towards the first 4 KiB of each file, where headers,
/// superblocks and metadata slots live) and the bytes to write there.
pub fn corrupt(image: &mut HashMap<String, Vec<u8>>, names: &[&str], input: &mut Input<'_>) {
    while !input.is_empty() {
        let name = names[usize::from(input.u8()) % names.len()];
        let Some(file) = image.get_mut(name) else {
            continue;
        };
        if file.is_empty() {
            continue;
        }
        let raw = input.u32() as usize;
        let off = if raw & 0x8000_0000 == 0 {
            raw % file.len().min(4096)
        } else {
            raw % file.len()
        };
        let n = usize::from(input.u8() % 16) + 1;
        let bytes = input.take(n);
        let end = (off + bytes.len()).min(file.len());
        file[off..end].copy_from_slice(&bytes[..end - off]);
    }
}

/// After a recovery that succeeded, every read path must answer without panicking:
/// the whole LUN, and each node's RECEIVE and REPLAY.
pub fn exercise_recovered(sys: &System) {
    let n = nexus(0);
    for lba in (0..LUN_BLOCKS as u32).step_by(32) {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28; // READ(10)
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[8] = 32;
        let out = exec(sys, &n, &cdb, &[], 32 * BS);
        check_outcome(&out);
        if out.status == 0 {
            assert_eq!(
                out.data_in.len(),
                32 * BS as usize,
                "READ returns what it asked"
            );
        }
    }
    for k in 0..2 {
        sys.target.nexus_added(&nexus(k));
        clear_unit_attentions(sys, &nexus(k));
        for cdb in [
            VendorCdb::Receive(vendor::ReceiveCdb {
                wait: false,
                max_records: 0,
                alloc_len: 1 << 16,
                timeout: 0,
            }),
            VendorCdb::Replay(vendor::ReplayCdb {
                from: vendor::ReplayFrom::Seq(0),
                alloc_len: 1 << 16,
            }),
        ] {
            let out = exec(sys, &nexus(k), &cdb.encode(), &[], 1 << 16);
            check_outcome(&out);
        }
    }
}

/// What every command's outcome must satisfy: a status SAM-5 defines, sense data exactly
/// when the status is CHECK CONDITION, and sense data that parses as fixed or descriptor
/// format with a length that covers its own additional length.
pub fn check_outcome(out: &ScsiOutcome) {
    use ftss_proto::sense::status::{
        BUSY, CHECK_CONDITION as CHECK, CONDITION_MET, GOOD, RESERVATION_CONFLICT as CONFLICT,
        TASK_SET_FULL,
    };
    assert!(
        matches!(
            out.status,
            GOOD | CHECK | CONDITION_MET | BUSY | CONFLICT | TASK_SET_FULL
        ),
        "status {:#04x}",
        out.status
    );
    match (&out.sense, out.status) {
        (Some(s), CHECK) => {
            assert!(s.len() >= 8, "sense of {} bytes", s.len());
            match s[0] & 0x7f {
                0x70 | 0x71 => {
                    assert!(s.len() >= 18, "fixed sense of {} bytes", s.len());
                    assert_eq!(usize::from(s[7]) + 8, s.len(), "fixed sense length");
                }
                0x72 | 0x73 => {
                    assert_eq!(usize::from(s[7]) + 8, s.len(), "descriptor sense length");
                }
                other => panic!("sense response code {other:#04x}"),
            }
        }
        (None, CHECK) => panic!("CHECK CONDITION without sense data"),
        (Some(_), _) => panic!("sense data with status {:#04x}", out.status),
        (None, _) => {}
    }
}
