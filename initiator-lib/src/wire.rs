//! Reading and writing whole PDUs on a byte stream; framing is `ftss_proto::frame`'s and
//! all parsing `ftss_proto::pdu`'s.

use bytes::BytesMut;
use ftss_proto::frame::FrameDecoder;
use ftss_proto::pdu::{DecodeError, Framing, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::Error;

/// Reads PDUs off one stream. The lengths in each header are checked against the
/// framing's limit before the rest of the frame is read, so a hostile length cannot make
/// us allocate; a frame above it ends the connection.
pub(crate) struct PduReader {
    dec: FrameDecoder,
    scratch: Vec<u8>,
}

impl PduReader {
    pub(crate) fn new(framing: Framing) -> Self {
        PduReader {
            dec: FrameDecoder::new(framing),
            scratch: Vec::new(),
        }
    }

    /// Reads one PDU, reading no byte past it.
    pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
    ) -> Result<Pdu, Error> {
        loop {
            if let Some(frame) = self.dec.next_frame().map_err(DecodeError::from)? {
                return Ok(frame.decode()?);
            }
            let n = self.dec.want();
            self.scratch.resize(n, 0);
            read_exact(rd, &mut self.scratch[..n]).await?;
            self.dec.feed(&self.scratch[..n]);
        }
    }
}

async fn read_exact<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> Result<(), Error> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::ConnectionClosed),
        Err(e) => Err(Error::Io(e)),
    }
}

/// One PDU as bytes ready for the socket.
pub(crate) fn encode(p: &Pdu, framing: &Framing) -> BytesMut {
    let mut out = BytesMut::new();
    p.encode(&mut out, framing);
    out
}
