//! Builds each configured target's LUNs on their media: a plain file, or the write cache in
//! front of a mirror set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::admin::MediaHandles;
use crate::config::{parse_size, Config};
use crate::iscsi::{ServerError, TargetEntry};
use crate::media::cache::{CachedVolume, WriteCache};
use crate::media::file::FileStore;
use crate::media::mirror::MirrorSet;
use crate::media::{BlockStore, CacheMode};
use crate::routing::packet_queue::{PacketQueue, QueueOptions};
use crate::routing::{AgentConfig, RoutingAgent};
use crate::scsi::{LunSpec, ScsiTarget, TargetIdentity, VendorHandler};
use ftss_proto::vendor::NodeAddr;
use std::time::Duration;
use tracing::warn;

/// Block size of the packet queue's volume.
const PACKET_BLOCK: u32 = 512;
/// Name the packet queue's journal volume id is derived from.
const PACKETS_VOLUME: &str = "ftss:packets";

fn resolve(data_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        data_dir.join(p)
    }
}

/// The journal's id for a LUN: a stable hash of target and LUN, so reordering the
/// configuration can never replay one LUN's records into another.
pub(crate) fn volume_id(iqn: &str, lun: u16) -> u32 {
    let h = format!("{}/{lun}", iqn.to_ascii_lowercase())
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    // u32::MAX marks wrap records.
    h.min(u32::MAX - 1)
}

/// Creates the data directory owner-only (0700), or tightens an existing one that group
/// or others may enter, with a warning: it holds the LUNs' data, the write cache and the
/// admin socket. A directory that is shared (sticky, as /tmp) or owned by another user
/// is not ours to change: it is left as it is, with a warning.
pub(crate) fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if mode & 0o1000 != 0 || meta.uid() != crate::admin::effective_uid() {
        warn!(
            "data directory {} has mode {mode:o}: others may reach the LUNs' files; \
             left as it is (shared or another user's)",
            dir.display()
        );
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    warn!(
        "data directory {} had mode {mode:o}: tightened to 700",
        dir.display()
    );
    Ok(())
}

/// Opens every LUN of every target.
/// Opens (creating when new) the plain-file store of LUN `l` at `p`, relative to the
/// data directory `dir`.
pub(crate) fn open_file_lun(
    dir: &Path,
    p: &Path,
    l: &crate::config::LunConfig,
) -> Result<Arc<dyn BlockStore>, String> {
    let size = parse_size(&l.size)?;
    let path = resolve(dir, p);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    Ok(Arc::new(
        FileStore::open(&path, size, l.block_size)
            .map_err(|e| format!("{}: {e}", path.display()))?,
    ))
}

/// Opens the file of a LUN added at run time, creating it when new.
pub(crate) fn open_runtime_lun(
    dir: &Path,
    l: &crate::runtime_luns::RuntimeLun,
) -> Result<Arc<dyn BlockStore>, String> {
    let path = resolve(dir, &l.path);
    Ok(Arc::new(
        FileStore::open(&path, l.size_bytes, l.block_size)
            .map_err(|e| format!("{}: {e}", path.display()))?,
    ))
}

/// The SCSI layer's view of a LUN added at run time: every initiator the target admits
/// sees it.
pub(crate) fn runtime_spec(
    l: &crate::runtime_luns::RuntimeLun,
    store: Arc<dyn BlockStore>,
) -> LunSpec {
    LunSpec {
        lun: u64::from(l.lun),
        store,
        read_only: false,
        removable: false,
        initiators: None,
    }
}

pub(crate) fn open_targets(
    config: &Config,
) -> Result<(Vec<Arc<TargetEntry>>, MediaHandles), ServerError> {
    let dir = &config.server.data_dir;
    prepare_data_dir(dir).map_err(|e| ServerError::Lun {
        iqn: String::new(),
        lun: 0,
        msg: format!("{}: {e}", dir.display()),
    })?;
    // Mirror sets first: recovery replays the cache into them.
    let mut volumes: HashMap<u32, Arc<MirrorSet>> = HashMap::new();
    let mut handles = MediaHandles {
        cache_mode: config.media.cache.clone(),
        rebuild_rate: parse_size(&config.media.rebuild_rate).unwrap_or(64 << 20),
        ..MediaHandles::default()
    };
    for t in &config.targets {
        for l in t.luns.iter().filter(|l| !l.mirrors.is_empty()) {
            let err = |msg: String| ServerError::Lun {
                iqn: t.iqn.clone(),
                lun: l.lun,
                msg,
            };
            let size = parse_size(&l.size).map_err(err)?;
            let paths: Vec<PathBuf> = l.mirrors.iter().map(|p| resolve(dir, p)).collect();
            let set = MirrorSet::open(&paths, size / u64::from(l.block_size), l.block_size)
                .map_err(|e| err(e.to_string()))?;
            let id = volume_id(&t.iqn, l.lun);
            let set = Arc::new(set);
            handles
                .volumes
                .push((format!("{}/{}", t.iqn, l.lun), Arc::clone(&set)));
            if volumes.insert(id, set).is_some() {
                return Err(err("volume id collision: rename the target".into()));
            }
        }
    }
    // The packet queue lives on the same media: a mirror set behind the same cache.
    let packets_volume = match &config.packets {
        Some(p) => {
            let err = |msg: String| ServerError::Lun {
                iqn: "packets".into(),
                lun: 0,
                msg,
            };
            let size = parse_size(&p.size).map_err(err)?;
            let paths: Vec<PathBuf> = p.mirrors.iter().map(|m| resolve(dir, m)).collect();
            let set = MirrorSet::open(&paths, size / PACKET_BLOCK as u64, PACKET_BLOCK)
                .map_err(|e| err(e.to_string()))?;
            let set = Arc::new(set);
            handles
                .volumes
                .push(("packets".to_owned(), Arc::clone(&set)));
            let id = volume_id(PACKETS_VOLUME, 0);
            if volumes.insert(id, Arc::clone(&set)).is_some() {
                return Err(err("volume id collision".into()));
            }
            Some((id, set))
        }
        None => None,
    };
    let cache = if volumes.is_empty() {
        None
    } else {
        let m = &config.media;
        let size = parse_size(&m.cache_size).map_err(|msg| ServerError::Lun {
            iqn: String::new(),
            lun: 0,
            msg,
        })?;
        let path = resolve(dir, &m.cache_path);
        Some(
            WriteCache::open_with(
                &path,
                size,
                volumes.clone(),
                config.media.cache_writes == "map",
            )
            .map_err(|e| ServerError::Lun {
                iqn: String::new(),
                lun: 0,
                msg: format!("write cache {}: {e}", path.display()),
            })?,
        )
    };
    let mode = if config.media.cache == "volatile" {
        CacheMode::Volatile
    } else {
        CacheMode::Nonvolatile
    };
    let mut targets = Vec::new();
    for t in &config.targets {
        let mut luns = Vec::new();
        // LUN number -> its mirror set, where its APTPL reservations are kept.
        let mut mirrored: HashMap<u64, Arc<MirrorSet>> = HashMap::new();
        for l in &t.luns {
            let err = |msg: String| ServerError::Lun {
                iqn: t.iqn.clone(),
                lun: l.lun,
                msg,
            };
            let store: Arc<dyn BlockStore> = match (&l.path, &cache) {
                (Some(p), _) => open_file_lun(dir, p, l).map_err(err)?,
                (None, Some(cache)) => {
                    let id = volume_id(&t.iqn, l.lun);
                    let set = volumes
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| err("mirror set missing".into()))?;
                    mirrored.insert(u64::from(l.lun), Arc::clone(&set));
                    Arc::new(CachedVolume::new(Arc::clone(cache), set, id, mode))
                }
                (None, None) => return Err(err("no media".into())),
            };
            luns.push(LunSpec {
                lun: u64::from(l.lun),
                store,
                read_only: l.read_only,
                removable: l.removable,
                initiators: l.initiators.clone(),
            });
        }
        let scsi_err = |e: crate::scsi::ScsiError| ServerError::Lun {
            iqn: t.iqn.clone(),
            lun: 0,
            msg: e.to_string(),
        };
        let scsi =
            ScsiTarget::new(TargetIdentity { iqn: t.iqn.clone() }, luns).map_err(scsi_err)?;
        // APTPL reservations live on the LUN's media: the mirror set's metadata area, or a
        // file beside a plain-file LUN. State that does not decode stops the start.
        scsi.persist_reservations(dir, &mirrored)
            .map_err(scsi_err)?;
        targets.push(Arc::new(TargetEntry {
            iqn: t.iqn.clone(),
            alias: t.alias.clone(),
            scsi: Arc::new(scsi),
            connections: std::sync::atomic::AtomicU64::new(0),
        }));
    }
    if let (Some(p), Some((id, set)), Some(cache)) = (&config.packets, packets_volume, &cache) {
        let err = |msg: String| ServerError::Lun {
            iqn: "packets".into(),
            lun: 0,
            msg,
        };
        let queue = PacketQueue::open(
            Arc::clone(cache),
            id,
            set.blocks(),
            PACKET_BLOCK,
            QueueOptions {
                retain: Duration::from_secs(p.retain_s),
                dedup_window: p.dedup_window,
                // Validated with the configuration.
                node_quota_bytes: p
                    .node_quota_bytes
                    .as_deref()
                    .and_then(|q| crate::config::parse_size(q).ok()),
                node_quota_records: p.node_quota_records,
                ..QueueOptions::default()
            },
        )
        .map_err(|e| err(e.to_string()))?;
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                let addrs = n
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                    .map(NodeAddr::from)
                    .collect();
                (n.initiator.clone(), addrs)
            })
            .collect();
        let external = p.external.as_ref().and_then(|x| {
            let bind = x.bind.as_ref()?;
            Some((
                bind.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()),
                x.peers.iter().filter_map(|a| a.parse().ok()).collect(),
            ))
        });
        let interfaces = match &p.external {
            Some(x) => x.interfaces_config().map_err(|e| err(e.to_string()))?,
            None => None,
        };
        let agent = RoutingAgent::start_with_interfaces(
            queue,
            AgentConfig {
                nodes,
                delivery_timeout: Duration::from_secs(p.delivery_timeout_s),
                external,
                registry: Some(Arc::clone(&set)),
            },
            interfaces,
        )
        .map_err(|e| err(format!("routing agent: {e}")))?;
        for t in &targets {
            t.scsi
                .set_vendor_handler(Arc::clone(&agent) as Arc<dyn VendorHandler>);
        }
        handles.agent = Some(agent);
    }
    handles.cache = cache;
    Ok((targets, handles))
}
