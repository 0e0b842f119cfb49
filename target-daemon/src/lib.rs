//! The ftss iSCSI target daemon as a library, so integration tests can start it in-process.
//!
//! Seams (see ARCHITECTURE.md): [`startup`] opens everything the daemon serves and hands
//! it over, [`iscsi`] owns connections and sessions, [`scsi`] executes commands without
//! knowing the transport, [`media`] stores blocks.

pub mod admin;
pub mod config;
mod counters;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod iscsi;
pub mod link_unit;
pub mod media;
pub mod metrics;
pub mod reload;
pub mod routing;
pub mod runtime_luns;
pub mod scsi;
pub mod service;
pub mod startup;
