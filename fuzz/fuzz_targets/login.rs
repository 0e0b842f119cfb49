//! The target's whole login phase (security and operational stages, discovery and
//! normal sessions, continuations), driven by the frames an initiator would send. Byte 0:
//! bit 0 requires CHAP (with secrets the input cannot know), bit 1 restricts the target to
//! one initiator name. The invariants are checked inside
//! `ftss_target::fuzzing::login`: responses round-trip, StatSN rises by one, success and
//! failure are announced as RFC 7143 says, CHAP and the ACL are never bypassed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, frames)) = data.split_first() else {
        return;
    };
    let _ = ftss_target::fuzzing::login(flags & 1 != 0, flags & 2 != 0, frames);
});
