//! SCSI results and the handful of commands a block client needs, built on
//! [`Session::execute`] or, for the identification commands, on any [`Transport`].

use std::future::Future;

use bytes::Bytes;
use ftss_proto::cdb::op;
use ftss_proto::pdu::{Lun, Residual};
use ftss_proto::sense::{key, Sense};

use crate::{Error, Session, Transport};

/// SCSI status GOOD and CHECK CONDITION.
pub use ftss_proto::sense::status::{CHECK_CONDITION, GOOD};

/// How often a helper re-issues a command answered with UNIT ATTENTION: the first
/// command after login reports the power-on reset, and a report is consumed per nexus.
const UA_RETRIES: usize = 3;

/// The outcome of one SCSI command that reached the target and came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResult {
    /// SCSI status byte.
    pub status: u8,
    /// Sense key and codes, when sense data came back and could be decoded.
    pub sense: Option<Sense>,
    /// The raw sense data (empty when none).
    pub sense_data: Bytes,
    /// Data read, as much as the target sent.
    pub data_in: Bytes,
    /// Underflow/overflow against the expected transfer length.
    pub residual: Residual,
}

impl ScsiResult {
    /// `Ok(self)` for GOOD, else [`Error::ScsiStatus`].
    pub fn check(self) -> Result<ScsiResult, Error> {
        if self.status == GOOD {
            Ok(self)
        } else {
            Err(Error::ScsiStatus {
                status: self.status,
                sense: self.sense,
            })
        }
    }

    fn is_unit_attention(&self) -> bool {
        self.status == CHECK_CONDITION && self.sense.is_some_and(|s| s.key == key::UNIT_ATTENTION)
    }
}

/// Standard INQUIRY data, the fields a client looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inquiry {
    /// Peripheral qualifier (0: a device is connected to this LUN).
    pub peripheral_qualifier: u8,
    /// Peripheral device type (0: direct-access block device).
    pub device_type: u8,
    /// RMB bit.
    pub removable: bool,
    /// VERSION (6: SPC-4).
    pub version: u8,
    /// T10 vendor identification, trimmed.
    pub vendor: String,
    /// Product identification, trimmed.
    pub product: String,
    /// Product revision level, trimmed.
    pub revision: String,
    /// The whole response.
    pub raw: Bytes,
}

/// READ CAPACITY (16) answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks (last LBA + 1).
    pub blocks: u64,
    /// Logical block length in bytes.
    pub block_size: u32,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// `cdb` on `t`, retrying UNIT ATTENTION, and turning any other non-GOOD status into
/// [`Error::ScsiStatus`].
pub async fn execute_checked<T: Transport + ?Sized>(
    t: &T,
    cdb: &[u8],
    data_out: Option<Bytes>,
    data_in_len: u32,
) -> Result<ScsiResult, Error> {
    let mut tries = 0;
    loop {
        let r = t.execute(cdb, data_out.clone(), data_in_len).await?;
        if r.is_unit_attention() && tries < UA_RETRIES {
            tries += 1;
            continue;
        }
        return r.check();
    }
}

/// Standard INQUIRY on `t`.
pub async fn inquiry<T: Transport + ?Sized>(t: &T) -> Result<Inquiry, Error> {
    let r = execute_checked(t, &[op::INQUIRY, 0, 0, 0, 255, 0], None, 255).await?;
    let d = r.data_in;
    if d.len() < 36 {
        return Err(Error::Protocol(format!(
            "INQUIRY data of {} bytes",
            d.len()
        )));
    }
    Ok(Inquiry {
        peripheral_qualifier: d[0] >> 5,
        device_type: d[0] & 0x1f,
        removable: d[1] & 0x80 != 0,
        version: d[2],
        vendor: ascii(&d[8..16]),
        product: ascii(&d[16..32]),
        revision: ascii(&d[32..36]),
        raw: d,
    })
}

/// INQUIRY for a vital product data page on `t`; returns the whole page, header included.
pub async fn inquiry_vpd<T: Transport + ?Sized>(t: &T, page: u8) -> Result<Bytes, Error> {
    let len: u16 = 4096;
    let [hi, lo] = len.to_be_bytes();
    let r = execute_checked(t, &[op::INQUIRY, 1, page, hi, lo, 0], None, len.into()).await?;
    if r.data_in.len() < 4 || r.data_in[1] != page {
        return Err(Error::Protocol(format!("bad VPD page {page:#04x} answer")));
    }
    Ok(r.data_in)
}

/// READ CAPACITY (16) on `t`.
pub async fn read_capacity16<T: Transport + ?Sized>(t: &T) -> Result<Capacity, Error> {
    let mut c = [0u8; 16];
    c[0] = op::SERVICE_ACTION_IN_16;
    c[1] = op::SA_READ_CAPACITY_16;
    c[13] = 32;
    let r = execute_checked(t, &c, None, 32).await?;
    let d = &r.data_in;
    if d.len() < 12 {
        return Err(Error::Protocol(format!(
            "READ CAPACITY data of {} bytes",
            d.len()
        )));
    }
    let mut last = [0u8; 8];
    last.copy_from_slice(&d[0..8]);
    Ok(Capacity {
        blocks: u64::from_be_bytes(last).wrapping_add(1),
        block_size: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
    })
}

/// One LUN of a borrowed session as a [`Transport`], so that the session's helpers and
/// the generic ones above are one implementation (an [`IscsiTransport`](crate::IscsiTransport)
/// would need an `Arc`).
struct OnLun<'a> {
    session: &'a Session,
    lun: u16,
}

impl Transport for OnLun<'_> {
    fn execute(
        &self,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> impl Future<Output = Result<ScsiResult, Error>> + Send {
        self.session.execute(self.lun, cdb, data_out, data_in_len)
    }
}

impl Session {
    fn on(&self, lun: u16) -> OnLun<'_> {
        OnLun { session: self, lun }
    }

    /// `execute`, retrying UNIT ATTENTION, and turning any other non-GOOD status into
    /// [`Error::ScsiStatus`].
    pub async fn execute_checked(
        &self,
        lun: u16,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, Error> {
        execute_checked(&self.on(lun), cdb, data_out, data_in_len).await
    }

    /// TEST UNIT READY.
    pub async fn test_unit_ready(&self, lun: u16) -> Result<(), Error> {
        self.execute_checked(lun, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], None, 0)
            .await
            .map(drop)
    }

    /// Standard INQUIRY.
    pub async fn inquiry(&self, lun: u16) -> Result<Inquiry, Error> {
        inquiry(&self.on(lun)).await
    }

    /// INQUIRY for a vital product data page; returns the whole page, header included.
    pub async fn inquiry_vpd(&self, lun: u16, page: u8) -> Result<Bytes, Error> {
        inquiry_vpd(&self.on(lun), page).await
    }

    /// READ CAPACITY (16).
    pub async fn read_capacity16(&self, lun: u16) -> Result<Capacity, Error> {
        read_capacity16(&self.on(lun)).await
    }

    /// READ (16) of `blocks` blocks of `block_size` bytes at `lba`.
    pub async fn read16(
        &self,
        lun: u16,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<Bytes, Error> {
        let len = blocks
            .checked_mul(block_size)
            .ok_or_else(|| Error::InvalidArgument("read length overflows".into()))?;
        let r = self
            .execute_checked(lun, &rw16(op::READ_16, lba, blocks), None, len)
            .await?;
        if r.data_in.len() != len as usize {
            return Err(Error::Protocol(format!(
                "READ returned {} of {len} bytes",
                r.data_in.len()
            )));
        }
        Ok(r.data_in)
    }

    /// WRITE (16) of `data` (a whole number of `block_size` blocks) at `lba`.
    pub async fn write16(
        &self,
        lun: u16,
        lba: u64,
        data: Bytes,
        block_size: u32,
    ) -> Result<(), Error> {
        let bs = block_size as usize;
        if bs == 0 || data.is_empty() || !data.len().is_multiple_of(bs) {
            return Err(Error::InvalidArgument(format!(
                "{} bytes is not a whole number of {block_size}-byte blocks",
                data.len()
            )));
        }
        let blocks = u32::try_from(data.len() / bs)
            .map_err(|_| Error::InvalidArgument("write too long".into()))?;
        self.execute_checked(lun, &rw16(op::WRITE_16, lba, blocks), Some(data), 0)
            .await
            .map(drop)
    }

    /// SYNCHRONIZE CACHE (10) for the whole LUN.
    pub async fn synchronize_cache(&self, lun: u16) -> Result<(), Error> {
        let c = [op::SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        self.execute_checked(lun, &c, None, 0).await.map(drop)
    }

    /// REPORT LUNS: the LUN numbers the target serves to us.
    pub async fn report_luns(&self) -> Result<Vec<u16>, Error> {
        let len: u32 = 16 + 8 * 1024;
        let mut c = [0u8; 12];
        c[0] = op::REPORT_LUNS;
        c[6..10].copy_from_slice(&len.to_be_bytes());
        let r = self.execute_checked(0, &c, None, len).await?;
        let d = &r.data_in;
        if d.len() < 8 {
            return Err(Error::Protocol("REPORT LUNS header truncated".into()));
        }
        let list = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let avail = &d[8..(8 + list).min(d.len())];
        Ok(avail
            .chunks_exact(8)
            .filter_map(|e| {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                Lun(u64::from_be_bytes(b)).number()
            })
            .filter_map(|n| u16::try_from(n).ok())
            .collect())
    }
}
