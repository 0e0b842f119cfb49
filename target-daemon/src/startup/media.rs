//! The media opened at start, in the order recovery needs: the data directory, every
//! mirror set (the LUNs' and the packet queue's), the write cache in front of them (its
//! recovery replays committed records into the sets), then each target's LUNs over a
//! plain file or a cached mirror set, with their persistent reservations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::StartupError;
use crate::admin::MediaHandles;
use crate::config::{LunConfig, ResolvedConfig, TargetConfig};
use crate::iscsi::session::TargetEntry;
use crate::media::cache::{CachedVolume, WriteCache};
use crate::media::file::FileStore;
use crate::media::mirror::MirrorSet;
use crate::media::{volume_id, BlockStore, MediaError};
use crate::scsi::{LunSpec, ScsiTarget, TargetIdentity};

/// Block size of the packet queue's volume.
pub(super) const PACKET_BLOCK: u32 = 512;
/// Name the packet queue's journal volume id is derived from.
const PACKETS_VOLUME: &str = "ftss:packets";

/// What [`open`] opened.
pub(super) struct OpenedMedia {
    /// Every configured target with its LUNs.
    pub(super) targets: Vec<Arc<TargetEntry>>,
    /// The write cache and mirror sets, for the admin socket and the metrics (no
    /// routing agent yet).
    pub(super) handles: MediaHandles,
    /// The packet queue's volume (its id in the write cache and its mirror set), when
    /// `[packets]` is configured.
    pub(super) packets: Option<(u32, Arc<MirrorSet>)>,
}

/// `p` relative to the data directory unless absolute.
fn resolve(data_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        data_dir.join(p)
    }
}

/// Opens the data directory, the mirror sets, the write cache and every target's LUNs.
pub(super) fn open(config: &ResolvedConfig) -> Result<OpenedMedia, StartupError> {
    let dir = &config.file.server.data_dir;
    prepare_data_dir(dir).map_err(|source| StartupError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let sets = open_mirror_sets(config)?;
    let cache = open_cache(config, &sets.by_id)?;
    let mut targets = Vec::new();
    for (t, sizes) in config.file.targets.iter().zip(&config.lun_sizes) {
        targets.push(open_target(config, t, sizes, &sets.by_id, cache.as_ref())?);
    }
    Ok(OpenedMedia {
        targets,
        handles: MediaHandles {
            cache,
            cache_mode: config.file.media.cache.clone(),
            volumes: sets.named,
            rebuild_rate: config.media.rebuild_bytes_per_s,
            agent: None,
        },
        packets: sets.packets,
    })
}

/// The mirror sets, opened.
struct MirrorSets {
    /// By write-cache volume id.
    by_id: HashMap<u32, Arc<MirrorSet>>,
    /// By volume name (`<iqn>/<lun>`, `packets`), in the configuration's order.
    named: Vec<(String, Arc<MirrorSet>)>,
    /// The packet queue's.
    packets: Option<(u32, Arc<MirrorSet>)>,
}

/// Opens every mirrored LUN's set and the packet queue's: the write cache's recovery
/// replays into them, so they come first.
fn open_mirror_sets(config: &ResolvedConfig) -> Result<MirrorSets, StartupError> {
    let dir = &config.file.server.data_dir;
    let mut sets = MirrorSets {
        by_id: HashMap::new(),
        named: Vec::new(),
        packets: None,
    };
    for (t, sizes) in config.file.targets.iter().zip(&config.lun_sizes) {
        for (l, &size) in t.luns.iter().zip(sizes) {
            if l.mirrors.is_empty() {
                continue;
            }
            let paths: Vec<PathBuf> = l.mirrors.iter().map(|p| resolve(dir, p)).collect();
            let set = MirrorSet::open(&paths, size / u64::from(l.block_size), l.block_size)
                .map_err(|source| StartupError::LunMedia {
                    iqn: t.iqn.clone(),
                    lun: l.lun,
                    paths,
                    source,
                })?;
            let set = Arc::new(set);
            sets.named
                .push((format!("{}/{}", t.iqn, l.lun), Arc::clone(&set)));
            if sets.by_id.insert(volume_id(&t.iqn, l.lun), set).is_some() {
                return Err(StartupError::VolumeIdCollision {
                    volume: format!("{}/{}", t.iqn, l.lun),
                });
            }
        }
    }
    if let (Some(p), Some(resolved)) = (&config.file.packets, &config.packets) {
        let paths: Vec<PathBuf> = p.mirrors.iter().map(|m| resolve(dir, m)).collect();
        let set = MirrorSet::open(
            &paths,
            resolved.size_bytes / u64::from(PACKET_BLOCK),
            PACKET_BLOCK,
        )
        .map_err(|source| StartupError::PacketsMedia { paths, source })?;
        let set = Arc::new(set);
        sets.named.push(("packets".to_owned(), Arc::clone(&set)));
        let id = volume_id(PACKETS_VOLUME, 0);
        if sets.by_id.insert(id, Arc::clone(&set)).is_some() {
            return Err(StartupError::VolumeIdCollision {
                volume: "packets".into(),
            });
        }
        sets.packets = Some((id, set));
    }
    Ok(sets)
}

/// Opens the write cache in front of `volumes` and recovers it into them; none without
/// mirror sets.
fn open_cache(
    config: &ResolvedConfig,
    volumes: &HashMap<u32, Arc<MirrorSet>>,
) -> Result<Option<Arc<WriteCache>>, StartupError> {
    if volumes.is_empty() {
        return Ok(None);
    }
    let path = resolve(&config.file.server.data_dir, &config.file.media.cache_path);
    WriteCache::open_with(
        &path,
        config.media.cache_bytes,
        volumes.clone(),
        config.media.writes,
    )
    .map(Some)
    .map_err(|source| StartupError::WriteCache { path, source })
}

/// Builds target `t` over its LUNs' stores (`sizes`: each LUN's bytes) and loads their
/// persistent reservations.
fn open_target(
    config: &ResolvedConfig,
    t: &TargetConfig,
    sizes: &[u64],
    volumes: &HashMap<u32, Arc<MirrorSet>>,
    cache: Option<&Arc<WriteCache>>,
) -> Result<Arc<TargetEntry>, StartupError> {
    let dir = &config.file.server.data_dir;
    let mut luns = Vec::new();
    // LUN number -> its mirror set, where its APTPL reservations are kept.
    let mut mirrored: HashMap<u64, Arc<MirrorSet>> = HashMap::new();
    for (l, &size) in t.luns.iter().zip(sizes) {
        let store: Arc<dyn BlockStore> = match &l.path {
            Some(p) => open_file_lun(dir, &t.iqn, l, p, size)?,
            None => {
                let id = volume_id(&t.iqn, l.lun);
                let (Some(set), Some(cache)) = (volumes.get(&id), cache) else {
                    return Err(StartupError::NoMirrorSet {
                        iqn: t.iqn.clone(),
                        lun: l.lun,
                    });
                };
                mirrored.insert(u64::from(l.lun), Arc::clone(set));
                let mode = config.media.mode;
                Arc::new(CachedVolume::new(
                    Arc::clone(cache),
                    Arc::clone(set),
                    id,
                    mode,
                ))
            }
        };
        luns.push(lun_spec(l, store));
    }
    let scsi_err = |source| StartupError::Target {
        iqn: t.iqn.clone(),
        source,
    };
    let scsi = ScsiTarget::new(TargetIdentity { iqn: t.iqn.clone() }, luns).map_err(scsi_err)?;
    // APTPL reservations live on the LUN's media: the mirror set's metadata area, or a
    // file beside a plain-file LUN. State that does not decode stops the start.
    scsi.persist_reservations(dir, &mirrored)
        .map_err(scsi_err)?;
    Ok(Arc::new(TargetEntry {
        iqn: t.iqn.clone(),
        alias: t.alias.clone(),
        scsi: Arc::new(scsi),
        connections: std::sync::atomic::AtomicU64::new(0),
    }))
}

/// The SCSI layer's view of configured LUN `l` over `store`.
pub(super) fn lun_spec(l: &LunConfig, store: Arc<dyn BlockStore>) -> LunSpec {
    LunSpec {
        lun: u64::from(l.lun),
        store,
        read_only: l.read_only,
        removable: l.removable,
        initiators: l.initiators.clone(),
        physical_block_size: l.physical_block_size,
    }
}

/// Opens (creating when new) the plain-file store of target `iqn`'s LUN `l` at `p`
/// (relative to the data directory `dir`), `size` bytes.
pub(super) fn open_file_lun(
    dir: &Path,
    iqn: &str,
    l: &LunConfig,
    p: &Path,
    size: u64,
) -> Result<Arc<dyn BlockStore>, StartupError> {
    let path = resolve(dir, p);
    let err = |paths: Vec<PathBuf>, source: MediaError| StartupError::LunMedia {
        iqn: iqn.to_owned(),
        lun: l.lun,
        paths,
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(vec![parent.to_owned()], e.into()))?;
    }
    match FileStore::open(&path, size, l.block_size) {
        Ok(store) => Ok(Arc::new(store)),
        Err(e) => Err(err(vec![path], e)),
    }
}

/// Creates the data directory owner-only (0700), or tightens an existing one that group
/// or others may enter, with a warning: it holds the LUNs' data, the write cache and the
/// admin socket. A directory that is shared (sticky, as /tmp) or owned by another user
/// is not ours to change: it is left as it is, with a warning.
fn prepare_data_dir(dir: &Path) -> std::io::Result<()> {
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
