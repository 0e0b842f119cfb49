//! ftss initiator library: a userspace iSCSI initiator (RFC 7143) on tokio.
//!
//! [`Session::connect`] logs in (CHAP optional, digests optional) and returns a session
//! that many tasks may use at once through `Arc<Session>`: commands are queued up to the
//! target's CmdSN window. [`Session::execute`] runs any CDB; [`scsi`] adds the common
//! block commands. A session with no target name is a discovery session for
//! [`Session::send_targets`].
//!
//! [`PacketClient`] sends and receives network packets through the target's vendor
//! commands over any [`Transport`] ([`IscsiTransport`]: a session and a LUN; on Linux
//! also `SgTransport`: SG_IO on a LUN the kernel's initiator logged in to), and
//! [`Receiver`] turns RECEIVE and ACK into an exactly-once stream of records.
//!
//! Wire formats, negotiation, CHAP and the connection's protocol state
//! (`ftss_proto::initiator`: CmdSN window, data transfer, pings) come from `ftss_proto`;
//! this crate only owns the socket, the tasks, the clock and the callers. Error recovery level is 0: any connection-level
//! fault ends the session and every waiting request gets [`Error::ConnectionClosed`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), ftss_initiator::Error> {
//! use std::sync::Arc;
//! use ftss_initiator::{Session, SessionConfig};
//!
//! let addr = "127.0.0.1:3260".parse().expect("address");
//! let config = SessionConfig::new("iqn.2026-11.org.example:host", Some("iqn.2026-11.org.ftss:target0"));
//! let s = Arc::new(Session::connect(addr, config).await?);
//! let cap = s.read_capacity16(0).await?;
//! let block = s.read16(0, 0, 1, cap.block_size).await?;
//! s.write16(0, 0, block, cap.block_size).await?;
//! s.logout().await?;
//! # Ok(())
//! # }
//! ```
// Deny rather than forbid: the SG_IO transport and the TUN device need ioctl calls, and
// only those modules may opt out, with a SAFETY note at each.
#![deny(unsafe_code)]

mod config;
mod error;
mod login;
pub mod multipath;
pub mod packet;
pub mod scsi;
mod session;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub mod sg;
pub mod transport;
#[cfg(target_os = "linux")]
pub mod tun;
mod wire;

pub use config::{ChapCredentials, Digest, MutualChap, SessionConfig};
pub use error::Error;
pub use packet::{Delivered, Destination, OutPacket, PacketClient, Receiver, SendStats};
pub use scsi::{Capacity, Inquiry, ScsiResult};
pub use session::Session;
#[cfg(target_os = "linux")]
pub use sg::SgTransport;
pub use transport::{IscsiTransport, Transport};
// The vendor types the packet API returns, so users need not depend on ftss-proto.
pub use ftss_proto::vendor::{
    DeliveryFlags, NodeInfo, NodeState, Outcome, QueueStats, ReplayFrom, RouteEntry, RouteList,
    RouteState,
};
