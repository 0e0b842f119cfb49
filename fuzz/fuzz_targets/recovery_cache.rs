//! Recovery from a corrupted image: the write cache's superblocks and journal records (data not yet destaged).
//! The image is a system with LUN writes, registered nodes, packets and ACKs, stopped
//! cleanly; the fuzzer overwrites bytes of it, then the daemon's recovery opens it.
//! Invariants: recovery either refuses the image with an error or opens it, never
//! panics; an untouched image recovers; after a recovery, reading the whole LUN and
//! every node's RECEIVE and REPLAY answer well-formed outcomes.
#![no_main]

use ftss_fuzz::{base_image_cached, corrupt, exercise_recovered, open_system, Input};
use ftss_target::media::disk::SimFs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut image = base_image_cached(false).clone();
    let mut input = Input::new(data);
    corrupt(&mut image, &["cache"], &mut input);
    let fs = SimFs::from_snapshot(11, image);
    match open_system(&fs, false) {
        Ok(sys) => exercise_recovered(&sys),
        Err(e) => assert!(
            !data.is_empty(),
            "an untouched image failed to recover: {e}"
        ),
    }
});
