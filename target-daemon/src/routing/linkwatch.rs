//! Link state of the external interfaces from rtnetlink: a `NETLINK_ROUTE` socket
//! subscribed to `RTMGRP_LINK`, plus an `RTM_GETLINK` dump for the state at the start
//! (and again whenever the kernel says events were lost). The kernel pushes a message the
//! moment a link changes, so a path whose link drops fails at once instead of at the
//! next probe interval.
//!
//! The parser takes the bytes as untrusted: every length is checked against what was
//! read, and anything malformed ends the batch with an error instead of a panic.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::netif::link_usable;

/// `struct nlmsghdr`: length u32, type u16, flags u16, sequence u32, port id u32.
const NLMSG_HDRLEN: usize = 16;
/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
const IFINFOMSG_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTMGRP_LINK: u32 = 1;
/// Receive buffer: the kernel sends dump parts of at most a page or so (8 KiB with
/// large pages); 64 KiB leaves room and `MSG_TRUNC` tells if it ever does not.
const RECV_BUF: usize = 65_536;

/// Why a netlink message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkParseError {
    /// Fewer bytes left than a message header.
    #[error("netlink header truncated at byte {at}")]
    TruncatedHeader {
        /// Offset of the message in the buffer.
        at: usize,
    },
    /// A message whose length is below its header's or beyond the bytes read.
    #[error("netlink message at byte {at} claims {len} bytes, {left} left")]
    BadLength {
        /// Offset of the message in the buffer.
        at: usize,
        /// The length it claims.
        len: usize,
        /// Bytes left from its start.
        left: usize,
    },
    /// A link message too short for its `ifinfomsg`, or an error message for its code.
    #[error("netlink message at byte {at} has a {len}-byte body, too short for its type")]
    ShortBody {
        /// Offset of the message in the buffer.
        at: usize,
        /// Length of its body.
        len: usize,
    },
}

/// One netlink message, as far as link state is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMessage {
    /// A link exists with these `IFF_*` flags (`RTM_NEWLINK`: an event or a dump part).
    Link {
        /// Interface index.
        index: u32,
        /// `ifi_flags`.
        flags: u32,
    },
    /// A link was deleted (`RTM_DELLINK`).
    Gone {
        /// Interface index.
        index: u32,
    },
    /// The end of a dump.
    Done {
        /// Sequence number of the request it answers.
        seq: u32,
    },
    /// An error (or, with `errno` 0, an acknowledgement) about a request.
    Error {
        /// Sequence number of the request.
        seq: u32,
        /// The negated errno the kernel sent, made positive.
        errno: i32,
    },
    /// Any other message (no-op, another type): nothing to do.
    Other,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages in one datagram read from a netlink socket, in order; an error ends
/// the sequence (what follows a malformed message cannot be framed).
pub struct Messages<'a> {
    buf: &'a [u8],
    at: usize,
    failed: bool,
}

/// Parses the netlink messages in `buf`.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages {
        buf,
        at: 0,
        failed: false,
    }
}

impl Iterator for Messages<'_> {
    type Item = Result<LinkMessage, LinkParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.buf.len() {
            return None;
        }
        let at = self.at;
        let r = self.parse_one(at);
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl Messages<'_> {
    fn parse_one(&mut self, at: usize) -> Result<LinkMessage, LinkParseError> {
        let rest = self.buf.get(at..).unwrap_or_default();
        let (Some(len), Some(ty), Some(seq)) = (u32_at(rest, 0), u16_at(rest, 4), u32_at(rest, 8))
        else {
            return Err(LinkParseError::TruncatedHeader { at });
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(LinkParseError::BadLength {
                at,
                len,
                left: rest.len(),
            });
        }
        // Messages start 4-byte aligned; the last one's padding may be missing.
        self.at = at.saturating_add(len.saturating_add(3) & !3);
        let body = &rest[NLMSG_HDRLEN..len];
        let short = || LinkParseError::ShortBody {
            at,
            len: body.len(),
        };
        match ty {
            RTM_NEWLINK | RTM_DELLINK => {
                if body.len() < IFINFOMSG_LEN {
                    return Err(short());
                }
                // ifi_index is an int; the kernel never uses a negative one.
                let index = u32_at(body, 4).ok_or_else(short)?;
                let flags = u32_at(body, 8).ok_or_else(short)?;
                // The attributes after the ifinfomsg (name, operstate, ...) are not
                // needed: ifi_flags already carries IFF_RUNNING, derived from operstate.
                Ok(if ty == RTM_NEWLINK {
                    LinkMessage::Link { index, flags }
                } else {
                    LinkMessage::Gone { index }
                })
            }
            NLMSG_DONE => Ok(LinkMessage::Done { seq }),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or_else(short)? as i32;
                Ok(LinkMessage::Error {
                    seq,
                    errno: code.saturating_neg(),
                })
            }
            NLMSG_NOOP => Ok(LinkMessage::Other),
            _ => Ok(LinkMessage::Other),
        }
    }
}

/// An `RTM_GETLINK` dump request with sequence number `seq`.
pub fn dump_request(seq: u32) -> [u8; NLMSG_HDRLEN + IFINFOMSG_LEN] {
    let mut m = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    m[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // Port id 0 (the kernel fills it in); ifinfomsg all zero: every family and link.
    m
}

/// A `NETLINK_ROUTE` socket watching the links in `watched` (by index).
pub struct LinkWatch {
    fd: OwnedFd,
    /// Last known usability of each watched link; absent until the dump or an event
    /// told.
    usable: HashMap<u32, bool>,
    /// Sequence number of the dump in flight; 0 when none is. (The kernel runs one dump
    /// per socket at a time, so a DONE can only be the current dump's.)
    seq: u32,
    /// A dump is owed: events were lost (`ENOBUFS`) or a message was malformed, and a
    /// new request could not be sent yet (the kernel allows one dump at a time).
    resync: bool,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl LinkWatch {
    /// Opens the socket, subscribes to link events, and reads the current state of the
    /// links `watched` (waiting up to `timeout` for the dump).
    pub fn open(watched: &[u32], timeout: Duration) -> std::io::Result<LinkWatch> {
        // SAFETY: plain socket(2); the result is checked before use.
        #[allow(unsafe_code)]
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(last_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zero is a valid value.
        #[allow(unsafe_code)]
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = RTMGRP_LINK;
        // SAFETY: `sa` is a valid sockaddr_nl of the length given, alive for the call.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(last_error());
        }
        let mut w = LinkWatch {
            fd,
            usable: watched.iter().map(|&i| (i, false)).collect(),
            seq: 0,
            resync: true,
        };
        // Subscribed before the dump: a change after it arrives as an event.
        w.request_dump()?;
        let deadline = std::time::Instant::now() + timeout;
        while w.resync_pending_or_dumping() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to the RTM_GETLINK dump",
                ));
            }
            w.wait(left)?;
        }
        Ok(w)
    }

    fn resync_pending_or_dumping(&self) -> bool {
        self.resync || self.seq != 0
    }

    /// Sends a dump request; `resync` stays set when the kernel is busy with another.
    fn request_dump(&mut self) -> std::io::Result<()> {
        let seq = self.seq.wrapping_add(1).max(1);
        let m = dump_request(seq);
        // SAFETY: `m` is a readable buffer of the length given, alive for the call; an
        // unconnected netlink socket sends to the kernel.
        #[allow(unsafe_code)]
        let r = unsafe { libc::send(self.fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if r < 0 {
            let e = last_error();
            if e.raw_os_error() == Some(libc::EBUSY) || e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        self.seq = seq;
        self.resync = false;
        Ok(())
    }

    /// Whether the watched link `index` is usable, as last told.
    pub fn usable(&self, index: u32) -> bool {
        self.usable.get(&index).copied().unwrap_or(false)
    }

    /// Applies one batch of messages; returns whether a watched link's usability
    /// changed.
    pub fn apply(&mut self, buf: &[u8]) -> Result<bool, LinkParseError> {
        let mut changed = false;
        for m in messages(buf) {
            let (index, now_usable) = match m? {
                LinkMessage::Link { index, flags } => (index, link_usable(flags)),
                LinkMessage::Gone { index } => (index, false),
                LinkMessage::Done { seq } | LinkMessage::Error { seq, .. } => {
                    if seq == self.seq {
                        // The dump is over (or was refused: an event or the next resync
                        // will tell).
                        self.seq = 0;
                    }
                    continue;
                }
                LinkMessage::Other => continue,
            };
            if let Some(u) = self.usable.get_mut(&index) {
                changed |= *u != now_usable;
                *u = now_usable;
            }
        }
        Ok(changed)
    }

    /// Waits up to `timeout` for link messages and applies what came; returns whether a
    /// watched link's usability changed.
    pub fn wait(&mut self, timeout: Duration) -> std::io::Result<bool> {
        if self.resync && self.seq == 0 {
            self.request_dump()?;
        }
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        #[allow(unsafe_code)]
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = last_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let mut changed = false;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: `buf` is writable for its length and alive for the call.
            #[allow(unsafe_code)]
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = last_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => return Ok(changed),
                    Some(libc::ENOBUFS) => {
                        // The kernel dropped events: only a new dump tells the truth.
                        tracing::warn!("rtnetlink events lost: reading the link state again");
                        self.resync = true;
                        if self.seq == 0 {
                            self.request_dump()?;
                        }
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                // Truncated datagram: its tail is lost, so the state is unknown.
                tracing::warn!(bytes = n, "rtnetlink message truncated: reading again");
                self.resync = true;
            }
            match self.apply(&buf[..n.min(buf.len())]) {
                Ok(c) => changed |= c,
                Err(e) => {
                    tracing::warn!("rtnetlink: {e}: reading the link state again");
                    self.resync = true;
                    // A dump cut short by a malformed part never sends its DONE.
                    self.seq = 0;
                }
            }
            if self.resync && self.seq == 0 {
                self.request_dump()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of type `ty` with `body`, padded to 4 bytes.
    fn msg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    /// An ifinfomsg for `index` with `flags`, then an IFLA_IFNAME attribute "ext1".
    fn link(ty: u16, index: u32, flags: u32) -> Vec<u8> {
        let mut b = vec![0u8, 0, 0, 0];
        b.extend_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&u32::MAX.to_ne_bytes());
        b.extend_from_slice(&9u16.to_ne_bytes());
        b.extend_from_slice(&3u16.to_ne_bytes());
        b.extend_from_slice(b"ext1\0");
        msg(ty, 0, &b)
    }

    const UP_RUNNING: u32 = (libc::IFF_UP | libc::IFF_RUNNING) as u32;

    #[test]
    fn link_done_and_error_messages_are_read_in_order() {
        let mut buf = link(RTM_NEWLINK, 7, UP_RUNNING);
        buf.extend(link(RTM_DELLINK, 8, 0));
        buf.extend(msg(NLMSG_DONE, 5, &0i32.to_ne_bytes()));
        buf.extend(msg(NLMSG_ERROR, 6, &(-libc::EBUSY).to_ne_bytes()));
        buf.extend(msg(0x7777, 0, b"xyz"));
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(
            got,
            vec![
                Ok(LinkMessage::Link {
                    index: 7,
                    flags: UP_RUNNING
                }),
                Ok(LinkMessage::Gone { index: 8 }),
                Ok(LinkMessage::Done { seq: 5 }),
                Ok(LinkMessage::Error {
                    seq: 6,
                    errno: libc::EBUSY
                }),
                Ok(LinkMessage::Other),
            ]
        );
    }

    #[test]
    fn truncated_and_lying_messages_end_the_batch_with_an_error() {
        let good = link(RTM_NEWLINK, 7, UP_RUNNING);
        // Every prefix of a valid message: either nothing or an error, never a panic,
        // never a link read from missing bytes.
        for cut in 1..good.len() {
            let got: Vec<_> = messages(&good[..cut]).collect();
            assert_eq!(got.len(), 1, "cut at {cut}");
            // The last message may lack its padding: 4 + 16 + 9 = 41 bytes of it matter.
            if cut >= 41 {
                assert!(got[0].is_ok(), "cut at {cut}: only padding missing");
            } else {
                assert!(got[0].is_err(), "cut at {cut}: {:?}", got[0]);
            }
        }
        assert_eq!(messages(&[]).count(), 0);
        // A good message, then a header claiming more than is there.
        let mut buf = good.clone();
        let mut lie = link(RTM_NEWLINK, 9, 0);
        lie[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        buf.extend(&lie);
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert_eq!(
            got[1],
            Err(LinkParseError::BadLength {
                at: good.len(),
                len: 1000,
                left: lie.len()
            })
        );
        // A length below the header's own: no endless loop on zero.
        let mut zero = good.clone();
        zero[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(
            messages(&zero).collect::<Vec<_>>()[..],
            [Err(LinkParseError::BadLength { len: 0, .. })]
        ));
        // A link message with a body shorter than an ifinfomsg.
        let short = msg(RTM_NEWLINK, 0, &[0u8; 8]);
        assert_eq!(
            messages(&short).collect::<Vec<_>>(),
            vec![Err(LinkParseError::ShortBody { at: 0, len: 8 })]
        );
        let short_err = msg(NLMSG_ERROR, 0, &[0u8; 2]);
        assert!(messages(&short_err).all(|m| m.is_err()));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep of noisy buffers (the fuzzers get the rest).
        let mut x: u32 = 0x1234_5678;
        for n in 0..2000usize {
            let mut b = Vec::with_capacity(n % 97);
            for _ in 0..n % 97 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                b.push(x as u8);
            }
            if n % 3 == 0 && b.len() >= 4 {
                // Plausible lengths reach deeper than random ones.
                let l = (x as usize % (b.len() + 8)) as u32;
                b[0..4].copy_from_slice(&l.to_ne_bytes());
            }
            for m in messages(&b) {
                let _ = m;
            }
        }
    }

    #[test]
    fn state_follows_events_for_watched_links_only() {
        // apply() needs no socket state beyond the map: built by hand.
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        drop(b);
        let mut w = LinkWatch {
            fd: OwnedFd::from(a),
            usable: [(7, false)].into_iter().collect(),
            seq: 3,
            resync: false,
        };
        assert!(!w.usable(7));
        assert_eq!(w.apply(&link(RTM_NEWLINK, 7, UP_RUNNING)), Ok(true));
        assert!(w.usable(7));
        assert_eq!(w.apply(&link(RTM_NEWLINK, 8, 0)), Ok(false), "not watched");
        assert_eq!(
            w.apply(&link(RTM_NEWLINK, 7, libc::IFF_UP as u32)),
            Ok(true),
            "up but not running"
        );
        assert!(!w.usable(7));
        w.apply(&link(RTM_NEWLINK, 7, UP_RUNNING)).expect("ok");
        assert_eq!(w.apply(&link(RTM_DELLINK, 7, UP_RUNNING)), Ok(true));
        assert!(!w.usable(7), "deleted");
        assert_eq!(w.apply(&msg(NLMSG_DONE, 3, &[0; 4])), Ok(false));
        assert_eq!(w.seq, 0, "dump finished");
    }

    #[test]
    fn the_kernel_answers_the_dump_with_the_loopback_link() {
        // Every network namespace has `lo` (index 1); what the dump says of it must be
        // what the interface ioctl says.
        let w = LinkWatch::open(&[1], Duration::from_secs(5)).expect("rtnetlink");
        let flags = super::super::netif::link_flags("lo").expect("lo exists");
        assert!(
            flags & libc::IFF_UP as u32 != 0,
            "lo is up in a test namespace"
        );
        assert_eq!(w.usable(1), link_usable(flags));
        assert_eq!(w.seq, 0, "the dump finished");
        assert!(!w.resync);
    }
}
