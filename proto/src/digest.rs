//! CRC32C header and data digests (RFC 7143 section 13.1, RFC 3720 appendix B.4).

/// CRC32C over `data`, as iSCSI digests it.
#[must_use]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C over the data segment and its pad bytes (data digests cover the padding).
#[must_use]
pub fn data_digest(data: &[u8]) -> u32 {
    let pad = crate::digest::pad_len(data.len());
    let c = crc32c::crc32c(data);
    crc32c::crc32c_append(c, &[0u8; 3][..pad])
}

/// Bytes of padding that follow a data segment of `len` bytes (segments are 4-byte aligned).
#[must_use]
pub const fn pad_len(len: usize) -> usize {
    (4 - (len % 4)) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 3720 appendix B.4 CRC32C examples (carried into RFC 7143 by reference).
    #[test]
    fn rfc_vectors() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113f_db5c);
        let scsi_read: [u8; 48] = [
            0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14,
            0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(crc32c(&scsi_read), 0xd9963a56);
    }

    #[test]
    fn padding_is_digested() {
        assert_eq!(data_digest(b"abcd"), crc32c(b"abcd"));
        assert_eq!(data_digest(b"abc"), crc32c(b"abc\0"));
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(5), 3);
    }
}
