//! Cutting a byte stream into whole PDU frames (RFC 7143 section 11.2): the one frame
//! reader the target and the initiator share.
//!
//! [`FrameDecoder`] is fed bytes as they arrive and hands out a [`Frame`] once one is
//! complete. It looks at the Basic Header Segment first and checks its lengths against the
//! receive limit of its [`Framing`] before it buffers the rest, so what it holds stays
//! bounded by that limit whatever the peer announces. With header digests on, it checks
//! the digest before it believes the lengths (RFC 7143 section 7.8: a header that fails its
//! digest cannot be trusted to say where the next PDU starts).
//!
//! A frame above the limit is not buffered: the decoder returns
//! [`FrameError::TooLong`] with the offending header, then drops the rest of that frame as
//! it arrives, so the stream stays framed and the caller may answer with a Reject or close.
//! A header digest failure poisons the decoder: every later call returns
//! [`FrameError::HeaderDigest`], because the stream position is lost.
//!
//! It reads nothing itself: a shell reads at most [`FrameDecoder::want`] bytes (so nothing
//! beyond the current frame is read off the socket) and hands them to
//! [`FrameDecoder::feed`].

use bytes::{Buf, Bytes, BytesMut};

use crate::digest;
use crate::pdu::{DecodeError, Framing, Pdu, BHS_LEN};

/// Bytes of an oversized frame dropped per step: the shell reads at most this many at once
/// while the decoder skips it.
const DISCARD_CHUNK_BYTES: usize = 64 << 10;

/// Why the stream could not be cut into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces a data segment above our limit. The frame is skipped, not
    /// buffered; the header is kept for a Reject (RFC 7143 11.17).
    #[error("data segment of {len} bytes exceeds our limit of {max}")]
    TooLong {
        /// The Basic Header Segment of the refused frame.
        bhs: [u8; BHS_LEN],
        /// DataSegmentLength in the header.
        len: u32,
        /// Our MaxRecvDataSegmentLength.
        max: u32,
    },
    /// The header digest did not match: the lengths cannot be trusted, so the connection
    /// must close (RFC 7143 7.8).
    #[error("header digest mismatch")]
    HeaderDigest,
}

impl From<FrameError> for DecodeError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLong { len, max, .. } => DecodeError::DataSegmentTooLong { len, max },
            FrameError::HeaderDigest => DecodeError::HeaderDigest,
        }
    }
}

/// One complete PDU frame as it came off the wire: BHS, AHS, digests, padded data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
    framing: Framing,
}

impl Frame {
    /// The Basic Header Segment (kept by a Reject that quotes it).
    #[must_use]
    pub fn bhs(&self) -> [u8; BHS_LEN] {
        let mut h = [0u8; BHS_LEN];
        // A frame is only made once BHS_LEN bytes are in.
        h.copy_from_slice(&self.bytes[..BHS_LEN]);
        h
    }

    /// The whole frame.
    #[must_use]
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Decodes the frame under the framing it was cut with (data digest, opcode, fields).
    pub fn decode(&self) -> Result<Pdu, DecodeError> {
        Pdu::decode(&self.bytes, &self.framing).map(|(p, _)| p)
    }
}

/// Turns a byte stream into frames; see the module documentation.
#[derive(Debug)]
pub struct FrameDecoder {
    framing: Framing,
    buf: BytesMut,
    /// Bytes of a refused frame still to drop.
    discard: usize,
    /// The header digest failed: nothing after it can be framed.
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder for a connection that receives under `framing`.
    #[must_use]
    pub fn new(framing: Framing) -> Self {
        FrameDecoder {
            framing,
            buf: BytesMut::new(),
            discard: 0,
            poisoned: false,
        }
    }

    /// The framing frames are cut and decoded with.
    #[must_use]
    pub fn framing(&self) -> &Framing {
        &self.framing
    }

    /// Changes the framing for the frames after the current one (e.g. at the end of the
    /// login, when digests and MaxRecvDataSegmentLength take effect).
    pub fn set_framing(&mut self, framing: Framing) {
        self.framing = framing;
    }

    /// Bytes held that are not yet part of a returned frame.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the next step needs: a shell that reads exactly this many never
    /// reads past the current frame and never makes the decoder hold more than one frame.
    /// Zero when [`next_frame`](Self::next_frame) can proceed without more input.
    #[must_use]
    pub fn want(&self) -> usize {
        if self.poisoned {
            return 0;
        }
        if self.discard > 0 {
            return self
                .discard
                .saturating_sub(self.buf.len())
                .min(DISCARD_CHUNK_BYTES);
        }
        match self.needed() {
            Ok(n) => n.saturating_sub(self.buf.len()),
            Err(_) => 0,
        }
    }

    /// Hands the decoder bytes read from the stream. Bytes of a refused frame are dropped
    /// here rather than held.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.poisoned {
            return;
        }
        if self.discard > 0 && self.buf.is_empty() {
            let n = self.discard.min(data.len());
            self.discard -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed, or why the stream
    /// cannot be framed. After [`FrameError::TooLong`] the caller may go on calling: the
    /// refused frame's bytes are skipped as they arrive. After
    /// [`FrameError::HeaderDigest`] every call fails the same way.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.poisoned {
            return Err(FrameError::HeaderDigest);
        }
        if self.discard > 0 {
            let n = self.discard.min(self.buf.len());
            self.buf.advance(n);
            self.discard -= n;
            if self.discard > 0 {
                return Ok(None);
            }
        }
        let total = match self.needed() {
            Ok(n) => n,
            Err(FrameError::TooLong { bhs, len, max }) => {
                let total = refused_len(&bhs, &self.framing, len);
                let held = self.buf.len().min(total);
                self.buf.advance(held);
                self.discard = total - held;
                return Err(FrameError::TooLong { bhs, len, max });
            }
            Err(e) => {
                self.poisoned = true;
                self.buf.clear();
                return Err(e);
            }
        };
        if self.buf.len() < total {
            return Ok(None);
        }
        let bytes = self.buf.split_to(total).freeze();
        Ok(Some(Frame {
            bytes,
            framing: self.framing,
        }))
    }

    /// Bytes the current step needs in the buffer: the BHS, then the checked header (with
    /// AHS and header digest), then the whole frame. Checks the header once it is in;
    /// a refused frame switches the decoder to skipping it.
    fn needed(&self) -> Result<usize, FrameError> {
        if self.buf.len() < BHS_LEN {
            return Ok(BHS_LEN);
        }
        let b = &self.buf[..];
        let ahs_len = usize::from(b[4]) * 4;
        let header_len = BHS_LEN + ahs_len;
        if self.framing.header_digest {
            // At most 48 + 1020 + 4 bytes: bounded whatever the header says.
            if b.len() < header_len + 4 {
                return Ok(header_len + 4);
            }
            let want = u32::from_le_bytes([
                b[header_len],
                b[header_len + 1],
                b[header_len + 2],
                b[header_len + 3],
            ]);
            if digest::crc32c(&b[..header_len]) != want {
                return Err(FrameError::HeaderDigest);
            }
        }
        match self.framing.frame_len(b) {
            Ok(n) => Ok(n),
            Err(DecodeError::DataSegmentTooLong { len, max }) => {
                let mut bhs = [0u8; BHS_LEN];
                bhs.copy_from_slice(&b[..BHS_LEN]);
                Err(FrameError::TooLong { bhs, len, max })
            }
            // Only a short buffer is left, which the check above excludes.
            Err(_) => Ok(BHS_LEN),
        }
    }
}

/// Bytes a refused frame occupies, per its header and our digests.
fn refused_len(bhs: &[u8; BHS_LEN], framing: &Framing, dsl: u32) -> usize {
    let dsl = dsl as usize;
    let mut n = BHS_LEN + usize::from(bhs[4]) * 4 + dsl + digest::pad_len(dsl);
    if framing.header_digest {
        n += 4;
    }
    if dsl > 0 && framing.data_digest {
        n += 4;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{Itt, Lun, NopOut, Ttt};
    use crate::serial::{CmdSn, StatSn};

    fn nop(itt: u32, data: &[u8]) -> Pdu {
        Pdu::NopOut(NopOut {
            immediate: false,
            lun: Lun(0),
            itt: Itt(itt),
            ttt: Ttt(0xffff_ffff),
            cmd_sn: CmdSn(itt),
            exp_stat_sn: StatSn(1),
            data: Bytes::copy_from_slice(data),
        })
    }

    fn framings() -> Vec<Framing> {
        let mut v = Vec::new();
        for header_digest in [false, true] {
            for data_digest in [false, true] {
                v.push(Framing {
                    header_digest,
                    data_digest,
                    max_recv_data_segment: 8192,
                });
            }
        }
        v
    }

    fn stream(pdus: &[Pdu], f: &Framing) -> Vec<u8> {
        let mut out = BytesMut::new();
        for p in pdus {
            p.encode(&mut out, f);
        }
        out.to_vec()
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Pdu> {
        let mut got = Vec::new();
        while let Some(fr) = d.next_frame().expect("frames are well formed") {
            got.push(fr.decode().expect("decodes"));
        }
        got
    }

    #[test]
    fn every_split_point_of_a_stream() {
        let pdus = [
            nop(1, b""),
            nop(2, b"abc"),
            nop(3, &[7u8; 100]),
            nop(4, b"wxyz"),
        ];
        for f in framings() {
            let bytes = stream(&pdus, &f);
            for a in 0..=bytes.len() {
                for b in [a, (a + 1).min(bytes.len()), (a + 53).min(bytes.len())] {
                    let mut d = FrameDecoder::new(f);
                    let mut got = Vec::new();
                    for part in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                        d.feed(part);
                        got.extend(drain(&mut d));
                    }
                    assert_eq!(got, pdus, "split at {a}/{b} under {f:?}");
                    assert_eq!(d.buffered(), 0);
                }
            }
        }
    }

    #[test]
    fn byte_by_byte_following_want() {
        let pdus = [nop(1, b"hello"), nop(2, b"")];
        for f in framings() {
            let bytes = stream(&pdus, &f);
            let mut d = FrameDecoder::new(f);
            let mut pos = 0;
            let mut got = Vec::new();
            while pos < bytes.len() {
                let n = d.want();
                assert!(n > 0, "nothing complete yet, so something is wanted");
                // A shell reading `want` bytes never reads past the current frame.
                d.feed(&bytes[pos..pos + n]);
                pos += n;
                got.extend(drain(&mut d));
                assert_eq!(d.buffered() == 0, d.want() == BHS_LEN);
            }
            assert_eq!(got, pdus);
        }
    }

    #[test]
    fn many_frames_in_one_buffer() {
        let pdus: Vec<Pdu> = (0..200)
            .map(|i| nop(i, &vec![i as u8; i as usize % 9]))
            .collect();
        for f in framings() {
            let mut d = FrameDecoder::new(f);
            d.feed(&stream(&pdus, &f));
            assert_eq!(drain(&mut d), pdus);
        }
    }

    #[test]
    fn oversize_is_refused_before_buffering_and_skipped() {
        let big = vec![9u8; 9000];
        for f in framings() {
            let enc = Framing {
                max_recv_data_segment: 1 << 20,
                ..f
            };
            let bytes = stream(&[nop(1, b"a"), nop(2, &big), nop(3, b"c")], &enc);
            let mut d = FrameDecoder::new(f);
            // Fed in small pieces: the decoder never holds the oversized segment.
            let mut got = Vec::new();
            let mut refused = Vec::new();
            for chunk in bytes.chunks(100) {
                d.feed(chunk);
                assert!(d.buffered() <= 100 + 8192 + 48 + 8);
                loop {
                    match d.next_frame() {
                        Ok(Some(fr)) => got.push(fr.decode().expect("decodes")),
                        Ok(None) => break,
                        Err(FrameError::TooLong { bhs, len, max }) => {
                            refused.push((bhs[16..20].to_vec(), len, max));
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            assert_eq!(got, vec![nop(1, b"a"), nop(3, b"c")], "{f:?}");
            assert_eq!(refused, vec![(2u32.to_be_bytes().to_vec(), 9000, 8192)]);
        }
    }

    #[test]
    fn oversize_in_one_buffer_keeps_the_next_frame() {
        let f = Framing::default();
        let enc = Framing {
            max_recv_data_segment: 1 << 20,
            ..f
        };
        let bytes = stream(&[nop(2, &[1u8; 8193]), nop(3, b"c")], &enc);
        let mut d = FrameDecoder::new(f);
        d.feed(&bytes);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLong {
                len: 8193,
                max: 8192,
                ..
            })
        ));
        assert_eq!(drain(&mut d), vec![nop(3, b"c")]);
    }

    #[test]
    fn oversize_skip_is_read_in_bounded_steps() {
        let f = Framing::default();
        let mut bhs = stream(&[nop(1, b"")], &f);
        // DataSegmentLength at the protocol maximum.
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        let mut d = FrameDecoder::new(f);
        d.feed(&bhs);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong { .. })));
        assert_eq!(d.want(), DISCARD_CHUNK_BYTES);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn header_digest_is_checked_before_the_lengths() {
        let f = Framing {
            header_digest: true,
            ..Framing::default()
        };
        let mut bytes = stream(&[nop(1, b"abcd"), nop(2, b"")], &f);
        // A corrupted length would be refused as too long were it believed.
        bytes[5] = 0x7f;
        let mut d = FrameDecoder::new(f);
        d.feed(&bytes);
        assert_eq!(d.next_frame(), Err(FrameError::HeaderDigest));
        // The position in the stream is lost for good.
        d.feed(&stream(&[nop(3, b"")], &f));
        assert_eq!(d.next_frame(), Err(FrameError::HeaderDigest));
        assert_eq!(d.want(), 0);
    }

    #[test]
    fn data_digest_error_is_the_frames_not_the_streams() {
        let f = Framing {
            data_digest: true,
            ..Framing::default()
        };
        let mut bytes = stream(&[nop(1, b"abcd"), nop(2, b"ok")], &f);
        bytes[BHS_LEN] ^= 1;
        let mut d = FrameDecoder::new(f);
        d.feed(&bytes);
        let fr = d.next_frame().expect("framed").expect("complete");
        assert_eq!(fr.decode(), Err(DecodeError::DataDigest));
        assert_eq!(fr.bhs()[..], bytes[..BHS_LEN]);
        assert_eq!(drain(&mut d), vec![nop(2, b"ok")]);
    }

    #[test]
    fn digest_settings_change_the_frame_length() {
        let p = nop(1, b"abcde");
        for f in framings() {
            let bytes = stream(std::slice::from_ref(&p), &f);
            let mut d = FrameDecoder::new(f);
            d.feed(&bytes[..BHS_LEN]);
            assert!(d.next_frame().expect("no error").is_none());
            // With a header digest the digest comes first, then the rest is known.
            let first = if f.header_digest {
                4
            } else {
                bytes.len() - BHS_LEN
            };
            assert_eq!(d.want(), first, "{f:?}");
            d.feed(&bytes[BHS_LEN..BHS_LEN + first]);
            if f.header_digest {
                assert!(d.next_frame().expect("digest matches").is_none());
                assert_eq!(BHS_LEN + 4 + d.want(), bytes.len(), "{f:?}");
            }
        }
    }
}
