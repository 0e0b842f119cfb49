//! Opening a set: reading each file's header, refusing files of another set or geometry,
//! and deciding which mirrors are current (highest epoch) and which need a rebuild.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
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
            let p = &p;
            let len = f.size()?;
            if len == 0 {
                headers.push(None);
            } else if len < HEADER_LEN {
                return Err(MediaError::Failed(format!(
                    "{}: not an ftss mirror file ({len} bytes, no header)",
                    p.display()
                )));
            } else {
                let mut h = vec![0u8; HEADER_LEN as usize];
                f.read_at(&mut h, 0)?;
                let hd = parse_header(&h)
                    .map_err(|why| MediaError::Failed(format!("{}: {why}", p.display())))?;
                if hd.block_size != block_size || hd.blocks != blocks {
                    return Err(MediaError::Failed(format!(
                        "{}: mirror holds {} blocks of {} bytes, the configuration says {blocks} of {block_size}",
                        p.display(),
                        hd.blocks,
                        hd.block_size
                    )));
                }
                headers.push(Some(hd));
            }
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
        let fresh_set = existing.is_empty();
        let mut mirrors = Vec::new();
        for (i, (f, h)) in files.into_iter().zip(&headers).enumerate() {
            let len = f.size()?;
            let state = match h {
                Some(_) if len != file_len => MirrorState::Failed(format!(
                    "holds {len} bytes, a mirror of this set holds {file_len}: truncated?"
                )),
                Some(h) if h.epoch == epoch => MirrorState::Healthy,
                Some(h) => MirrorState::Failed(format!("stale: epoch {} < {epoch}", h.epoch)),
                None => {
                    f.set_size(file_len)?;
                    f.write_at(
                        &header(
                            &set_id,
                            i as u32,
                            block_size,
                            blocks,
                            if fresh_set { epoch } else { 0 },
                        ),
                        0,
                    )?;
                    f.sync()?;
                    if fresh_set {
                        MirrorState::Healthy
                    } else {
                        MirrorState::Failed("new mirror: needs a rebuild".into())
                    }
                }
            };
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
