//! SPC-4 primary commands: INQUIRY and its VPD pages, MODE SENSE/SELECT, REQUEST SENSE,
//! REPORT LUNS, REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, TEST UNIT
//! READY.

use ftss_proto::cdb::{allocation_length, be, op};
use ftss_proto::pdu::Lun as WireLun;
use ftss_proto::sense::{common, Sense};

use super::command::{CmdResult, Ctx, Reply};
use super::commands::commands;
use super::lun::Lun;
use super::target::ScsiTarget;
use super::{ItNexus, ScsiCommand};
use crate::media::CacheMode;

const VENDOR: &[u8; 8] = b"FTSS    ";
const PRODUCT: &[u8; 16] = b"ftss-lun        ";
const REVISION: &[u8; 4] = b"0001";

fn field(byte: u16, bit: Option<u8>) -> Sense {
    common::INVALID_FIELD_IN_CDB.cdb_field(byte, bit)
}

/// Clips to the allocation length.
fn clip(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    data.truncate(alloc as usize);
    data
}

pub(crate) fn test_unit_ready(c: &Ctx<'_>) -> CmdResult {
    ready(c.lun)?;
    Ok(Reply::none())
}

/// NOT READY when the medium is ejected, HARDWARE ERROR when the backing store failed
/// (multipath path checkers rely on TEST UNIT READY saying so).
pub(crate) fn ready(lun: &Lun) -> Result<(), Sense> {
    if lun.state().ejected {
        return Err(common::MEDIUM_NOT_PRESENT);
    }
    lun.store.health().map_err(|_| common::LOGICAL_UNIT_FAILURE)
}

pub(crate) fn request_sense_cmd(c: &Ctx<'_>) -> CmdResult {
    let pending = c.target.take_ua(c.nexus.id, c.lun.number, c.arrived);
    request_sense(Some(c.lun), c.cmd, pending)
}

/// REQUEST SENSE: reports `pending` (a unit attention, or LUN NOT SUPPORTED for a LUN that
/// does not exist) or NO SENSE, in the format the DESC bit asks for.
pub(crate) fn request_sense(
    _lun: Option<&Lun>,
    cmd: &ScsiCommand<'_>,
    pending: Option<Sense>,
) -> CmdResult {
    let desc = cmd.cdb.get(1).is_some_and(|b| b & 1 != 0);
    let alloc = allocation_length(cmd.cdb).unwrap_or(0);
    let s = pending.unwrap_or(common::NO_SENSE);
    Ok(Reply::good(clip(s.encode(desc), alloc)))
}

fn standard_inquiry(lun: Option<&Lun>) -> Vec<u8> {
    let mut d = vec![0u8; 66];
    match lun {
        // Peripheral qualifier 011b, device type 1Fh: no logical unit here.
        None => d[0] = 0x7f,
        Some(l) => {
            d[0] = 0x00;
            if l.removable {
                d[1] = 0x80;
            }
        }
    }
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn check_inquiry_cdb(cdb: &[u8]) -> Result<(bool, u8, u32), Sense> {
    let evpd = cdb[1] & 0x01 != 0;
    if cdb[1] & 0x02 != 0 {
        return Err(field(1, Some(1))); // CMDDT is obsolete
    }
    let page = cdb[2];
    if !evpd && page != 0 {
        return Err(field(2, None));
    }
    Ok((evpd, page, allocation_length(cdb).unwrap_or(0)))
}

/// INQUIRY for a LUN that does not exist.
pub(crate) fn inquiry_no_lun(cmd: &ScsiCommand<'_>) -> CmdResult {
    if cmd.cdb.len() < 6 {
        return Err(field(0, None));
    }
    let (evpd, _, alloc) = check_inquiry_cdb(cmd.cdb)?;
    if evpd {
        return Err(common::LUN_NOT_SUPPORTED);
    }
    Ok(Reply::good(clip(standard_inquiry(None), alloc)))
}

const VPD_PAGES: [u8; 8] = [0x00, 0x80, 0x83, 0x86, 0x8f, 0xb0, 0xb1, 0xb2];

pub(crate) fn inquiry(c: &Ctx<'_>) -> CmdResult {
    let (evpd, page, alloc) = check_inquiry_cdb(c.cmd.cdb)?;
    if !evpd {
        return Ok(Reply::good(clip(standard_inquiry(Some(c.lun)), alloc)));
    }
    let l = c.lun;
    let mut d = vec![0u8, page, 0, 0];
    match page {
        0x00 => d.extend_from_slice(&VPD_PAGES),
        0x80 => d.extend_from_slice(l.serial.as_bytes()),
        0x83 => {
            // NAA locally assigned, LUN association.
            d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
            d.extend_from_slice(&l.naa);
            // T10 vendor identification: vendor + serial.
            let t10: Vec<u8> = VENDOR.iter().chain(l.serial.as_bytes()).copied().collect();
            d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            d.extend_from_slice(&t10);
            // SCSI name string of the target device (iSCSI, PIV, association 10b).
            let mut name = c.target.identity.iqn.as_bytes().to_vec();
            name.push(0);
            while !name.len().is_multiple_of(4) {
                name.push(0);
            }
            d.extend_from_slice(&[0x53, 0xa8, 0x00, name.len() as u8]);
            d.extend_from_slice(&name);
            // Relative target port 1 (iSCSI, PIV, target port association).
            d.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0, 0, 0, 1]);
        }
        0x86 => {
            let mut p = [0u8; 60];
            p[1] = 0x07; // HEADSUP, ORDSUP, SIMPSUP
            p[2] = match l.store.cache_mode() {
                CacheMode::WriteThrough => 0,
                CacheMode::Volatile => 0x01,    // V_SUP
                CacheMode::Nonvolatile => 0x02, // NV_SUP
            };
            d.extend_from_slice(&p);
        }
        // Third-party Copy: what the copy manager (xcopy.rs) supports.
        0x8f => d.extend(super::xcopy::third_party_copy_vpd(l)),
        0xb0 => {
            let mut p = [0u8; 60];
            // OPTIMAL TRANSFER LENGTH GRANULARITY (page bytes 6-7): one physical block.
            p[2..4].copy_from_slice(&(1u16 << l.physical_exponent()).to_be_bytes());
            p[4..8].copy_from_slice(&l.transfer_blocks_max().to_be_bytes());
            // Optimal transfer length: 1 MiB.
            p[8..12].copy_from_slice(&((1u32 << 20) / l.block_size()).to_be_bytes());
            super::provisioning::block_limits(l, &mut p);
            d.extend_from_slice(&p);
        }
        0xb1 => {
            let mut p = [0u8; 60];
            p[1] = 0x01; // non-rotating medium
                         // WABEREQ 01b: after SANITIZE BLOCK ERASE, reads succeed (they return zeros).
            p[3] = 0x40;
            d.extend_from_slice(&p);
        }
        0xb2 => d.extend_from_slice(&super::provisioning::provisioning_vpd(l)),
        _ => return Err(field(2, None)),
    }
    let len = (d.len() - 4) as u16;
    d[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(Reply::good(clip(d, alloc)))
}

/// REPORT LUNS, for any LUN (even one that does not exist).
pub(crate) fn report_luns(t: &ScsiTarget, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> CmdResult {
    if cmd.cdb.len() < 12 {
        return Err(field(0, None));
    }
    let select = cmd.cdb[2];
    if select > 2 {
        return Err(field(2, None));
    }
    let alloc = allocation_length(cmd.cdb).unwrap_or(0);
    if alloc < 16 {
        return Err(field(6, None));
    }
    // Select 1 (well-known LUNs only): we have none.
    let luns: Vec<u64> = if select == 1 {
        Vec::new()
    } else {
        t.lun_numbers_for(nexus)
    };
    let mut d = vec![0u8; 8];
    d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    for l in luns {
        d.extend_from_slice(&WireLun::from_number(l as u16).0.to_be_bytes());
    }
    Ok(Reply::good(clip(d, alloc)))
}

pub(crate) fn report_luns_cmd(c: &Ctx<'_>) -> CmdResult {
    report_luns(c.target, c.nexus, c.cmd)
}

// ---- mode pages ----

/// Mode page bytes for page `code` under page control `pc` (0 current, 1 changeable,
/// 2 default).
fn mode_page(l: &Lun, code: u8, pc: u8) -> Option<Vec<u8>> {
    let d_sense = l.state().d_sense;
    let wce = l.store.cache_mode() != CacheMode::WriteThrough;
    Some(match code {
        0x01 => {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 10;
            if pc != 1 {
                p[2] = 0xc0; // AWRE, ARRE
            }
            p
        }
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            if pc != 1 && wce {
                p[2] = 0x04; // WCE
            }
            p
        }
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 10;
            match pc {
                1 => {
                    p[2] = 0x04; // D_SENSE is changeable
                    p[4] = 0x08; // and SWP
                }
                0 => {
                    p[2] = if d_sense { 0x04 } else { 0 };
                    p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
                    p[4] = if l.state().swp { 0x08 } else { 0 };
                }
                _ => p[3] = 0x10,
            }
            if pc != 1 {
                // TAS (not changeable): a task aborted by another I_T nexus (PREEMPT AND
                // ABORT) ends with TASK ABORTED status rather than silently. Linux
                // (open-iscsi under the SCSI midlayer) retries a TASK ABORTED command at
                // once, and the retry meets the unit attention and then the reservation
                // conflict, so a fenced node fails its I/O within milliseconds. With
                // TAS=0 the command would vanish: the initiator waits for its command
                // timeout (30 s by default), then runs error recovery (ABORT TASK, LUN
                // reset) against a LUN it no longer has access to. LIO defaults to
                // TAS=1 (emulate_tas) for the same reason.
                p[5] = 0x40;
            }
            p
        }
        0x1c => {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 10;
            p
        }
        _ => return None,
    })
}

const MODE_PAGES: [u8; 4] = [0x01, 0x08, 0x0a, 0x1c];

pub(crate) fn mode_sense(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let ten = cdb[0] == op::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = allocation_length(cdb).unwrap_or(0);
    if pc == 3 {
        return Err(common::SAVING_PARAMS_UNSUPPORTED);
    }
    let mut pages = Vec::new();
    if page == 0x3f {
        if subpage != 0 && subpage != 0xff {
            return Err(field(3, None));
        }
        for p in MODE_PAGES {
            pages.extend(mode_page(c.lun, p, pc).unwrap_or_default());
        }
    } else {
        if subpage != 0 {
            return Err(field(3, None));
        }
        match mode_page(c.lun, page, pc) {
            Some(p) => pages.extend(p),
            None => return Err(field(2, Some(5))),
        }
    }
    let l = c.lun;
    let mut bd = Vec::new();
    if !dbd {
        let blocks = l.blocks();
        if llbaa {
            bd.extend_from_slice(&blocks.to_be_bytes());
            bd.extend_from_slice(&[0, 0, 0, 0]);
            bd.extend_from_slice(&l.block_size().to_be_bytes());
        } else {
            bd.extend_from_slice(&(blocks.min(0xffff_ffff) as u32).to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&l.block_size().to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP for read-only LUNs, DPOFUA.
    let dsp = if l.write_protected() { 0x80 } else { 0 } | 0x10;
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dsp;
        if llbaa && !dbd {
            h[4] = 0x01; // LONGLBA
        }
        h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dsp, bd.len() as u8]
    };
    d.extend(bd);
    d.extend(pages);
    if ten {
        let n = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        d[0] = (d.len() - 1) as u8;
    }
    Ok(Reply::good(clip(d, alloc)))
}

pub(crate) fn mode_select(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let ten = cdb[0] == op::MODE_SELECT_10;
    let pf = cdb[1] & 0x10 != 0;
    let sp = cdb[1] & 0x01 != 0;
    let len = if ten { be(cdb, 7, 2) } else { be(cdb, 4, 1) }.unwrap_or(0) as usize;
    let mut reply = Reply::none();
    reply.data_out_len = Some(len as u32);
    if sp {
        return Err(field(1, Some(0)));
    }
    if len == 0 {
        return Ok(reply);
    }
    if !pf {
        return Err(field(1, Some(4)));
    }
    let data = c.cmd.data_out;
    if data.len() < len {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let data = &data[..len];
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let bdl = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    let mut pos = hdr + bdl;
    if pos > data.len() {
        return Err(common::PARAM_LIST_LENGTH_ERROR);
    }
    let mut new_d_sense = None;
    let mut new_swp = None;
    while pos < data.len() {
        if pos + 2 > data.len() {
            return Err(common::PARAM_LIST_LENGTH_ERROR);
        }
        let code = data[pos] & 0x3f;
        if data[pos] & 0x40 != 0 {
            // SPF: subpages are not supported.
            return Err(common::INVALID_FIELD_IN_PARAM_LIST.param_field(pos as u16, Some(6)));
        }
        let plen = usize::from(data[pos + 1]) + 2;
        let Some(cur) = mode_page(c.lun, code, 0) else {
            return Err(common::INVALID_FIELD_IN_PARAM_LIST.param_field(pos as u16, None));
        };
        let mask = mode_page(c.lun, code, 1).unwrap_or_default();
        if plen != cur.len() || pos + plen > data.len() {
            return Err(common::INVALID_FIELD_IN_PARAM_LIST.param_field(pos as u16 + 1, None));
        }
        let page = &data[pos..pos + plen];
        for i in 2..plen {
            if (page[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(common::INVALID_FIELD_IN_PARAM_LIST.param_field((pos + i) as u16, None));
            }
        }
        if code == 0x0a {
            new_d_sense = Some(page[2] & 0x04 != 0);
            new_swp = Some(page[4] & 0x08 != 0);
        }
        pos += plen;
    }
    if let Some(ds) = new_d_sense {
        let changed = {
            let mut s = c.lun.state();
            let changed = s.d_sense != ds || new_swp.is_some_and(|w| w != s.swp);
            s.d_sense = ds;
            if let Some(w) = new_swp {
                s.swp = w;
            }
            changed
        };
        if changed {
            c.target
                .ua_others(c.nexus.id, c.lun.number, common::MODE_PARAMS_CHANGED);
        }
    }
    Ok(reply)
}

// ---- capability reports ----

fn timeouts_descriptor() -> [u8; 12] {
    // Length 10, nominal 0 (not specified), recommended 30 s.
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t[8..12].copy_from_slice(&30u32.to_be_bytes());
    t
}

pub(crate) fn report_supported_opcodes(c: &Ctx<'_>) -> CmdResult {
    let cdb = c.cmd.cdb;
    let rctd = cdb[2] & 0x80 != 0;
    let option = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = u16::from_be_bytes([cdb[4], cdb[5]]);
    let alloc = allocation_length(cdb).unwrap_or(0);
    let mut d = Vec::new();
    match option {
        0 => {
            d.extend_from_slice(&[0, 0, 0, 0]);
            for cmd in commands() {
                d.push(cmd.opcode);
                d.push(0);
                d.extend_from_slice(&u16::from(cmd.sa.unwrap_or(0)).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | if cmd.sa.is_some() { 0x01 } else { 0 });
                d.extend_from_slice(&u16::from(cmd.cdb_len).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&timeouts_descriptor());
                }
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1 | 2 => {
            let has_sa = commands().any(|x| x.opcode == req_op && x.sa.is_some());
            if option == 1 && has_sa {
                return Err(field(2, Some(0)));
            }
            if option == 2 && !has_sa && commands().any(|x| x.opcode == req_op) {
                return Err(field(2, Some(0)));
            }
            let found = commands()
                .find(|x| x.opcode == req_op && (option == 1 || x.sa == u8::try_from(req_sa).ok()));
            match found {
                Some(cmd) => {
                    d.extend_from_slice(&[0, if rctd { 0x80 } else { 0 } | 0x03]);
                    d.extend_from_slice(&u16::from(cmd.cdb_len).to_be_bytes());
                    let mut usage = cmd.usage.to_vec();
                    // SPC-4 6.35.3: the usage map starts with the opcode itself.
                    usage[0] = cmd.opcode;
                    if let (Some(sa), Some(b)) = (cmd.sa, usage.get_mut(1)) {
                        *b = (*b & 0xe0) | sa;
                    }
                    d.extend_from_slice(&usage);
                    if rctd {
                        d.extend_from_slice(&timeouts_descriptor());
                    }
                }
                // SUPPORT 001b: not supported, no usage data.
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(field(2, Some(0))),
    }
    Ok(Reply::good(clip(d, alloc)))
}

pub(crate) fn report_supported_tmfs(c: &Ctx<'_>) -> CmdResult {
    let alloc = allocation_length(c.cmd.cdb).unwrap_or(0);
    if alloc < 4 {
        return Err(field(6, None));
    }
    // ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET.
    Ok(Reply::good(clip(vec![0xda, 0, 0, 0], alloc)))
}
