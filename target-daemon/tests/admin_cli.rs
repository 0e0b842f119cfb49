//! `ftss-target admin` through the real binary: the listings a script reads (`--json`)
//! and the ones a person reads, while an initiator is logged in.

use std::path::{Path, PathBuf};
use std::process::Command;

use ftss_initiator::{Session, SessionConfig};
use ftss_test_support::{free_port, start_binary, temp_dir};

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
    let mut child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
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
        assert!(v["cache"]["commit_wait_max_us"].as_u64().is_some(), "{v}");
        assert!(v["cache"]["space_wait_max_us"].as_u64().is_some(), "{v}");
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

/// Runs `admin <args>` expecting failure; returns its stderr.
fn admin_fails(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ftss-target"))
        .arg("--config")
        .arg(config)
        .arg("admin")
        .args(args)
        .output()
        .expect("run ftss-target admin");
    assert!(!out.status.success(), "admin {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_lun_added_at_run_time_is_served_grown_kept_across_a_restart_and_removed() {
    let dir = temp_dir("admin-luns");
    let port = free_port();
    let config = write_config(&dir, port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let login = || {
        rt.block_on(async {
            Session::connect(addr, SessionConfig::new(INITIATOR, Some(TARGET)))
                .await
                .expect("login")
        })
    };
    let mut child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let s = login();
        assert_eq!(
            rt.block_on(s.report_luns()).expect("REPORT LUNS"),
            vec![0, 3]
        );
        // The new nexus's POWER ON first, so what follows the add is the add's.
        rt.block_on(s.test_unit_ready(0)).expect("TUR");
        let out = admin(&config, &["luns", "add", TARGET, "7", "1MiB"]);
        assert!(
            out.starts_with(&format!("ok added {TARGET}/7 path=")),
            "{out}"
        );
        let e = admin_fails(&config, &["luns", "add", TARGET, "7", "1MiB"]);
        assert!(e.contains("already has LUN 7"), "{e}");
        // The logged-in session hears of it, then sees it.
        let r = rt.block_on(s.execute(0, &[0u8; 6], None, 0)).expect("TUR");
        let sense = r.sense.as_ref().map(|k| (k.key, k.asc, k.ascq));
        assert_eq!(
            sense,
            Some((6, 0x3f, 0x0e)),
            "REPORTED LUNS DATA HAS CHANGED"
        );
        assert_eq!(
            rt.block_on(s.report_luns()).expect("REPORT LUNS"),
            vec![0, 3, 7]
        );
        let cap = rt.block_on(s.read_capacity16(7)).expect("capacity");
        assert_eq!(cap.blocks, 2048);
        // Grown while in use: the session hears CAPACITY DATA HAS CHANGED on it.
        rt.block_on(s.test_unit_ready(7)).expect("TUR");
        let out = admin(&config, &["luns", "resize", TARGET, "7", "2MiB"]);
        assert!(out.starts_with(&format!("ok resized {TARGET}/7")), "{out}");
        let e = admin_fails(&config, &["luns", "resize", TARGET, "7", "1MiB"]);
        assert!(e.contains("only grows"), "{e}");
        let r = rt.block_on(s.execute(7, &[0u8; 6], None, 0)).expect("TUR");
        let sense = r.sense.as_ref().map(|k| (k.key, k.asc, k.ascq));
        assert_eq!(sense, Some((6, 0x2a, 0x09)), "CAPACITY DATA HAS CHANGED");
        let cap = rt.block_on(s.read_capacity16(7)).expect("capacity");
        assert_eq!(cap.blocks, 4096);
        let e = admin_fails(&config, &["luns", "remove", TARGET, "7"]);
        assert!(e.contains("sessions logged in"), "{e}");
        let e = admin_fails(&config, &["luns", "remove", TARGET, "0"]);
        assert!(e.contains("not added at run time"), "{e}");
        rt.block_on(s.logout()).expect("logout");

        // A restart serves it again; the configuration file was not touched.
        let _ = child.kill();
        let _ = child.wait();
        assert!(!std::fs::read_to_string(&config)
            .expect("config")
            .contains("lun = 7"));
        child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
        let s = login();
        assert_eq!(
            rt.block_on(s.report_luns()).expect("REPORT LUNS"),
            vec![0, 3, 7]
        );
        let cap = rt.block_on(s.read_capacity16(7)).expect("capacity");
        assert_eq!(cap.blocks, 4096, "the grown size after the restart");
        let effective = admin(&config, &["config", "--effective"]);
        assert!(
            effective.contains(&format!("# lun {TARGET}/7 ")),
            "{effective}"
        );
        let v = json(&config, &["config", "--effective", "--json"]);
        assert_eq!(v["runtime"]["luns"][0]["lun"], 7, "{v}");
        rt.block_on(s.logout()).expect("logout");

        let out = admin(&config, &["luns", "remove", TARGET, "7"]);
        assert!(out.starts_with(&format!("ok removed {TARGET}/7")), "{out}");
        let s = login();
        assert_eq!(
            rt.block_on(s.report_luns()).expect("REPORT LUNS"),
            vec![0, 3]
        );
        rt.block_on(s.logout()).expect("logout");
        let _ = child.kill();
        let _ = child.wait();
        child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
        let s = login();
        assert_eq!(
            rt.block_on(s.report_luns()).expect("REPORT LUNS"),
            vec![0, 3],
            "removal survives a restart"
        );
        rt.block_on(s.logout()).expect("logout");
    }));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
