//! The small system seam of the external interfaces: a TUN device of the target host,
//! its address, MTU and flags (the classic `SIOCSIF*` ioctls), and the IPv4/ICMP bytes
//! the health probe and the unreachable answers need. Everything above it
//! (`routing::interfaces`) sees only whole IP packets in and out.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Why a TUN interface could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetifError {
    /// The interface name is empty or longer than 15 bytes.
    #[error("interface name {0:?} must have 1 to 15 bytes")]
    Name(String),
    /// A system call failed.
    #[error("{what} on {name}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The interface.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

/// `struct ifreq`: the name, then a 24-byte union (sockaddr, flags or MTU at its start).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    /// A `sockaddr_in` with `a` in the union.
    fn with_v4(name: &str, a: Ipv4Addr) -> IfReq {
        let mut r = IfReq::new(name);
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&a.octets());
        r
    }
}

/// A TUN device (layer 3, no packet information header) opened by the daemon; it lives
/// as long as this value.
pub struct TunDevice {
    file: File,
    name: String,
}

fn os<'a>(what: &'static str, name: &'a str) -> impl FnOnce(std::io::Error) -> NetifError + 'a {
    move |source| NetifError::Os {
        what,
        name: name.to_string(),
        source,
    }
}

/// One `SIOC*IF*` ioctl on a throwaway datagram socket (the interface ioctls need one).
fn if_ioctl(request: libc::c_ulong, req: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: plain socket(2); the result is checked before use.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    #[allow(unsafe_code)]
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the SIOC[GS]IF* requests read or write a `struct ifreq`, which IfReq lays
    // out (16-byte name, 24-byte union); `req` outlives the call and the socket is open.
    #[allow(unsafe_code)]
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut IfReq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The interface's flags (`IFF_*`), or an error when it does not exist (any more) in
/// the daemon's network namespace. Used to bring a link up; its health comes from
/// rtnetlink (`routing::linkwatch`).
pub fn link_flags(name: &str) -> std::io::Result<u32> {
    let mut req = IfReq::new(name);
    if_ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    Ok(u32::from(u16::from_ne_bytes([req.data[0], req.data[1]])))
}

/// Whether a link with `flags` can carry packets: administratively up and running
/// (for a TUN, an open file behind it).
pub fn link_usable(flags: u32) -> bool {
    let want = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
    flags & want == want
}

impl TunDevice {
    /// Creates (or attaches to) the TUN interface `name`. Needs CAP_NET_ADMIN.
    pub fn open(name: &str) -> Result<TunDevice, NetifError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(NetifError::Name(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(os("open /dev/net/tun", name))?;
        let mut req = IfReq::new(name);
        req.data[..2].copy_from_slice(&((libc::IFF_TUN | libc::IFF_NO_PI) as i16).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (IfReq's layout, flags at
        // the start of the union); `req` outlives the call and the file is open.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF as _,
                &mut req as *mut IfReq,
            )
        };
        if r < 0 {
            return Err(os("TUNSETIFF", name)(std::io::Error::last_os_error()));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(TunDevice {
            file,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index: how rtnetlink names the link.
    pub fn index(&self) -> Result<u32, NetifError> {
        let mut req = IfReq::new(&self.name);
        if_ioctl(libc::SIOCGIFINDEX, &mut req).map_err(os("SIOCGIFINDEX", &self.name))?;
        // ifr_ifindex is an int at the start of the union; the kernel's are positive.
        Ok(i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]) as u32)
    }

    /// Gives the interface an IPv4 address and prefix, an MTU, and brings it up.
    pub fn configure(&self, addr: Option<(Ipv4Addr, u8)>, mtu: u32) -> Result<(), NetifError> {
        let name = self.name.as_str();
        if let Some((a, prefix)) = addr {
            if_ioctl(libc::SIOCSIFADDR, &mut IfReq::with_v4(name, a))
                .map_err(os("SIOCSIFADDR", name))?;
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            if_ioctl(libc::SIOCSIFNETMASK, &mut IfReq::with_v4(name, mask))
                .map_err(os("SIOCSIFNETMASK", name))?;
        }
        let mut req = IfReq::new(name);
        req.data[..4].copy_from_slice(&(mtu as i32).to_ne_bytes());
        if_ioctl(libc::SIOCSIFMTU, &mut req).map_err(os("SIOCSIFMTU", name))?;
        let flags = link_flags(name).map_err(os("SIOCGIFFLAGS", name))?;
        let mut req = IfReq::new(name);
        let up = (flags | libc::IFF_UP as u32) as u16;
        req.data[..2].copy_from_slice(&up.to_ne_bytes());
        if_ioctl(libc::SIOCSIFFLAGS, &mut req).map_err(os("SIOCSIFFLAGS", name))
    }

    /// Waits up to `timeout` for a packet and reads it into `buf`; `Ok(None)` when none
    /// came.
    pub fn read_timeout(
        &self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> std::io::Result<Option<usize>> {
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        #[allow(unsafe_code)]
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(None);
        }
        (&self.file).read(buf).map(Some)
    }

    /// Writes one IP packet: the host receives it from this interface.
    pub fn write_packet(&self, p: &[u8]) -> std::io::Result<()> {
        (&self.file).write(p).map(drop)
    }
}

/// The source and destination of an IPv4 or IPv6 packet; `None` for anything else or a
/// truncated header.
pub fn ip_addrs(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            Some((IpAddr::from(s), IpAddr::from(d)))
        }
        _ => None,
    }
}

/// Whether `a` reaches a group rather than one host: multicast, or IPv4's limited
/// broadcast. (A directed subnet broadcast cannot be told from a host address here.)
pub fn is_group(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => v.is_multicast() || v.is_broadcast(),
        IpAddr::V6(v) => v.is_multicast(),
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const ICMP: u8 = 1;

/// An IPv4 packet (20-byte header, TTL 64, don't fragment unset) carrying `payload` of
/// protocol `proto`. `None` when it would exceed 65535 bytes.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let total = u16::try_from(20 + payload.len()).ok()?;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    Some(p)
}

/// An ICMP echo request from `src` to `dst` with identifier `id` and sequence `seq`.
pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"ftss-prb");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, ICMP, &icmp).unwrap_or_default()
}

/// The sequence number of an ICMP echo reply to `to` with identifier `id` and a valid
/// ICMP checksum; `None` for any other packet.
pub fn echo_reply_seq(p: &[u8], to: Ipv4Addr, id: u16) -> Option<u16> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    if p[0] >> 4 != 4 || ihl < 20 || p.len() < ihl + 8 || p[9] != ICMP || p[16..20] != to.octets() {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let icmp = p.get(ihl..total)?;
    if icmp.len() < 8 || icmp[0] != 0 || checksum(icmp) != 0 {
        return None;
    }
    (u16::from_be_bytes([icmp[4], icmp[5]]) == id).then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// An ICMP destination unreachable (type 3, code 1: host unreachable) from `from` about
/// the IPv4 packet `orig`, addressed to its source; `None` when no answer is due (not
/// IPv4, itself an ICMP error, or from a group or unspecified address: RFC 1812 4.3.2.7).
pub fn host_unreachable(from: Ipv4Addr, orig: &[u8]) -> Option<Vec<u8>> {
    let (IpAddr::V4(src), IpAddr::V4(_)) = ip_addrs(orig)? else {
        return None;
    };
    if src.is_unspecified() || is_group(IpAddr::V4(src)) {
        return None;
    }
    let ihl = usize::from(orig[0] & 0x0f) * 4;
    if ihl < 20 || orig.len() < ihl {
        return None;
    }
    if orig[9] == ICMP {
        // Errors about errors are never sent; echo requests may be answered.
        match orig.get(ihl) {
            Some(8) => {}
            _ => return None,
        }
    }
    let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&orig[..orig.len().min(ihl + 8)]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(from, src, ICMP, &icmp)
}

/// The first address of `a/prefix`'s subnet after `a` that is a host address (not the
/// subnet's broadcast): the daemon's own end of a TUN link whose host end is `a`.
pub fn peer_in_subnet(a: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    let host_bits = 32u32.checked_sub(u32::from(prefix))?;
    if host_bits >= 32 {
        // A /0 is no link.
        return None;
    }
    let x = u32::from(a);
    if host_bits == 1 {
        // RFC 3021 /31: two hosts, no broadcast.
        return Some(Ipv4Addr::from(x ^ 1));
    }
    if host_bits < 2 {
        return None;
    }
    let mask = u32::MAX << host_bits;
    let next = x.checked_add(1)?;
    let broadcast = (x & mask) | !mask;
    (next & mask == x & mask && next != broadcast).then_some(Ipv4Addr::from(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example_and_of_a_built_header() {
        // RFC 1071 section 3's example words sum to 0xddf2; the checksum is its complement.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let p = echo_request(
            Ipv4Addr::new(10, 200, 1, 2),
            Ipv4Addr::new(198, 51, 100, 10),
            0x1234,
            7,
        );
        assert_eq!(checksum(&p[..20]), 0, "IP header checks");
        assert_eq!(checksum(&p[20..]), 0, "ICMP checks");
        assert_eq!(p.len(), 36);
    }

    fn reply_to(req: &[u8]) -> Vec<u8> {
        // What the far host sends back: addresses swapped, type 0, checksum redone.
        let mut icmp = req[20..].to_vec();
        icmp[0] = 0;
        icmp[2] = 0;
        icmp[3] = 0;
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let (IpAddr::V4(s), IpAddr::V4(d)) = ip_addrs(req).expect("ip") else {
            panic!("v4");
        };
        ipv4(d, s, ICMP, &icmp).expect("small")
    }

    #[test]
    fn echo_replies_are_recognised_only_for_our_address_and_id() {
        let me = Ipv4Addr::new(10, 200, 1, 2);
        let req = echo_request(me, Ipv4Addr::new(198, 51, 100, 10), 42, 9);
        let rep = reply_to(&req);
        assert_eq!(echo_reply_seq(&rep, me, 42), Some(9));
        assert_eq!(echo_reply_seq(&rep, me, 43), None, "another id");
        assert_eq!(
            echo_reply_seq(&rep, Ipv4Addr::new(10, 200, 1, 6), 42),
            None,
            "another address"
        );
        assert_eq!(echo_reply_seq(&req, me, 42), None, "a request is no reply");
        let mut bad = rep.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(echo_reply_seq(&bad, me, 42), None, "bad checksum");
        assert_eq!(echo_reply_seq(&rep[..25], me, 42), None, "truncated");
        assert_eq!(echo_reply_seq(&[], me, 42), None);
        assert_eq!(echo_reply_seq(&[0x45], me, 42), None);
    }

    #[test]
    fn unreachable_answers_carry_the_original_header_and_never_answer_errors() {
        let outside = Ipv4Addr::new(198, 51, 100, 10);
        let me = Ipv4Addr::new(10, 200, 1, 2);
        let ping = echo_request(outside, Ipv4Addr::new(10, 99, 0, 1), 1, 1);
        let u = host_unreachable(me, &ping).expect("answered");
        assert_eq!(ip_addrs(&u), Some((IpAddr::V4(me), IpAddr::V4(outside))));
        assert_eq!(checksum(&u[20..]), 0);
        assert_eq!((u[20], u[21]), (3, 1));
        assert_eq!(&u[28..48], &ping[..20], "original header quoted");
        assert_eq!(host_unreachable(me, &u), None, "no error about an error");
        let from_group = echo_request(Ipv4Addr::new(224, 0, 0, 1), me, 1, 1);
        assert_eq!(host_unreachable(me, &from_group), None);
        assert_eq!(host_unreachable(me, &[0x45, 0, 0]), None);
    }

    #[test]
    fn the_daemons_end_of_a_link() {
        let a = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        assert_eq!(peer_in_subnet(a("10.200.1.1"), 30), Some(a("10.200.1.2")));
        assert_eq!(
            peer_in_subnet(a("10.200.1.2"), 30),
            None,
            "next is broadcast"
        );
        assert_eq!(peer_in_subnet(a("10.200.1.1"), 31), Some(a("10.200.1.0")));
        assert_eq!(peer_in_subnet(a("10.200.1.1"), 32), None);
        assert_eq!(peer_in_subnet(a("10.0.0.1"), 24), Some(a("10.0.0.2")));
        assert_eq!(peer_in_subnet(a("10.0.0.1"), 40), None);
        assert_eq!(peer_in_subnet(a("10.0.0.1"), 0), None);
    }

    #[test]
    fn addresses_and_groups() {
        let p = echo_request(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(224, 0, 0, 251),
            0,
            0,
        );
        let (s, d) = ip_addrs(&p).expect("v4");
        assert_eq!(s, IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(is_group(d));
        assert!(is_group("255.255.255.255".parse().expect("ip")));
        assert!(is_group("ff02::1".parse().expect("ip")));
        assert!(!is_group("198.51.100.10".parse().expect("ip")));
        assert_eq!(ip_addrs(&[0x60; 39]), None, "truncated v6");
    }
}
