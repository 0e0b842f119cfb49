//! What the integration tests of `ftss-target` and `ftss-initiator` share, so each test
//! file keeps only what it is about.
//!
//! `daemon.rs` starts a daemon: in-process ([`Daemon`], from a configuration text or the
//! standard one-LUN configuration of [`daemon()`]) or the real binary ([`start_binary`]),
//! on free loopback ports with its data in a [`temp_dir`]. `raw.rs` is a PDU-level client
//! ([`Raw`]) for protocol tests that break the rules on purpose and see exactly what the
//! target sends back. `wire.rs` reads whole PDUs off a stream with `ftss_proto`'s frame
//! decoder, for [`Raw`] and for scripted targets.
//!
//! A dev-dependency only, and only of integration tests: it links the `ftss-target`
//! library, which inside that crate's own unit tests would be a second, different copy.

mod daemon;
mod raw;
mod wire;

pub use daemon::{daemon, daemon_with, free_port, start_binary, temp_dir, Daemon};
pub use raw::{data_sn0, kv, parse_kv, read10, write10, Raw, INITIATOR, TARGET, TUR};
pub use wire::read_frame;
