//! `ftss-target admin` through the real binary: the listings a script reads (`--json`)
//! and the ones a person reads, while an initiator is logged in.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{free_port, start_binary, temp_dir};
use ftss_initiator::{Session, SessionConfig};

const TARGET: &str = "iqn.2026-12.org.ftss:admin";
const INITIATOR: &str = "iqn.2026-12.org.ftss:admin-init";

fn write_config(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:{port}"]
data_dir = "{}"
[media]
cache_size = "8MiB"
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "8MiB"
[[target.lun]]
lun = 3
path = "lun3.img"
size = "4MiB"
initiators = ["{INITIATOR}"]
[packets]
size = "16MiB"
[[node]]
initiator = "{INITIATOR}"
addresses = ["10.0.0.1"]
"#,
        dir.display()
    );
    let path = dir.join("ftss.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// Runs `ftss-target --config <config> admin <args>` and returns its stdout; panics on
/// a failed exit.
fn admin(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ftss-target"))
        .arg("--config")
        .arg(config)
        .arg("admin")
        .args(args)
        .output()
        .expect("run ftss-target admin");
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = admin(config, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin {args:?}: {e}: {out:?}"))
}

#[test]
fn listings_show_the_live_session_in_text_and_json() {
    let dir = temp_dir("admin-cli");
    let port = free_port();
    let config = write_config(&dir, port);
    let mut child = start_binary(&config, port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let session = rt.block_on(async {
        Session::connect(addr, SessionConfig::new(INITIATOR, Some(TARGET)))
            .await
            .expect("login")
    });
    let result = std::panic::catch_unwind(|| {
        let v = json(&config, &["sessions", "--json"]);
        let list = v["sessions"].as_array().expect("sessions array");
        assert_eq!(list.len(), 1, "{v}");
        let s = &list[0];
        assert_eq!(s["initiator"], INITIATOR);
        assert_eq!(s["target"], TARGET);
        assert_eq!(s["tsih"], u64::from(session.tsih()));
        assert_eq!(s["isid"].as_str().map(str::len), Some(12), "{s}");
        assert!(
            s["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{s}"
        );
        assert!(s["since_unix_s"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000));
        let text = admin(&config, &["sessions"]);
        assert!(
            text.starts_with(&format!(
                "session tsih={} initiator={INITIATOR} ",
                session.tsih()
            )),
            "{text}"
        );

        let v = json(&config, &["--json", "queues"]);
        let q = &v["queues"][0];
        assert_eq!(q["node"], "10.0.0.1", "{v}");
        assert_eq!(q["queued_packets"], 0);
        assert_eq!(q["quota_used"], 0.0);
        assert!(admin(&config, &["queues"]).starts_with("queue 10.0.0.1 packets=0 bytes=0"));

        let v = json(&config, &["luns", "--json"]);
        let luns = v["luns"].as_array().expect("luns array");
        assert_eq!(luns.len(), 2, "{v}");
        assert_eq!(luns[0]["lun"], 0);
        assert_eq!(luns[0]["blocks"], 8 * 1024 * 1024 / 512);
        assert_eq!(luns[0]["initiators"], serde_json::Value::Null);
        assert_eq!(luns[1]["lun"], 3);
        assert_eq!(luns[1]["initiators"][0], INITIATOR);
        let text = admin(&config, &["luns"]);
        assert!(
            text.contains(&format!(
                "lun {TARGET}/3 blocks=8192 block_size=512 read_only=false initiators={INITIATOR}"
            )),
            "{text}"
        );

        let v = json(&config, &["status", "--json"]);
        assert!(v["cache"]["ring_bytes"].as_u64().is_some(), "{v}");
        let v = json(&config, &["nodes", "--json"]);
        assert_eq!(v["nodes"][0]["initiator"], INITIATOR, "{v}");
        assert_eq!(v["nodes"][0]["addrs"][0], "10.0.0.1", "{v}");
    });
    rt.block_on(async {
        let _ = session.logout().await;
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
