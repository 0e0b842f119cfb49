//! The admin socket's line protocol (`ftss-target admin ...`): one request line, as the
//! socket reads it (at most 4 KiB, trimmed), against a daemon with a mirrored volume, a
//! write cache, a routing agent and a session. Invariants: every answer is `ok` or
//! `error` and ends with a newline, a JSON answer is one valid JSON document, and no
//! request changes the mirrors' health.
#![no_main]

use std::sync::{Arc, OnceLock};

use ftss_fuzz::{open_system, System};
use ftss_target::admin::MediaHandles;
use ftss_target::media::disk::SimFs;
use ftss_target::media::mirror::MirrorState;
use libfuzzer_sys::fuzz_target;

struct Daemon {
    sys: System,
    handle: Box<dyn Fn(&str) -> String + Send + Sync>,
}

fn daemon() -> &'static Daemon {
    static D: OnceLock<Daemon> = OnceLock::new();
    D.get_or_init(|| {
        let sys = open_system(&SimFs::new(3), true).expect("fresh system");
        let media = MediaHandles {
            cache: Some(Arc::clone(&sys.cache)),
            cache_mode: "nonvolatile".into(),
            volumes: vec![(
                "iqn.2026-11.org.ftss:fuzz/0".into(),
                Arc::clone(&sys.lun_set),
            )],
            rebuild_rate: 1 << 20,
            agent: Some(Arc::clone(&sys.agent)),
        };
        Daemon {
            sys,
            handle: Box::new(ftss_target::fuzzing::admin(media)),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(4096)];
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let line = line.lines().next().unwrap_or("").trim();
    let d = daemon();
    let answer = (d.handle)(line);
    assert!(
        answer.starts_with("ok") || answer.starts_with("error"),
        "{line:?} -> {answer:?}"
    );
    assert!(answer.ends_with('\n'), "{line:?} -> {answer:?}");
    if line.split_whitespace().next() == Some("json") {
        if let Some(body) = answer.strip_prefix("ok\n") {
            let _: serde_json::Value = serde_json::from_str(body).expect("one JSON document");
        }
    }
    for m in d.sys.lun_set.status() {
        assert!(
            matches!(m.state, MirrorState::Healthy),
            "{line:?} changed a mirror: {:?}",
            m.state
        );
    }
});
