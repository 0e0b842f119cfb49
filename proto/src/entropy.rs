//! Randomness handed in from outside: the state machines here need unpredictable bytes
//! (CHAP identifiers and challenges, RFC 7143 12.1.3) but read no device and no clock.
//! A daemon passes the kernel's CSPRNG; a test passes a seeded generator and replays.

/// A source of unpredictable bytes.
pub trait Entropy {
    /// Fills `buf` completely, or says why it cannot. A caller must not go on with
    /// predictable bytes: a CHAP challenge an attacker can guess can be answered from a
    /// recorded exchange.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError>;
}

/// The source could not supply the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no randomness available: {0}")]
pub struct EntropyError(pub String);

/// A replayable generator (splitmix64) for tests, simulations and fuzzing, where a run
/// must repeat from its seed. Predictable by design: never for a live login.
#[derive(Clone, Debug)]
pub struct SeededEntropy(u64);

impl SeededEntropy {
    /// A generator that always produces the same bytes from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        SeededEntropy(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_entropy_replays_from_its_seed() {
        let (mut a, mut b) = ([0u8; 13], [0u8; 13]);
        SeededEntropy::new(7).fill(&mut a).expect("never fails");
        SeededEntropy::new(7).fill(&mut b).expect("never fails");
        assert_eq!(a, b);
        SeededEntropy::new(8).fill(&mut b).expect("never fails");
        assert_ne!(a, b);
    }
}
