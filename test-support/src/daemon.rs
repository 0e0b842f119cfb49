//! Daemons for tests: in-process on a free loopback port, or the real binary.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftss_target::config::Config;
use ftss_target::startup::Server;

use crate::raw::TARGET;

/// An in-process daemon whose data lives in `dir`, removed when it drops.
pub struct Daemon {
    /// The running server; `None` while a test has it stopped (to restart it on `dir`).
    pub server: Option<Server>,
    /// Its first portal.
    pub addr: SocketAddr,
    /// Its data directory.
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts a daemon from the configuration `text`, whose `data_dir` should be `dir`.
    pub async fn start(dir: PathBuf, text: &str) -> Daemon {
        let config = Config::parse(text).expect("test config");
        let server = Server::start(config).await.expect("daemon starts");
        let addr = server.local_addrs()[0];
        Daemon {
            server: Some(server),
            addr,
            dir,
        }
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("daemon running")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory under the system temp dir, unique per process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ftss-test-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A daemon serving [`TARGET`] with one 16 MiB LUN, `extra` added to `[server]`.
pub async fn daemon_with(tag: &str, extra: &str) -> Daemon {
    let dir = temp_dir(tag);
    let text = format!(
        r#"
[server]
portals = ["127.0.0.1:0"]
data_dir = "{}"
nop_interval_s = 60
{extra}
[[target]]
iqn = "{TARGET}"
[[target.lun]]
lun = 0
path = "lun0.img"
size = "16MiB"
"#,
        dir.display()
    );
    Daemon::start(dir, &text).await
}

/// [`daemon_with`] nothing extra.
pub async fn daemon(tag: &str) -> Daemon {
    daemon_with(tag, "").await
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts the daemon binary `bin` with `config` and waits until its portal on `port`
/// accepts. `bin` is the caller's `env!("CARGO_BIN_EXE_ftss-target")`: cargo tells only
/// the tests of the binary's own crate where it is.
pub fn start_binary(bin: impl AsRef<OsStr>, config: &Path, port: u16) -> std::process::Child {
    let child = std::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start ftss-target");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
