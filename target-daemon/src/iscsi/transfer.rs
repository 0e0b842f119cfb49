//! Data movement for one task, without I/O: collecting a write's data-out (immediate data,
//! unsolicited Data-Out, and R2T-solicited sequences) and cutting a read's data-in into
//! Data-In PDUs that respect the initiator's MaxRecvDataSegmentLength and MaxBurstLength.

use ftss_proto::serial::DataSn;

/// Negotiated limits that shape data movement on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct XferLimits {
    /// The initiator's MaxRecvDataSegmentLength: the largest Data-In data segment.
    pub(crate) send_segment_max: u32,
    /// MaxBurstLength: the largest Data-In sequence or solicited Data-Out sequence.
    pub(crate) burst_max: u32,
    /// FirstBurstLength: unsolicited data (immediate + Data-Out) the initiator may send.
    pub(crate) first_burst: u32,
    /// InitialR2T: when true the initiator sends no unsolicited Data-Out.
    pub(crate) initial_r2t: bool,
    /// ImmediateData: whether the command PDU may carry data.
    pub(crate) immediate_data: bool,
    /// MaxOutstandingR2T.
    pub(crate) outstanding_r2t_max: u32,
}

/// Protocol violations in data-out; the connection answers with a Reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum XferError {
    #[error("immediate data not negotiated or longer than FirstBurstLength")]
    ImmediateData,
    #[error("Data-Out outside the expected range of its sequence")]
    Offset,
    #[error("Data-Out for an unknown target transfer tag")]
    UnknownTtt,
    #[error("Data-Out DataSN out of order")]
    DataSn,
}

/// One R2T sent and not yet satisfied.
#[derive(Debug)]
struct R2tSeq {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: DataSn,
}

/// An R2T to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct R2tOut {
    pub(crate) ttt: u32,
    pub(crate) r2t_sn: u32,
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

/// Collects the data-out of one write command.
#[derive(Debug)]
pub(crate) struct WriteCollect {
    /// Expected Data Transfer Length.
    edtl: u32,
    /// Data buffer, grown as data arrives (up to the end of the furthest range received),
    /// so a Data-Out that never comes pins no memory for it.
    buf: Vec<u8>,
    /// End of the unsolicited range [0, unsolicited_end).
    unsolicited_end: u32,
    /// Bytes of unsolicited data received so far (they arrive in order).
    unsolicited_received: u32,
    unsolicited_next_sn: DataSn,
    /// Next offset an R2T will ask for.
    next_r2t_offset: u32,
    r2t_sn: u32,
    outstanding: Vec<R2tSeq>,
    /// Bytes received in total.
    received: u32,
    active: bool,
}

impl WriteCollect {
    /// Starts collecting for a command with `edtl` bytes expected, `immediate` bytes carried
    /// in the command PDU, and F bit `final_` (no unsolicited Data-Out follows).
    pub(crate) fn new(
        edtl: u32,
        immediate: &[u8],
        final_: bool,
        lim: &XferLimits,
    ) -> Result<Self, XferError> {
        let imm = immediate.len() as u32;
        if imm > 0 && (!lim.immediate_data || imm > lim.first_burst || imm > edtl) {
            return Err(XferError::ImmediateData);
        }
        // With InitialR2T=Yes no unsolicited Data-Out may follow whatever the F bit says;
        // any that arrives fails the offset check below and is rejected.
        let unsolicited_end = if final_ || lim.initial_r2t {
            imm
        } else {
            lim.first_burst.min(edtl).max(imm)
        };
        let buf = immediate.to_vec();
        Ok(Self {
            edtl,
            buf,
            unsolicited_end,
            unsolicited_received: imm,
            unsolicited_next_sn: DataSn(0),
            next_r2t_offset: unsolicited_end,
            r2t_sn: 0,
            outstanding: Vec::new(),
            received: imm,
            active: false,
        })
    }

    /// Bytes of buffer this command holds once active (for the connection's budget).
    pub(crate) fn edtl(&self) -> u32 {
        self.edtl
    }

    /// Grants the command its share of the connection's write budget; R2Ts may be sent
    /// from now on. The buffer itself grows only as the data arrives.
    pub(crate) fn activate(&mut self) {
        self.active = true;
    }

    /// Bytes of buffer allocated so far.
    pub(crate) fn held(&self) -> usize {
        self.buf.len()
    }

    /// The collected data-out, `edtl` bytes once complete.
    pub(crate) fn into_data(mut self) -> Vec<u8> {
        self.buf.resize(self.edtl as usize, 0);
        self.buf
    }

    /// Copies `data` to `offset`, growing the buffer to reach it (ranges were checked
    /// against `edtl`).
    fn put(&mut self, offset: u32, data: &[u8]) {
        let (start, end) = (offset as usize, offset as usize + data.len());
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[start..end].copy_from_slice(data);
    }

    /// All data received.
    pub(crate) fn is_complete(&self) -> bool {
        self.received == self.edtl
    }

    /// Number of R2Ts sent so far.
    pub(crate) fn r2t_count(&self) -> u32 {
        self.r2t_sn
    }

    /// R2Ts to send now, up to MaxOutstandingR2T outstanding. `next_ttt` allocates tags.
    pub(crate) fn poll_r2ts(
        &mut self,
        lim: &XferLimits,
        mut next_ttt: impl FnMut() -> u32,
    ) -> Vec<R2tOut> {
        let mut out = Vec::new();
        if !self.active {
            return out;
        }
        while self.next_r2t_offset < self.edtl
            && (self.outstanding.len() as u32) < lim.outstanding_r2t_max.max(1)
        {
            let len = (self.edtl - self.next_r2t_offset).min(lim.burst_max);
            let r = R2tOut {
                ttt: next_ttt(),
                r2t_sn: self.r2t_sn,
                offset: self.next_r2t_offset,
                len,
            };
            self.r2t_sn += 1;
            self.next_r2t_offset += len;
            self.outstanding.push(R2tSeq {
                ttt: r.ttt,
                offset: r.offset,
                len,
                received: 0,
                next_data_sn: DataSn(0),
            });
            out.push(r);
        }
        out
    }

    /// Takes one Data-Out PDU's data.
    pub(crate) fn data_out(
        &mut self,
        ttt: u32,
        data_sn: DataSn,
        offset: u32,
        data: &[u8],
    ) -> Result<(), XferError> {
        let len = u32::try_from(data.len()).map_err(|_| XferError::Offset)?;
        if ttt == ftss_proto::pdu::RESERVED_TAG {
            // Unsolicited data arrives in order from the end of the immediate data.
            if offset != self.unsolicited_received
                || offset
                    .checked_add(len)
                    .is_none_or(|e| e > self.unsolicited_end)
            {
                return Err(XferError::Offset);
            }
            if data_sn != self.unsolicited_next_sn {
                return Err(XferError::DataSn);
            }
            self.unsolicited_next_sn = data_sn.next();
            self.put(offset, data);
            self.unsolicited_received += len;
            self.received += len;
            return Ok(());
        }
        let i = self
            .outstanding
            .iter()
            .position(|s| s.ttt == ttt)
            .ok_or(XferError::UnknownTtt)?;
        let seq = &mut self.outstanding[i];
        if offset != seq.offset + seq.received || seq.received + len > seq.len {
            return Err(XferError::Offset);
        }
        if data_sn != seq.next_data_sn {
            return Err(XferError::DataSn);
        }
        seq.next_data_sn = data_sn.next();
        seq.received += len;
        let done = seq.received == seq.len;
        self.put(offset, data);
        self.received += len;
        if done {
            self.outstanding.swap_remove(i);
        }
        Ok(())
    }
}

/// One Data-In PDU to send: a slice of the task's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataInPiece {
    pub(crate) offset: u32,
    pub(crate) len: u32,
    /// Last PDU of a MaxBurstLength sequence.
    pub(crate) final_: bool,
    pub(crate) data_sn: DataSn,
}

/// Cuts `len` bytes of data-in into PDUs: each at most the initiator's segment limit, each
/// sequence at most MaxBurstLength with F on its last PDU.
pub(crate) fn data_in_pieces(len: u32, lim: &XferLimits) -> Vec<DataInPiece> {
    let seg = lim.send_segment_max.max(512);
    let burst = lim.burst_max.max(512);
    let mut out = Vec::new();
    let mut off = 0u32;
    let mut sn = DataSn(0);
    while off < len {
        let burst_end = (off + burst).min(len);
        while off < burst_end {
            let n = (burst_end - off).min(seg);
            out.push(DataInPiece {
                offset: off,
                len: n,
                final_: off + n == burst_end,
                data_sn: sn,
            });
            sn = sn.next();
            off += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> XferLimits {
        XferLimits {
            send_segment_max: 8192,
            burst_max: 65536,
            first_burst: 16384,
            initial_r2t: false,
            immediate_data: true,
            outstanding_r2t_max: 2,
        }
    }

    #[test]
    fn data_in_respects_segment_and_burst() {
        let l = XferLimits {
            send_segment_max: 3000,
            burst_max: 7000,
            ..lim()
        };
        let p = data_in_pieces(15000, &l);
        assert!(p.iter().all(|x| x.len <= 3000));
        // Bursts: [0,7000) [7000,14000) [14000,15000); F closes each.
        let finals: Vec<u32> = p
            .iter()
            .filter(|x| x.final_)
            .map(|x| x.offset + x.len)
            .collect();
        assert_eq!(finals, vec![7000, 14000, 15000]);
        let total: u32 = p.iter().map(|x| x.len).sum();
        assert_eq!(total, 15000);
        for (i, x) in p.iter().enumerate() {
            assert_eq!(x.data_sn, DataSn(i as u32));
        }
        assert!(data_in_pieces(0, &l).is_empty());
    }

    #[test]
    fn write_with_immediate_unsolicited_and_r2ts() {
        let l = lim();
        let edtl = 200_000u32;
        let imm = vec![1u8; 4096];
        let mut w = WriteCollect::new(edtl, &imm, false, &l).expect("valid command");
        w.activate();
        // Unsolicited: [4096, 16384) in two PDUs.
        w.data_out(u32::MAX, DataSn(0), 4096, &[2u8; 8192])
            .expect("in order");
        assert_eq!(
            w.data_out(u32::MAX, DataSn(0), 12288, &[2u8; 4096]),
            Err(XferError::DataSn)
        );
        w.data_out(u32::MAX, DataSn(1), 12288, &[2u8; 4096])
            .expect("in order");
        assert_eq!(
            w.data_out(u32::MAX, DataSn(2), 16384, &[2u8; 1]),
            Err(XferError::Offset)
        );
        let mut ttt = 100;
        let r = w.poll_r2ts(&l, || {
            ttt += 1;
            ttt
        });
        // MaxOutstandingR2T = 2: two R2Ts of MaxBurstLength.
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].offset, r[0].len, r[0].r2t_sn), (16384, 65536, 0));
        assert_eq!((r[1].offset, r[1].len, r[1].r2t_sn), (81920, 65536, 1));
        // DataSN restarts at 0 in every R2T's sequence.
        for (k, chunk) in (0..8).map(|k| (k, 8192u32)) {
            w.data_out(r[1].ttt, DataSn(k), r[1].offset + k * chunk, &[3u8; 8192])
                .expect("second R2T sequence");
        }
        assert!(
            w.poll_r2ts(&l, || 999).len() == 1,
            "a slot freed: the last R2T goes out"
        );
        assert_eq!(
            w.data_out(555, DataSn(0), 0, &[0]),
            Err(XferError::UnknownTtt)
        );
        assert!(!w.is_complete());
    }

    #[test]
    fn immediate_data_rules() {
        let mut l = lim();
        l.immediate_data = false;
        assert_eq!(
            WriteCollect::new(512, &[0u8; 512], true, &l).err(),
            Some(XferError::ImmediateData)
        );
        let l = lim();
        assert_eq!(
            WriteCollect::new(100_000, &[0u8; 20_000], true, &l).err(),
            Some(XferError::ImmediateData)
        );
        let w = WriteCollect::new(512, &[0u8; 512], true, &l).expect("all immediate");
        assert!(w.is_complete());
    }

    #[test]
    fn a_write_buffer_grows_as_data_arrives() {
        let l = XferLimits {
            initial_r2t: true,
            outstanding_r2t_max: 1,
            ..lim()
        };
        let edtl = 32 << 20;
        let mut w = WriteCollect::new(edtl, &[], true, &l).expect("solicited only");
        w.activate();
        let r = w.poll_r2ts(&l, || 7);
        assert_eq!(r.len(), 1);
        assert_eq!(
            w.held(),
            0,
            "an R2T whose Data-Out never comes pins nothing"
        );
        w.data_out(7, DataSn(0), 0, &[9u8; 8192]).expect("in order");
        assert_eq!(w.held(), 8192);
        let data = w.into_data();
        assert_eq!(data.len(), edtl as usize, "handed over whole");
        assert_eq!(&data[..8192], &[9u8; 8192][..]);
    }

    #[test]
    fn initial_r2t_forbids_unsolicited() {
        let l = XferLimits {
            initial_r2t: true,
            ..lim()
        };
        let mut w = WriteCollect::new(4096, &[], false, &l).expect("solicited only");
        assert_eq!(
            w.data_out(u32::MAX, DataSn(0), 0, &[0u8; 512]),
            Err(XferError::Offset)
        );
    }
}
