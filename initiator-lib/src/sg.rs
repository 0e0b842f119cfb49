//! A [`Transport`] over Linux SG_IO: vendor commands on a LUN that the kernel's own
//! initiator (open-iscsi) logged in to, through its `/dev/sgN` (or `/dev/sdX`) node.
//!
//! The server then needs no second iSCSI session of its own: its packets travel on the
//! session that also carries its block I/O, and the target sees one node per initiator
//! name either way. The kernel does the iSCSI part; this module only fills an
//! `sg_io_hdr` (`<scsi/sg.h>`, interface `'S'`) and reads the completion back into a
//! [`ScsiResult`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), ftss_initiator::Error> {
//! use ftss_initiator::{PacketClient, SgTransport};
//!
//! let client = PacketClient::new(SgTransport::find().await?);
//! client.register(&["192.0.2.7".parse().expect("address")]).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ftss_proto::pdu::Residual;
use ftss_proto::sense::Sense;

use crate::{scsi, Error, ScsiResult, Transport};

/// The SG_IO ioctl request (`<scsi/sg.h>`).
const SG_IO: u32 = 0x2285;
/// Asks a device for its sg driver version; any device that takes SG_IO answers it (sg
/// nodes and SCSI block devices alike), so it tells a SCSI device from anything else.
const SG_GET_VERSION_NUM: u32 = 0x2282;
/// No data transfer.
const SG_DXFER_NONE: libc::c_int = -1;
/// Data-out (initiator to target).
const SG_DXFER_TO_DEV: libc::c_int = -2;
/// Data-in (target to initiator).
const SG_DXFER_FROM_DEV: libc::c_int = -3;
/// Sense buffer size: SPC allows up to 252 bytes; the target sends at most a few dozen.
const SENSE_LEN: usize = 252;
/// `DID_TIME_OUT`: the kernel gave up on the command after `timeout` ms.
const DID_TIME_OUT: u16 = 0x03;
/// `DRIVER_TIMEOUT`, in the low (driver byte) bits of `driver_status`.
const DRIVER_TIMEOUT: u16 = 0x06;
/// The low bits of `driver_status` are the driver byte proper; `DRIVER_SENSE` (0x08)
/// only says sense data is present, which is not an error.
const DRIVER_MASK: u16 = 0x07;
/// How long `find` waits for each device's INQUIRY: a LUN that cannot answer that
/// quickly is not one to pick.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The command timeout of a new transport; as the userspace initiator's default, so a
/// [`PacketClient`](crate::PacketClient)'s default RECEIVE wait fits below it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The INQUIRY vendor identification of an ftss target (trimmed).
pub const FTSS_VENDOR: &str = "FTSS";

/// `struct sg_io_hdr` of `<scsi/sg.h>`, field for field (interface_id `'S'`).
#[repr(C)]
#[derive(Debug)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: libc::c_uchar,
    mx_sb_len: libc::c_uchar,
    iovec_count: libc::c_ushort,
    dxfer_len: libc::c_uint,
    dxferp: *mut libc::c_void,
    cmdp: *mut libc::c_uchar,
    sbp: *mut libc::c_uchar,
    timeout: libc::c_uint,
    flags: libc::c_uint,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: libc::c_uchar,
    masked_status: libc::c_uchar,
    msg_status: libc::c_uchar,
    sb_len_wr: libc::c_uchar,
    host_status: libc::c_ushort,
    driver_status: libc::c_ushort,
    resid: libc::c_int,
    duration: libc::c_uint,
    info: libc::c_uint,
}

/// What the kernel reports back in an `sg_io_hdr`, copied out so that no raw pointer
/// outlives the ioctl.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Completion {
    status: u8,
    host_status: u16,
    driver_status: u16,
    sb_len_wr: u8,
    resid: i32,
}

/// SCSI commands on one Linux SCSI device through the SG_IO ioctl.
///
/// Cloning is cheap and shares the open device. Each command runs its blocking ioctl on
/// tokio's blocking pool, so many may be in flight at once (the kernel queues them).
#[derive(Clone, Debug)]
pub struct SgTransport {
    file: Arc<File>,
    path: PathBuf,
    timeout: Duration,
}

impl SgTransport {
    /// Opens `path` (`/dev/sgN`, or a SCSI block device such as `/dev/sdX`) for SG_IO.
    ///
    /// Read-write, because the sg driver refuses anything but a few read-only commands
    /// on a read-only descriptor, and non-blocking, so that opening a block device does
    /// not wait for its medium.
    pub fn open(path: impl AsRef<Path>) -> Result<SgTransport, Error> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut version: libc::c_int = 0;
        // SAFETY: SG_GET_VERSION_NUM writes one int through the pointer, which points at
        // a live, writable c_int; the descriptor is open for the whole call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                SG_GET_VERSION_NUM as _,
                &mut version as *mut libc::c_int,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(Error::NoDevice(format!(
                "{}: not a SCSI device (SG_GET_VERSION_NUM: {e})",
                path.display()
            )));
        }
        Ok(SgTransport {
            file: Arc::new(file),
            path: path.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The first SCSI device that is a LUN of an ftss target: INQUIRY vendor `FTSS` and a
    /// readable device identification VPD page (0x83). Looks at `/dev/sg*` in numeric
    /// order, or at the whole-disk `/dev/sd*` nodes when there is no sg node (the sg
    /// module not loaded).
    pub async fn find() -> Result<SgTransport, Error> {
        find_in(Path::new("/dev")).await
    }

    /// The same transport with command timeout `timeout` (default [`DEFAULT_TIMEOUT`]).
    /// Keep a [`PacketClient`](crate::PacketClient)'s RECEIVE wait below it.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The device this transport was opened on.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn timeout_ms(&self) -> u32 {
        u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX)
    }
}

impl Transport for SgTransport {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        let file = Arc::clone(&self.file);
        let cdb = cdb.to_vec();
        let timeout_ms = self.timeout_ms();
        async move {
            // The ioctl blocks for as long as the command runs (a RECEIVE may long-poll
            // for many seconds), so it must not hold a runtime worker.
            tokio::task::spawn_blocking(move || {
                sg_io(&file, &cdb, data_out, data_in_len, timeout_ms)
            })
            .await
            .map_err(|e| Error::Io(io::Error::other(format!("SG_IO task: {e}"))))?
        }
    }
}

/// Runs one command with SG_IO, blocking.
fn sg_io(
    file: &File,
    cdb: &[u8],
    data_out: Option<Bytes>,
    data_in_len: u32,
    timeout_ms: u32,
) -> Result<ScsiResult, Error> {
    let cmd_len = u8::try_from(cdb.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::InvalidArgument(format!("CDB of {} bytes", cdb.len())))?;
    if data_out.is_some() && data_in_len > 0 {
        return Err(Error::InvalidArgument(
            "SG_IO cannot carry data-out and data-in in one command".into(),
        ));
    }
    let mut cdb = cdb.to_vec();
    let mut sense = vec![0u8; SENSE_LEN];
    let mut data_in = vec![0u8; data_in_len as usize];
    let (direction, dxferp, dxfer_len) = match &data_out {
        Some(d) => {
            let len = u32::try_from(d.len())
                .map_err(|_| Error::InvalidArgument(format!("data-out of {} bytes", d.len())))?;
            // The kernel only reads a TO_DEV buffer; the pointer is `*mut` because the
            // header's field is.
            (SG_DXFER_TO_DEV, d.as_ptr() as *mut libc::c_void, len)
        }
        None if data_in_len > 0 => (
            SG_DXFER_FROM_DEV,
            data_in.as_mut_ptr().cast::<libc::c_void>(),
            data_in_len,
        ),
        None => (SG_DXFER_NONE, std::ptr::null_mut(), 0),
    };
    let mut hdr = SgIoHdr {
        interface_id: libc::c_int::from(b'S'),
        dxfer_direction: direction,
        cmd_len,
        mx_sb_len: SENSE_LEN as u8,
        iovec_count: 0,
        dxfer_len,
        dxferp,
        cmdp: cdb.as_mut_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: timeout_ms,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: `hdr` is a valid sg_io_hdr whose pointers (CDB, sense buffer, data buffer
    // of `dxfer_len` bytes) all point into buffers owned by this frame (`cdb`, `sense`,
    // `data_in`, `data_out`) that live until after the ioctl returns; SG_IO is
    // synchronous, so the kernel is done with them when it does.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), SG_IO as _, &mut hdr as *mut SgIoHdr) };
    if rc < 0 {
        return Err(Error::Io(io::Error::last_os_error()));
    }
    let done = Completion {
        status: hdr.status,
        host_status: hdr.host_status,
        driver_status: hdr.driver_status,
        sb_len_wr: hdr.sb_len_wr,
        resid: hdr.resid,
    };
    complete(done, dxfer_len, data_in, sense)
}

/// Builds the result of a finished SG_IO command from what the kernel reported.
fn complete(
    c: Completion,
    dxfer_len: u32,
    mut data_in: Vec<u8>,
    mut sense: Vec<u8>,
) -> Result<ScsiResult, Error> {
    if c.host_status == DID_TIME_OUT || c.driver_status & DRIVER_MASK == DRIVER_TIMEOUT {
        return Err(Error::Timeout);
    }
    if c.host_status != 0 || c.driver_status & DRIVER_MASK != 0 {
        return Err(Error::Passthrough {
            host_status: c.host_status,
            driver_status: c.driver_status,
        });
    }
    // resid is what the target did not transfer; a negative one (never seen from the
    // sg driver) carries no meaning, so it counts as none.
    let resid = u32::try_from(c.resid).unwrap_or(0).min(dxfer_len);
    let transferred = (dxfer_len - resid) as usize;
    data_in.truncate(transferred.min(data_in.len()));
    sense.truncate(usize::from(c.sb_len_wr).min(sense.len()));
    Ok(ScsiResult {
        status: c.status,
        sense: Sense::parse(&sense).map(|(k, asc, ascq)| Sense::new(k, asc, ascq)),
        sense_data: Bytes::from(sense),
        data_in: Bytes::from(data_in),
        residual: Residual {
            overflow: false,
            underflow: resid > 0,
            count: resid,
        },
    })
}

/// The device nodes `find` tries under `dev`: `sg*` in numeric order, else whole-disk
/// `sd*` (no partition digits), in name order.
fn candidates(dev: &Path) -> Vec<PathBuf> {
    let names: Vec<String> = match std::fs::read_dir(dev) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut sg: Vec<(u32, &String)> = names
        .iter()
        .filter_map(|n| Some((n.strip_prefix("sg")?.parse().ok()?, n)))
        .collect();
    sg.sort();
    if !sg.is_empty() {
        return sg.into_iter().map(|(_, n)| dev.join(n)).collect();
    }
    // sdz comes before sdaa: order by length, then name.
    let mut sd: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.strip_prefix("sd")
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase()))
        })
        .collect();
    sd.sort_by_key(|n| (n.len(), n.as_str()));
    sd.into_iter().map(|n| dev.join(n)).collect()
}

/// Why a device was not picked, or `Ok` with the transport when it is an ftss LUN.
async fn probe(path: &Path) -> Result<SgTransport, String> {
    let t = SgTransport::open(path)
        .map_err(|e| e.to_string())?
        .with_timeout(PROBE_TIMEOUT);
    let inq = scsi::inquiry(&t)
        .await
        .map_err(|e| format!("{}: INQUIRY: {e}", path.display()))?;
    if inq.vendor.trim() != FTSS_VENDOR {
        return Err(format!("{}: vendor {:?}", path.display(), inq.vendor));
    }
    scsi::inquiry_vpd(&t, 0x83)
        .await
        .map_err(|e| format!("{}: VPD page 0x83: {e}", path.display()))?;
    Ok(t.with_timeout(DEFAULT_TIMEOUT))
}

async fn find_in(dev: &Path) -> Result<SgTransport, Error> {
    let mut looked = Vec::new();
    for path in candidates(dev) {
        match probe(&path).await {
            Ok(t) => return Ok(t),
            Err(why) => {
                tracing::debug!("not an ftss LUN: {why}");
                looked.push(why);
            }
        }
    }
    let mut msg = String::from("no ftss LUN visible (looked at: ");
    if looked.is_empty() {
        let _ = write!(msg, "no {0}/sg* or {0}/sd* device", dev.display());
    } else {
        msg.push_str(&looked.join("; "));
    }
    msg.push(')');
    Err(Error::NoDevice(msg))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Offsets and size of `sg_io_hdr_t` as a C compiler lays them out from
    /// `<scsi/sg.h>` on LP64 (x86_64, aarch64).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn layout_matches_the_c_header() {
        assert_eq!(size_of::<SgIoHdr>(), 88);
        let offsets = [
            (offset_of!(SgIoHdr, interface_id), 0),
            (offset_of!(SgIoHdr, dxfer_direction), 4),
            (offset_of!(SgIoHdr, cmd_len), 8),
            (offset_of!(SgIoHdr, mx_sb_len), 9),
            (offset_of!(SgIoHdr, iovec_count), 10),
            (offset_of!(SgIoHdr, dxfer_len), 12),
            (offset_of!(SgIoHdr, dxferp), 16),
            (offset_of!(SgIoHdr, cmdp), 24),
            (offset_of!(SgIoHdr, sbp), 32),
            (offset_of!(SgIoHdr, timeout), 40),
            (offset_of!(SgIoHdr, flags), 44),
            (offset_of!(SgIoHdr, pack_id), 48),
            (offset_of!(SgIoHdr, usr_ptr), 56),
            (offset_of!(SgIoHdr, status), 64),
            (offset_of!(SgIoHdr, masked_status), 65),
            (offset_of!(SgIoHdr, msg_status), 66),
            (offset_of!(SgIoHdr, sb_len_wr), 67),
            (offset_of!(SgIoHdr, host_status), 68),
            (offset_of!(SgIoHdr, driver_status), 70),
            (offset_of!(SgIoHdr, resid), 72),
            (offset_of!(SgIoHdr, duration), 76),
            (offset_of!(SgIoHdr, info), 80),
        ];
        for (i, (got, want)) in offsets.into_iter().enumerate() {
            assert_eq!(got, want, "field {i}");
        }
    }

    #[cfg(target_pointer_width = "32")]
    #[test]
    fn layout_matches_the_c_header() {
        assert_eq!(size_of::<SgIoHdr>(), 64);
    }

    #[test]
    fn data_in_is_cut_at_the_residual_and_sense_decoded() {
        let sense = Sense::new(0x0b, 0x80, 0x02).fixed();
        let mut buf = vec![0u8; SENSE_LEN];
        buf[..sense.len()].copy_from_slice(&sense);
        let c = Completion {
            status: 0x02,
            driver_status: 0x08, // DRIVER_SENSE: sense present, not an error
            sb_len_wr: sense.len() as u8,
            resid: 1000,
            ..Completion::default()
        };
        let r = complete(c, 1024, vec![7u8; 1024], buf).unwrap();
        assert_eq!(r.status, 0x02);
        assert_eq!(r.data_in.len(), 24);
        assert_eq!(r.sense, Some(Sense::new(0x0b, 0x80, 0x02)));
        assert_eq!(r.sense_data.len(), 18);
        assert_eq!(
            r.residual,
            Residual {
                overflow: false,
                underflow: true,
                count: 1000
            }
        );
        let good = complete(Completion::default(), 8, vec![1; 8], vec![0; SENSE_LEN]).unwrap();
        assert_eq!((good.data_in.len(), good.sense), (8, None));
        assert!(good.sense_data.is_empty() && !good.residual.underflow);
    }

    #[test]
    fn host_and_driver_errors_are_errors() {
        let e = complete(
            Completion {
                host_status: 0x0e, // DID_TRANSPORT_DISRUPTED
                ..Completion::default()
            },
            0,
            Vec::new(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Passthrough {
                host_status: 0x0e,
                ..
            }
        ));
        assert!(e.is_connection_error());
        let t = complete(
            Completion {
                host_status: DID_TIME_OUT,
                ..Completion::default()
            },
            0,
            Vec::new(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(t, Error::Timeout));
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftss-sg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn candidates_prefer_sg_in_numeric_order() {
        let d = scratch_dir("cand");
        for n in ["sg10", "sg2", "sda", "sda1", "sgx", "sdb"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        assert_eq!(candidates(&d), vec![d.join("sg2"), d.join("sg10")]);
        std::fs::remove_file(d.join("sg2")).unwrap();
        std::fs::remove_file(d.join("sg10")).unwrap();
        assert_eq!(candidates(&d), vec![d.join("sda"), d.join("sdb")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn find_without_devices_says_what_it_looked_at() {
        let d = scratch_dir("empty");
        let e = find_in(&d).await.unwrap_err().to_string();
        assert!(e.starts_with("no ftss LUN visible (looked at: no "), "{e}");
        // A node that is no SCSI device (here a plain file) is named with the reason.
        std::fs::write(d.join("sg0"), b"").unwrap();
        let e = find_in(&d).await.unwrap_err().to_string();
        assert!(e.contains("sg0: not a SCSI device"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_of_a_missing_device_names_it() {
        let e = SgTransport::open("/nonexistent/sg9")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/sg9"), "{e}");
    }
}
