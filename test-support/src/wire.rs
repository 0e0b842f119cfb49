//! Whole PDUs off a byte stream, cut by the same decoder the target and initiator use.

use ftss_proto::frame::{Frame, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads the next frame off `rd` under `dec`'s framing, reading no byte past it. `None` on
/// EOF, a read error, or a frame the decoder refuses (too long, bad header digest): a test
/// peer has nothing better to do with any of them than stop.
pub async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, dec: &mut FrameDecoder) -> Option<Frame> {
    let mut scratch = Vec::new();
    loop {
        if let Some(frame) = dec.next_frame().ok()? {
            return Some(frame);
        }
        let n = dec.want();
        scratch.resize(n, 0);
        rd.read_exact(&mut scratch[..n]).await.ok()?;
        dec.feed(&scratch[..n]);
    }
}
