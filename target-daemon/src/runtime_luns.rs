//! LUNs added at run time (`admin luns add`), kept in `runtime-luns.toml` in the data
//! directory so a restart serves them again. The operator's configuration file is never
//! written: what the admin socket changed lives here, and `admin config --effective`
//! shows both.
//!
//! The file is replaced whole (temp file, fsync, rename, fsync of the directory), so a
//! crash leaves the old list or the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::media::file::FileStore;
use crate::media::BlockStore;
use crate::scsi::LunSpec;

/// The state file's name in the data directory.
pub const FILE_NAME: &str = "runtime-luns.toml";

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// One LUN added at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeLun {
    /// The target's IQN.
    pub target: String,
    /// LUN number.
    pub lun: u16,
    /// Backing file, relative to the data directory unless absolute.
    pub path: PathBuf,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
}

impl RuntimeLun {
    /// Opens its file in `data_dir` (unless the path is absolute), creating it when new.
    pub(crate) fn open(&self, data_dir: &Path) -> Result<Arc<dyn BlockStore>, String> {
        let path = if self.path.is_absolute() {
            self.path.clone()
        } else {
            data_dir.join(&self.path)
        };
        Ok(Arc::new(
            FileStore::open(&path, self.size_bytes, self.block_size)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        ))
    }

    /// The SCSI layer's view of it over `store`: every initiator the target admits sees
    /// it.
    pub(crate) fn spec(&self, store: Arc<dyn BlockStore>) -> LunSpec {
        LunSpec {
            lun: u64::from(self.lun),
            store,
            read_only: false,
            removable: false,
            initiators: None,
            physical_block_size: None,
        }
    }
}

/// Everything the admin socket changed that outlives the process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeState {
    /// Format version; this build writes and reads 1.
    pub version: u32,
    /// LUNs added, in the order they were added.
    #[serde(default, rename = "lun")]
    pub luns: Vec<RuntimeLun>,
}

impl RuntimeState {
    /// The state file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE_NAME)
    }

    /// Reads the state in `data_dir`; none yet is an empty state.
    pub fn load(data_dir: &Path) -> Result<Self, RuntimeError> {
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(RuntimeError::Io { path, source }),
        };
        let s: Self = toml::from_str(&text).map_err(|e| RuntimeError::Parse {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if s.version != 1 {
            return Err(RuntimeError::Parse {
                path,
                msg: format!("version {}, this build reads 1", s.version),
            });
        }
        Ok(s)
    }

    /// Replaces the state in `data_dir` with this one, durably.
    pub fn store(&self, data_dir: &Path) -> Result<(), RuntimeError> {
        let path = Self::path(data_dir);
        let mut s = self.clone();
        s.version = 1;
        let text = toml::to_string(&s).map_err(|e| RuntimeError::Parse {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let body = format!("# Written by ftss-target (admin luns); not for editing.\n{text}");
        crate::scsi::pr::write_atomic(&path, body.as_bytes())
            .map_err(|source| RuntimeError::Io { path, source })
    }

    /// The entry for `target`'s LUN `lun`, if it was added at run time.
    pub fn position(&self, target: &str, lun: u16) -> Option<usize> {
        self.luns
            .iter()
            .position(|l| l.lun == lun && l.target.eq_ignore_ascii_case(target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_file_and_refuses_other_versions() {
        let dir = std::env::temp_dir().join(format!("ftss-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(
            RuntimeState::load(&dir).expect("none yet"),
            RuntimeState::default()
        );
        let s = RuntimeState {
            version: 1,
            luns: vec![RuntimeLun {
                target: "iqn.2026-12.x:t".into(),
                lun: 3,
                path: "runtime-lun3.img".into(),
                size_bytes: 1 << 20,
                block_size: 512,
            }],
        };
        s.store(&dir).expect("stored");
        assert_eq!(RuntimeState::load(&dir).expect("read back"), s);
        assert_eq!(s.position("IQN.2026-12.X:T", 3), Some(0));
        assert_eq!(s.position("iqn.2026-12.x:t", 4), None);
        std::fs::write(RuntimeState::path(&dir), "version = 2\n").expect("write");
        assert!(RuntimeState::load(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
