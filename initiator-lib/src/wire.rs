//! Reading and writing whole PDUs on a byte stream; all parsing is `ftss_proto::pdu`'s.

use bytes::BytesMut;
use ftss_proto::pdu::{Framing, Pdu, BHS_LEN};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::Error;

/// Reads one PDU. The lengths in the header are checked against `framing` before the
/// rest of the frame is buffered, so a hostile length cannot make us allocate.
pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(
    rd: &mut R,
    framing: &Framing,
    buf: &mut BytesMut,
) -> Result<Pdu, Error> {
    buf.clear();
    buf.resize(BHS_LEN, 0);
    read_exact(rd, &mut buf[..]).await?;
    let len = framing.frame_len(buf)?;
    buf.resize(len, 0);
    read_exact(rd, &mut buf[BHS_LEN..]).await?;
    let (pdu, _) = Pdu::decode(buf, framing)?;
    Ok(pdu)
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
