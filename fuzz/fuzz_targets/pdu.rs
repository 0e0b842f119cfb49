//! `Pdu::decode` and the frame length check the connection readers run on every frame.
//! Byte 0 chooses the framing (digests, receive limit); the rest is the frame.
//! Invariants: a decoded PDU used exactly the bytes `frame_len` announced; it encodes and
//! decodes back to itself; an error that may be answered with a Reject names a reason.
#![no_main]

use bytes::BytesMut;
use ftss_proto::pdu::{DecodeError, Framing, Pdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    let framing = Framing {
        header_digest: flags & 1 != 0,
        data_digest: flags & 2 != 0,
        max_recv_data_segment: if flags & 4 != 0 { 8192 } else { 262_144 },
    };
    let announced = framing.frame_len(frame);
    match Pdu::decode(frame, &framing) {
        Ok((pdu, used)) => {
            assert_eq!(announced, Ok(used), "decode used what frame_len announced");
            assert!(used <= frame.len());
            let mut out = BytesMut::new();
            pdu.encode(&mut out, &framing);
            let again = Pdu::decode(&out, &framing);
            assert_eq!(again, Ok((pdu.clone(), out.len())), "round trip of {pdu:?}");
            // The data segment is bounded by the limit we declared.
            assert!(pdu.data().len() <= framing.max_recv_data_segment as usize);
        }
        Err(DecodeError::Incomplete(n)) => {
            assert!(
                n > frame.len(),
                "incomplete yet {n} <= {} bytes",
                frame.len()
            );
        }
        Err(e) => {
            // Either the connection closes (None) or a Reject names the reason.
            let _ = e.reject_reason();
            if let Err(DecodeError::DataSegmentTooLong { .. }) = announced {
                assert!(matches!(e, DecodeError::DataSegmentTooLong { .. }));
            }
        }
    }
});
