//! Host safety of the real `ftss-target` binary: its data directory is owner-only (0700,
//! an existing looser one is tightened), the files it creates there (mirrors, write cache,
//! plain-file LUNs) and its admin socket are 0600, and the admin socket answers only root
//! and the daemon's own user, whatever the socket's file permissions say.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ftss_test_support::*;

/// A user that is neither root nor the daemon's (the tests run as root).
const NOBODY: u32 = 65534;

/// The permission bits of `p`, in octal.
fn mode(p: &Path) -> String {
    let m = std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode();
    format!("{:o}", m & 0o777)
}

struct Daemon {
    child: Child,
    data: PathBuf,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `dir/ftss.toml` with its data directory `dir/data` and waits for
/// its admin socket.
fn start(dir: &Path) -> Daemon {
    let data = dir.join("data");
    let config = dir.join("ftss.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[server]\nportals = [\"127.0.0.1:{port}\"]\ndata_dir = \"{}\"\n\
             [media]\ncache_size = \"4MiB\"\n\
             [[target]]\niqn = \"{TARGET}\"\n\
             [[target.lun]]\nlun = 0\nmirrors = [\"a.mirror\", \"b.mirror\"]\nsize = \"2MiB\"\n\
             [[target.lun]]\nlun = 1\npath = \"plain.img\"\nsize = \"1MiB\"\n",
            data.display()
        ),
    )
    .expect("config");
    let child = start_binary(env!("CARGO_BIN_EXE_ftss-target"), &config, port);
    let socket = data.join("ftss-admin.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no admin socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        data,
        socket,
    }
}

#[test]
fn the_data_directory_its_files_and_the_admin_socket_are_owner_only() {
    let dir = temp_dir("perms");
    let d = start(&dir);
    assert_eq!(mode(&d.data), "700", "a new data directory");
    for f in ["a.mirror", "b.mirror", "write-cache", "plain.img"] {
        assert_eq!(mode(&d.data.join(f)), "600", "{f}");
    }
    assert_eq!(mode(&d.socket), "600", "the admin socket");
    drop(d);

    // A data directory others may enter is tightened at the next start.
    std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o755))
        .expect("loosen");
    let d = start(&dir);
    assert_eq!(mode(&d.data), "700", "an existing 0755 data directory");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `ftss-target admin --socket SOCKET status` as `uid`.
fn admin_status_as(socket: &Path, uid: u32) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftss-target"))
        .args(["admin", "--socket"])
        .arg(socket)
        .arg("status")
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run ftss-target admin");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_admin_socket_refuses_other_users() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching to another user needs root");
        return;
    }
    let dir = temp_dir("peercred");
    // The child runs as another user: it must reach the binary's directory and the
    // socket's (temp_dir makes them root's 0755 unless the umask is odd).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = start(&dir);
    let (ok, out) = admin_status_as(&d.socket, 0);
    assert!(ok && out.contains("mirror"), "root is answered: {out}");
    // The file permissions keep another user out before the daemon sees it.
    let (ok, out) = admin_status_as(&d.socket, NOBODY);
    assert!(!ok && out.contains("os error 13"), "{out}");
    // And were they loosened, the daemon itself refuses the peer by its uid.
    std::fs::set_permissions(&d.data, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (ok, out) = admin_status_as(&d.socket, NOBODY);
    assert!(
        !ok && out.contains("permission denied") && !out.contains("mirror"),
        "another user got: {out}"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
