//! SIGHUP through the real binary: the file is read again and its ACLs and CHAP secrets
//! govern the logins that follow, while the sessions already logged in go on; a file
//! that does not validate changes nothing and the log names the key at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftss_initiator::{ChapCredentials, Session, SessionConfig};
use ftss_test_support::{free_port, read10, temp_dir};

const TARGET: &str = "iqn.2026-12.org.ftss:reload";
const X: &str = "iqn.2026-12.org.ftss:x";
const Y: &str = "iqn.2026-12.org.ftss:y";

/// The config with `acl` as the target's `initiators` and `extra` after it (a
/// `[target.chap]` table).
fn write_config(dir: &Path, port: u16, acl: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:{port}"]
data_dir = "{}"
[[target]]
iqn = "{TARGET}"
initiators = [{acl}]
{extra}
[[target.lun]]
lun = 0
path = "lun0.img"
size = "4MiB"
"#,
        dir.display()
    );
    let path = dir.join("ftss.toml");
    // Written aside and renamed: the daemon never reads half a file.
    let tmp = dir.join("ftss.toml.tmp");
    std::fs::write(&tmp, text).expect("config");
    std::fs::rename(&tmp, &path).expect("config in place");
    path
}

struct Daemon {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: PathBuf, config: &Path, port: u16) -> Daemon {
        let log = dir.join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_ftss-target"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start ftss-target");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        Daemon {
            child,
            log,
            addr,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGHUP and waits for the `n`th log line containing `marker`.
    fn hup_and_wait(&self, marker: &str, n: usize) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(r, 0, "kill SIGHUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(marker).count() < n {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn as_initiator(name: &str, chap: Option<&str>) -> SessionConfig {
    let mut c = SessionConfig::new(name, Some(TARGET));
    c.chap = chap.map(|s| ChapCredentials {
        username: "reload-user".into(),
        secret: s.as_bytes().to_vec(),
        mutual: None,
    });
    c.timeout = Duration::from_secs(10);
    c
}

/// A READ of block 0 that ends GOOD (after the new nexus's one unit attention).
async fn read_ok(s: &Session) {
    for _ in 0..3 {
        let r = s.execute(0, &read10(0, 1), None, 512).await.expect("READ");
        if r.status == 0 {
            return;
        }
        assert!(
            r.sense.as_ref().is_some_and(|k| k.key == 6),
            "{:?}",
            r.sense
        );
    }
    panic!("READ did not succeed");
}

#[test]
fn an_acl_change_admits_new_logins_by_the_file_while_the_session_stays_up() {
    let dir = temp_dir("reload-acl");
    let port = free_port();
    let config = write_config(&dir, port, &format!("\"{X}\""), "");
    let d = Daemon::start(dir.clone(), &config, port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let x = Session::connect(d.addr, as_initiator(X, None))
            .await
            .expect("X is in the ACL");
        read_ok(&x).await;
        assert!(
            Session::connect(d.addr, as_initiator(Y, None))
                .await
                .is_err(),
            "Y is not in the ACL yet"
        );

        write_config(&dir, port, &format!("\"{Y}\""), "");
        d.hup_and_wait("reloaded", 1);
        read_ok(&x).await;
        assert!(!x.is_closed(), "X's session stays up");
        assert!(
            Session::connect(d.addr, as_initiator(X, None))
                .await
                .is_err(),
            "a new login as X is refused"
        );
        let y = Session::connect(d.addr, as_initiator(Y, None))
            .await
            .expect("Y is admitted now");
        read_ok(&y).await;
        let out = Command::new(env!("CARGO_BIN_EXE_ftss-target"))
            .arg("--config")
            .arg(&config)
            .args(["admin", "config", "--effective"])
            .output()
            .expect("admin config");
        let effective = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            effective.contains(&format!("initiators = [\"{Y}\"]")),
            "{effective}"
        );

        // An invalid file: nothing changes, the key at fault is in the log.
        let bad = std::fs::read_to_string(&config)
            .expect("config")
            .replace("size = \"4MiB\"", "size = \"4MiB\"\nblock_size = 513");
        std::fs::write(&config, bad).expect("bad config");
        d.hup_and_wait("reload refused", 1);
        assert!(
            d.log()
                .contains("reload refused: target[0].lun[0].block_size:"),
            "{}",
            d.log()
        );
        read_ok(&x).await;
        read_ok(&y).await;
        Session::connect(d.addr, as_initiator(Y, None))
            .await
            .expect("the running ACL still admits Y");
        assert!(
            Session::connect(d.addr, as_initiator(X, None))
                .await
                .is_err(),
            "and still refuses X"
        );

        // Storage changes refuse the reload too, naming the key.
        let resized = write_config(&dir, port, &format!("\"{Y}\""), "");
        let t = std::fs::read_to_string(&resized).expect("config");
        std::fs::write(&resized, t.replace("4MiB", "8MiB")).expect("resized config");
        d.hup_and_wait("reload refused", 2);
        assert!(
            d.log().contains("reload refused: target[0].lun[0].size:"),
            "{}",
            d.log()
        );
        let _ = x.logout().await;
        let _ = y.logout().await;
    });
    // The story of the run, for `--nocapture`.
    eprintln!("{}", d.log());
}

#[test]
fn a_chap_secret_change_takes_effect_for_new_logins() {
    let dir = temp_dir("reload-chap");
    let port = free_port();
    let chap = |secret: &str| {
        format!("[target.chap]\nusername = \"reload-user\"\nsecret = \"{secret}\"\n")
    };
    let config = write_config(&dir, port, &format!("\"{X}\""), &chap("first-secret-1"));
    let d = Daemon::start(dir.clone(), &config, port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let s = Session::connect(d.addr, as_initiator(X, Some("first-secret-1")))
            .await
            .expect("the first secret");
        write_config(&dir, port, &format!("\"{X}\""), &chap("second-secret-2"));
        d.hup_and_wait("reloaded", 1);
        assert!(
            Session::connect(d.addr, as_initiator(X, Some("first-secret-1")))
                .await
                .is_err(),
            "the old secret no longer logs in"
        );
        let s2 = Session::connect(d.addr, as_initiator(X, Some("second-secret-2")))
            .await
            .expect("the new secret");
        read_ok(&s).await;
        read_ok(&s2).await;
        let _ = s.logout().await;
        let _ = s2.logout().await;
    });
}

#[test]
fn a_lun_new_in_the_file_is_served_after_sighup_and_the_session_hears_of_it() {
    let dir = temp_dir("reload-lun");
    let port = free_port();
    let acl = format!("\"{X}\"");
    let config = write_config(&dir, port, &acl, "");
    let d = Daemon::start(dir.clone(), &config, port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let x = Session::connect(d.addr, as_initiator(X, None))
            .await
            .expect("login");
        read_ok(&x).await;
        assert_eq!(x.report_luns().await.expect("REPORT LUNS"), vec![0]);
        let t = std::fs::read_to_string(&config).expect("config");
        std::fs::write(
            &config,
            format!("{t}[[target.lun]]\nlun = 2\npath = \"lun2.img\"\nsize = \"1MiB\"\n"),
        )
        .expect("config with LUN 2");
        d.hup_and_wait("reloaded", 1);
        assert!(d.log().contains("LUN added by reload"), "{}", d.log());
        // The session is told the inventory changed, then sees the new LUN.
        let tur = [0u8; 6];
        let r = x.execute(0, &tur, None, 0).await.expect("TUR");
        let s = r.sense.as_ref().map(|s| (s.key, s.asc, s.ascq));
        assert_eq!(s, Some((6, 0x3f, 0x0e)), "REPORTED LUNS DATA HAS CHANGED");
        assert_eq!(x.report_luns().await.expect("REPORT LUNS"), vec![0, 2]);
        x.test_unit_ready(2).await.expect("LUN 2 ready");
        let cap = x.read_capacity16(2).await.expect("capacity");
        assert_eq!(cap.blocks, 1024 * 1024 / 512, "{cap:?}");
        // A second reload of the same file adds nothing and refuses nothing.
        d.hup_and_wait("reloaded", 2);
        assert!(!d.log().contains("reload refused"), "{}", d.log());
        let _ = x.logout().await;
    });
}
