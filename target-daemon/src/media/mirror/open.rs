//! Opening a set: reading each file's header, refusing files of another set or geometry,
//! and deciding which mirrors are current (highest epoch) and which need a rebuild.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, RwLock};

use tracing::warn;

use super::format::{header, layout, parse_header, Header, HEADER_LEN};
use super::{Mirror, MirrorSet, MirrorState};
use crate::media::disk::Disk;
use crate::media::MediaError;

fn random_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    id
}

impl MirrorSet {
    /// Opens (or creates) the mirror files of a volume of `blocks` x `block_size` bytes.
    /// A missing or empty file becomes a new mirror; if the set already has data it is
    /// marked failed until rebuilt. A file of another set or geometry is refused.
    pub fn open(paths: &[PathBuf], blocks: u64, block_size: u32) -> Result<Self, MediaError> {
        let mut disks: Vec<(PathBuf, Box<dyn Disk>)> = Vec::new();
        for p in paths {
            // Owner-only: a mirror holds the LUN's data.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)?;
            disks.push((p.clone(), Box::new(f)));
        }
        Self::open_disks(disks, blocks, block_size)
    }

    /// [`open`](Self::open) over already opened disks (files, or the test double).
    pub fn open_disks(
        disks: Vec<(PathBuf, Box<dyn Disk>)>,
        blocks: u64,
        block_size: u32,
    ) -> Result<Self, MediaError> {
        let paths: Vec<PathBuf> = disks.iter().map(|(p, _)| p.clone()).collect();
        if paths.len() < 2 {
            return Err(MediaError::Failed(
                "a mirror set needs at least two files".into(),
            ));
        }
        let (meta_off, file_len) = layout(blocks, block_size)
            .ok_or_else(|| MediaError::Failed("volume size overflows".into()))?;
        let mut files = Vec::new();
        let mut headers = Vec::new();
        for (p, f) in disks {
            headers.push(read_header(&p, f.as_ref(), blocks, block_size)?);
            files.push(f);
        }
        let existing: Vec<&Header> = headers.iter().flatten().collect();
        let set_id = existing.first().map_or_else(random_id, |h| h.set_id);
        if let Some(h) = existing.iter().find(|h| h.set_id != set_id) {
            let i = headers
                .iter()
                .position(|x| x.as_ref().is_some_and(|x| x.set_id == h.set_id))
                .unwrap_or(0);
            return Err(MediaError::Failed(format!(
                "{}: mirror belongs to another set",
                paths[i].display()
            )));
        }
        let epoch = existing.iter().map(|h| h.epoch).max().unwrap_or(1);
        let fresh = New {
            set_id,
            block_size,
            blocks,
            file_len,
            epoch: existing.is_empty().then_some(epoch),
        };
        let mut mirrors = Vec::new();
        for (i, (f, h)) in files.into_iter().zip(&headers).enumerate() {
            let state = initial_state(f.as_ref(), h.as_ref(), i, epoch, &fresh)?;
            if let MirrorState::Failed(why) = &state {
                warn!("mirror {}: {why}", paths[i].display());
            }
            mirrors.push(Mirror {
                path: paths[i].clone(),
                file: f,
                state: Mutex::new(state),
                inject_eio: AtomicBool::new(false),
            });
        }
        let set = Self {
            block_size,
            blocks,
            set_id,
            epoch: AtomicU64::new(epoch),
            mirrors,
            io: RwLock::new(()),
            repairs: AtomicU64::new(0),
            repair_failures: AtomicU64::new(0),
            rebuilding: Mutex::new(None),
            meta: Mutex::new(()),
            meta_off,
            file_len,
            record: Mutex::new(None),
            scrubbed: AtomicU64::new(0),
        };
        set.load_meta();
        Ok(set)
    }
}

/// The header of the file at `p`, `None` if the file is empty (a new mirror), or why it
/// is not a mirror of this geometry.
fn read_header(
    p: &Path,
    f: &dyn Disk,
    blocks: u64,
    block_size: u32,
) -> Result<Option<Header>, MediaError> {
    let len = f.size()?;
    if len == 0 {
        return Ok(None);
    }
    if len < HEADER_LEN {
        return Err(MediaError::Failed(format!(
            "{}: not an ftss mirror file ({len} bytes, no header)",
            p.display()
        )));
    }
    let mut h = vec![0u8; HEADER_LEN as usize];
    f.read_at(&mut h, 0)?;
    let hd =
        parse_header(&h).map_err(|why| MediaError::Failed(format!("{}: {why}", p.display())))?;
    if hd.block_size != block_size || hd.blocks != blocks {
        return Err(MediaError::Failed(format!(
            "{}: mirror holds {} blocks of {} bytes, the configuration says {blocks} of {block_size}",
            p.display(),
            hd.blocks,
            hd.block_size
        )));
    }
    Ok(Some(hd))
}

/// What a file without a header is made into.
struct New {
    set_id: [u8; 16],
    block_size: u32,
    blocks: u64,
    file_len: u64,
    /// The epoch when the whole set is new (its files start healthy), `None` when the set
    /// has data (a new file starts failed, at epoch 0, until rebuilt).
    epoch: Option<u64>,
}

/// The state mirror `i` starts in: healthy only if whole and at the set's `epoch`. A file
/// without a header (`h`) gets one here.
fn initial_state(
    f: &dyn Disk,
    h: Option<&Header>,
    i: usize,
    epoch: u64,
    new: &New,
) -> Result<MirrorState, MediaError> {
    let len = f.size()?;
    let file_len = new.file_len;
    Ok(match h {
        Some(_) if len != file_len => MirrorState::Failed(format!(
            "holds {len} bytes, a mirror of this set holds {file_len}: truncated?"
        )),
        Some(h) if h.epoch == epoch => MirrorState::Healthy,
        Some(h) => MirrorState::Failed(format!("stale: epoch {} < {epoch}", h.epoch)),
        None => {
            f.set_size(file_len)?;
            f.write_at(
                &header(
                    &new.set_id,
                    i as u32,
                    new.block_size,
                    new.blocks,
                    new.epoch.unwrap_or(0),
                ),
                0,
            )?;
            f.sync()?;
            if new.epoch.is_some() {
                MirrorState::Healthy
            } else {
                MirrorState::Failed("new mirror: needs a rebuild".into())
            }
        }
    })
}
