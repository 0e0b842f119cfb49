//! CHAP authentication for iSCSI login (RFC 7143 section 12.1.3, RFC 1994), both roles.
//!
//! CHAP_A numbers follow IANA's PPP authentication algorithms registry: 5 MD5, 6 SHA-1,
//! 7 SHA-256, 8 SHA3-256. The response is `H(id || secret || challenge)`. Challenges and
//! responses travel as hex (`0x...`) or base64 (`0b...`); both are accepted on input and
//! hex is sent. The caller supplies the identifier and challenge bytes (from a CSPRNG), so
//! this module needs no randomness and stays deterministic under test.

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;

/// Longest challenge accepted from the peer (RFC 7143 12.1.3 allows 1024 bytes).
pub const CHALLENGE_LEN_MAX: usize = 1024;

/// A CHAP digest algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// 5
    Md5,
    /// 6
    Sha1,
    /// 7
    Sha256,
    /// 8
    Sha3_256,
}

impl Algorithm {
    /// IANA number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Algorithm::Md5 => 5,
            Algorithm::Sha1 => 6,
            Algorithm::Sha256 => 7,
            Algorithm::Sha3_256 => 8,
        }
    }

    /// From an IANA number.
    #[must_use]
    pub fn from_number(n: u64) -> Option<Self> {
        match n {
            5 => Some(Algorithm::Md5),
            6 => Some(Algorithm::Sha1),
            7 => Some(Algorithm::Sha256),
            8 => Some(Algorithm::Sha3_256),
            _ => None,
        }
    }

    /// Digest length in bytes.
    #[must_use]
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 | Algorithm::Sha3_256 => 32,
        }
    }

    /// `H(id || secret || challenge)`.
    #[must_use]
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn h<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        match self {
            Algorithm::Md5 => h::<Md5>(id, secret, challenge),
            Algorithm::Sha1 => h::<Sha1>(id, secret, challenge),
            Algorithm::Sha256 => h::<Sha256>(id, secret, challenge),
            Algorithm::Sha3_256 => h::<Sha3_256>(id, secret, challenge),
        }
    }
}

/// Algorithms we offer or accept, most preferred first.
pub const SUPPORTED: [Algorithm; 4] = [
    Algorithm::Sha3_256,
    Algorithm::Sha256,
    Algorithm::Sha1,
    Algorithm::Md5,
];

/// Why authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChapError {
    /// A required key is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// No algorithm in common.
    #[error("no supported CHAP_A in {0:?}")]
    NoAlgorithm(String),
    /// A value could not be decoded.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Wrong name or wrong response.
    #[error("authentication failed")]
    Failed,
    /// The peer sent back our own challenge.
    #[error("reflected challenge")]
    Reflected,
    /// The peer asked for mutual authentication we have no secret for.
    #[error("mutual CHAP requested but not configured")]
    NoMutual,
    /// A key arrived when it was not expected.
    #[error("unexpected {0}")]
    Unexpected(&'static str),
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64.
pub fn decode_binary(v: &str, what: &'static str) -> Result<Vec<u8>, ChapError> {
    let bad = ChapError::Malformed(what);
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.len() % 2 == 1 || h.len() / 2 > CHALLENGE_LEN_MAX * 2 {
            return Err(bad);
        }
        (0..h.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(h.get(i..i + 2).unwrap_or("zz"), 16).map_err(|_| bad.clone())
            })
            .collect()
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        if b.len() > CHALLENGE_LEN_MAX * 3 {
            return Err(bad);
        }
        base64_decode(b).ok_or(bad)
    } else {
        Err(bad)
    }
}

/// Encodes bytes as `0x` hex.
#[must_use]
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let t = s.trim_end_matches('=');
    if s.len() - t.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(t.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in t.as_bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn get<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    keys.iter().find(|(a, _)| a == k).map(|(_, b)| b.as_str())
}

/// Credentials the target checks (and, for mutual CHAP, proves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapSecrets {
    /// Name the initiator must present.
    pub username: String,
    /// The initiator's secret.
    pub secret: Vec<u8>,
    /// Target name and secret for mutual CHAP.
    pub mutual: Option<(String, Vec<u8>)>,
}

/// What to do after a CHAP step.
#[derive(Debug, PartialEq, Eq)]
pub enum ChapStep {
    /// Send these keys and wait for the next PDU.
    Send(Vec<(String, String)>),
    /// Authenticated; send these keys (mutual CHAP answer, possibly none).
    Done(Vec<(String, String)>),
}

enum TargetState {
    AwaitAlgorithm,
    AwaitResponse(Algorithm),
    Done,
}

/// The target (authenticator) side.
pub struct ChapTarget {
    secrets: ChapSecrets,
    id: u8,
    challenge: Vec<u8>,
    state: TargetState,
}

impl ChapTarget {
    /// A CHAP exchange with identifier `id` and `challenge` (16 bytes or more, random).
    #[must_use]
    pub fn new(secrets: ChapSecrets, id: u8, challenge: Vec<u8>) -> Self {
        Self {
            secrets,
            id,
            challenge,
            state: TargetState::AwaitAlgorithm,
        }
    }

    /// Feeds the initiator's CHAP keys.
    pub fn handle(&mut self, keys: &[(String, String)]) -> Result<ChapStep, ChapError> {
        match self.state {
            TargetState::AwaitAlgorithm => {
                let a = get(keys, "CHAP_A").ok_or(ChapError::Missing("CHAP_A"))?;
                let offered: Vec<Algorithm> = a
                    .split(',')
                    .filter_map(|x| x.trim().parse::<u64>().ok())
                    .filter_map(Algorithm::from_number)
                    .collect();
                // The initiator lists in its order of preference; take its first we know.
                let alg = *offered
                    .first()
                    .ok_or_else(|| ChapError::NoAlgorithm(a.to_owned()))?;
                self.state = TargetState::AwaitResponse(alg);
                Ok(ChapStep::Send(vec![
                    ("CHAP_A".into(), alg.number().to_string()),
                    ("CHAP_I".into(), self.id.to_string()),
                    ("CHAP_C".into(), encode_hex(&self.challenge)),
                ]))
            }
            TargetState::AwaitResponse(alg) => {
                let n = get(keys, "CHAP_N").ok_or(ChapError::Missing("CHAP_N"))?;
                let r = get(keys, "CHAP_R").ok_or(ChapError::Missing("CHAP_R"))?;
                let r = decode_binary(r, "CHAP_R")?;
                let want = alg.response(self.id, &self.secrets.secret, &self.challenge);
                // Check both even when the name is wrong, so timing does not tell which.
                let name_ok = n == self.secrets.username;
                let resp_ok = ct_eq(&r, &want);
                if !(name_ok && resp_ok) {
                    return Err(ChapError::Failed);
                }
                self.state = TargetState::Done;
                let (ci, cc) = (get(keys, "CHAP_I"), get(keys, "CHAP_C"));
                match (ci, cc) {
                    (None, None) => Ok(ChapStep::Done(Vec::new())),
                    (Some(i), Some(c)) => {
                        let (mname, msecret) =
                            self.secrets.mutual.as_ref().ok_or(ChapError::NoMutual)?;
                        let id: u8 = i.parse().map_err(|_| ChapError::Malformed("CHAP_I"))?;
                        let c = decode_binary(c, "CHAP_C")?;
                        if c.is_empty() || c.len() > CHALLENGE_LEN_MAX {
                            return Err(ChapError::Malformed("CHAP_C"));
                        }
                        if c == self.challenge {
                            return Err(ChapError::Reflected);
                        }
                        Ok(ChapStep::Done(vec![
                            ("CHAP_N".into(), mname.clone()),
                            ("CHAP_R".into(), encode_hex(&alg.response(id, msecret, &c))),
                        ]))
                    }
                    _ => Err(ChapError::Missing("CHAP_I and CHAP_C together")),
                }
            }
            TargetState::Done => Err(ChapError::Unexpected("CHAP keys after authentication")),
        }
    }
}

/// The initiator side.
pub struct ChapInitiator {
    username: String,
    secret: Vec<u8>,
    /// Expected target name and secret, with our challenge id and bytes, for mutual CHAP.
    mutual: Option<(String, Vec<u8>, u8, Vec<u8>)>,
    alg: Option<Algorithm>,
}

impl ChapInitiator {
    /// One-way CHAP with our name and secret; `mutual` = (target name, target secret, id,
    /// challenge) to authenticate the target too.
    #[must_use]
    pub fn new(
        username: String,
        secret: Vec<u8>,
        mutual: Option<(String, Vec<u8>, u8, Vec<u8>)>,
    ) -> Self {
        Self {
            username,
            secret,
            mutual,
            alg: None,
        }
    }

    /// The CHAP_A offer.
    #[must_use]
    pub fn offer(&self) -> Vec<(String, String)> {
        let list: Vec<String> = SUPPORTED.iter().map(|a| a.number().to_string()).collect();
        vec![("CHAP_A".into(), list.join(","))]
    }

    /// Answers the target's CHAP_A/CHAP_I/CHAP_C.
    pub fn respond(
        &mut self,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ChapError> {
        let a = get(keys, "CHAP_A").ok_or(ChapError::Missing("CHAP_A"))?;
        let alg = a
            .parse::<u64>()
            .ok()
            .and_then(Algorithm::from_number)
            .ok_or_else(|| ChapError::NoAlgorithm(a.to_owned()))?;
        let id: u8 = get(keys, "CHAP_I")
            .ok_or(ChapError::Missing("CHAP_I"))?
            .parse()
            .map_err(|_| ChapError::Malformed("CHAP_I"))?;
        let c = decode_binary(
            get(keys, "CHAP_C").ok_or(ChapError::Missing("CHAP_C"))?,
            "CHAP_C",
        )?;
        if c.is_empty() || c.len() > CHALLENGE_LEN_MAX {
            return Err(ChapError::Malformed("CHAP_C"));
        }
        if let Some((_, _, _, ours)) = &self.mutual {
            if &c == ours {
                return Err(ChapError::Reflected);
            }
        }
        self.alg = Some(alg);
        let mut out = vec![
            ("CHAP_N".into(), self.username.clone()),
            (
                "CHAP_R".into(),
                encode_hex(&alg.response(id, &self.secret, &c)),
            ),
        ];
        if let Some((_, _, mid, mc)) = &self.mutual {
            out.push(("CHAP_I".into(), mid.to_string()));
            out.push(("CHAP_C".into(), encode_hex(mc)));
        }
        Ok(out)
    }

    /// Checks the target's mutual answer; `Ok` when none was expected.
    pub fn verify(&self, keys: &[(String, String)]) -> Result<(), ChapError> {
        let Some((name, secret, id, challenge)) = &self.mutual else {
            return Ok(());
        };
        let alg = self
            .alg
            .ok_or(ChapError::Unexpected("verify before respond"))?;
        let n = get(keys, "CHAP_N").ok_or(ChapError::Missing("CHAP_N"))?;
        let r = decode_binary(
            get(keys, "CHAP_R").ok_or(ChapError::Missing("CHAP_R"))?,
            "CHAP_R",
        )?;
        if n == name && ct_eq(&r, &alg.response(*id, secret, challenge)) {
            Ok(())
        } else {
            Err(ChapError::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    fn secrets(mutual: bool) -> ChapSecrets {
        ChapSecrets {
            username: "user".into(),
            secret: b"user-secret-12".to_vec(),
            mutual: mutual.then(|| ("target".into(), b"target-secret-1".to_vec())),
        }
    }

    #[test]
    fn one_way_and_mutual() {
        for mutual in [false, true] {
            let mut t = ChapTarget::new(secrets(mutual), 7, vec![9u8; 32]);
            let mut i = ChapInitiator::new(
                "user".into(),
                b"user-secret-12".to_vec(),
                mutual.then(|| {
                    (
                        "target".into(),
                        b"target-secret-1".to_vec(),
                        3,
                        vec![4u8; 20],
                    )
                }),
            );
            let ChapStep::Send(challenge) = t.handle(&i.offer()).expect("CHAP_A") else {
                panic!("challenge expected")
            };
            assert_eq!(
                challenge[0].1, "8",
                "SHA3-256 is preferred by our initiator"
            );
            let resp = i.respond(&challenge).expect("respond");
            let ChapStep::Done(ans) = t.handle(&resp).expect("authenticated") else {
                panic!("done expected")
            };
            assert_eq!(ans.is_empty(), !mutual);
            i.verify(&ans).expect("target proven");
        }
    }

    #[test]
    fn wrong_secret_name_and_reflection_fail() {
        let mut t = ChapTarget::new(secrets(true), 1, vec![5u8; 16]);
        t.handle(&kv(&[("CHAP_A", "5")])).expect("challenge");
        let good = Algorithm::Md5.response(1, b"user-secret-12", &[5u8; 16]);
        let bad = Algorithm::Md5.response(1, b"wrong-secret", &[5u8; 16]);
        let mut t2 = ChapTarget::new(secrets(true), 1, vec![5u8; 16]);
        t2.handle(&kv(&[("CHAP_A", "5")])).expect("challenge");
        assert_eq!(
            t.handle(&kv(&[("CHAP_N", "user"), ("CHAP_R", &encode_hex(&bad))])),
            Err(ChapError::Failed)
        );
        assert_eq!(
            t2.handle(&kv(&[
                ("CHAP_N", "user"),
                ("CHAP_R", &encode_hex(&good)),
                ("CHAP_I", "1"),
                ("CHAP_C", &encode_hex(&[5u8; 16])),
            ])),
            Err(ChapError::Reflected)
        );
        let mut t3 = ChapTarget::new(secrets(false), 1, vec![5u8; 16]);
        t3.handle(&kv(&[("CHAP_A", "5")])).expect("challenge");
        assert_eq!(
            t3.handle(&kv(&[
                ("CHAP_N", "someone"),
                ("CHAP_R", &encode_hex(&good))
            ])),
            Err(ChapError::Failed)
        );
        let mut t4 = ChapTarget::new(secrets(false), 1, vec![5u8; 16]);
        assert!(matches!(
            t4.handle(&kv(&[("CHAP_A", "1,2,3")])),
            Err(ChapError::NoAlgorithm(_))
        ));
    }

    #[test]
    fn long_challenges_in_hex_and_base64() {
        let big = vec![0xabu8; CHALLENGE_LEN_MAX];
        let hex = encode_hex(&big);
        assert_eq!(decode_binary(&hex, "x").expect("1024-byte hex"), big);
        assert_eq!(decode_binary("0bAQID", "x").expect("base64"), vec![1, 2, 3]);
        assert_eq!(
            decode_binary("0bAQIDBA==", "x").expect("padded base64"),
            vec![1, 2, 3, 4]
        );
        assert!(decode_binary("0x123", "x").is_err());
        assert!(decode_binary("0xzz", "x").is_err());
        assert!(decode_binary("plain", "x").is_err());
        assert!(decode_binary("0b@@@", "x").is_err());
        // A 1024-byte challenge from the initiator is accepted for mutual CHAP.
        let mut t = ChapTarget::new(secrets(true), 2, vec![1u8; 16]);
        t.handle(&kv(&[("CHAP_A", "7")])).expect("challenge");
        let r = Algorithm::Sha256.response(2, b"user-secret-12", &[1u8; 16]);
        let step = t
            .handle(&kv(&[
                ("CHAP_N", "user"),
                ("CHAP_R", &encode_hex(&r)),
                ("CHAP_I", "9"),
                ("CHAP_C", &hex),
            ]))
            .expect("accepted");
        assert!(matches!(step, ChapStep::Done(v) if v.len() == 2));
    }
}
