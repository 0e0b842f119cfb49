//! Running under a service manager: the systemd notification protocol (`sd_notify`).
//!
//! With `Type=notify`, systemd sets `NOTIFY_SOCKET` and counts the daemon started only
//! when it sends `READY=1`; we send it once every portal listens, so units ordered after
//! ours never meet a refused connection. `STOPPING=1` marks a graceful shutdown, and with
//! `WatchdogSec=` set (`WATCHDOG_USEC`), `WATCHDOG=1` goes out at half the interval from
//! a task on the runtime that serves the connections: a wedged runtime stops the pings
//! and systemd restarts the daemon. The protocol is a datagram per message on a Unix
//! socket, so it needs no library.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, if it names one (not running under systemd,
    /// or not `Type=notify`: `None`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) if !path.is_empty() => Self::to_socket(&path.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `path`: a file system path, or `@name` for a socket in
    /// the abstract namespace (what systemd uses for its own).
    pub fn to_socket(path: &str) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => abstract_addr(name)?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends one message, e.g. `READY=1` or `STATUS=...` (newline-separated
    /// assignments).
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let n = self.sock.send_to_addr(message.as_bytes(), &self.addr)?;
        if n != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification truncated",
            ));
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist on Linux only",
    ))
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set for this
/// process (`WATCHDOG_PID`, when present, must be ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_string_lossy().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_on_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ftss-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::to_socket(&path.to_string_lossy()).expect("notifier");
        n.notify("READY=1\nSTATUS=serving").expect("send");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_arrive_on_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ftss-notify-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"),
        )
        .expect("bind");
        let n = Notifier::to_socket(&format!("@{name}")).expect("notifier");
        n.notify("STOPPING=1").expect("send");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_hang() {
        let n = Notifier::to_socket("/nonexistent/ftss/notify").expect("address is valid");
        assert!(n.notify("READY=1").is_err());
    }
}
