//! The kernel's CSPRNG for the login machine, through getrandom(2): no file to open, and
//! no fallback to anything predictable.

use ftss_proto::entropy::{Entropy, EntropyError};

/// getrandom(2) without flags: blocks only until the pool is first seeded at boot.
pub(crate) struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: the pointer and length describe `rest`, memory we hold mutably for
            // the duration of the call; getrandom writes at most that many bytes.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(EntropyError(format!("getrandom: {e}")));
            }
            // n >= 0 here and at most rest.len().
            done += n.unsigned_abs();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_differs() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        OsEntropy.fill(&mut a).expect("getrandom works on Linux");
        OsEntropy.fill(&mut b).expect("getrandom works on Linux");
        assert_ne!(a, b);
    }
}
