//! ftss initiator library: a userspace iSCSI initiator and the packet API on top of it.
//!
//! Not yet written; see the open issues.
