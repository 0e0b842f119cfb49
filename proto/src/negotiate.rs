//! Login and text key negotiation (RFC 7143 sections 6.2, 12, 13), both roles.
//!
//! Every operational key is described once in the private `KEYS` table: how its result is computed (list,
//! boolean AND/OR, numeric min/max, declarative), its range, and whether it means anything
//! in a discovery session. The responder answers each offered key by that rule; the
//! originator proposes from its [`Limits`] and applies the answers. Unknown keys are
//! `NotUnderstood`, out-of-range values `Reject`, keys that do not apply `Irrelevant`.

use std::collections::HashSet;

/// Which side we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The initiator (originates the login).
    Initiator,
    /// The target.
    Target,
}

/// The kind of session being negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// I/O.
    Normal,
}

/// Our preferences and limits for each operational key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MaxRecvDataSegmentLength we declare (what we can receive).
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength we accept.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength we accept.
    pub first_burst_length: u32,
    /// Largest MaxOutstandingR2T we accept.
    pub max_outstanding_r2t: u32,
    /// Our ImmediateData preference.
    pub immediate_data: bool,
    /// Our InitialR2T preference.
    pub initial_r2t: bool,
    /// Digests we support, most preferred first ("CRC32C", "None").
    pub header_digest: Vec<String>,
    /// Digests we support for data.
    pub data_digest: Vec<String>,
    /// Most connections per session.
    pub max_connections: u32,
    /// DefaultTime2Wait preference.
    pub default_time2wait: u32,
    /// DefaultTime2Retain preference.
    pub default_time2retain: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1 << 20,
            first_burst_length: 262_144,
            max_outstanding_r2t: 16,
            immediate_data: true,
            initial_r2t: false,
            header_digest: vec!["None".into(), "CRC32C".into()],
            data_digest: vec!["None".into(), "CRC32C".into()],
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// Negotiated results; RFC defaults until a key is negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// CRC32C header digest.
    pub header_digest: bool,
    /// CRC32C data digest.
    pub data_digest: bool,
    /// MaxConnections.
    pub max_connections: u32,
    /// InitialR2T.
    pub initial_r2t: bool,
    /// ImmediateData.
    pub immediate_data: bool,
    /// MaxBurstLength.
    pub max_burst_length: u32,
    /// FirstBurstLength.
    pub first_burst_length: u32,
    /// The peer's declared MaxRecvDataSegmentLength: the most we may send in one PDU.
    pub peer_max_recv_data_segment_length: u32,
    /// DefaultTime2Wait.
    pub default_time2wait: u32,
    /// DefaultTime2Retain.
    pub default_time2retain: u32,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            peer_max_recv_data_segment_length: 8192,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// A negotiation that cannot go on; maps to a Login status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NegotiationError {
    /// The same key twice in one negotiation (RFC 7143 6.2: a protocol error).
    #[error("key {0} negotiated twice")]
    Duplicate(String),
    /// The peer answered with a value outside what we offered, or refused a key we need.
    #[error("unacceptable answer {key}={value}")]
    BadAnswer {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// A declarative key (MaxRecvDataSegmentLength) with a value outside its range.
    /// Declarations get no answer, so there is no Reject to send: the login fails.
    #[error("invalid declaration {key}={value}")]
    BadDeclaration {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

impl NegotiationError {
    /// Login Status-Class and Status-Detail for this error (RFC 7143 11.13.5):
    /// initiator error.
    #[must_use]
    pub fn login_status(&self) -> (u8, u8) {
        (0x02, 0x00)
    }
}

/// How a key's result is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Comma-separated list; the responder picks the first value it supports.
    List,
    /// Result is `offer AND ours`.
    And,
    /// Result is `offer OR ours`.
    Or,
    /// Result is the smaller number.
    Min,
    /// Result is the larger number.
    Max,
    /// Each side states its own value.
    Declarative,
}

struct KeyDef {
    name: &'static str,
    kind: Kind,
    min: u32,
    max: u32,
    /// Meaningful in discovery sessions.
    discovery: bool,
}

const KEYS: &[KeyDef] = &[
    KeyDef {
        name: "HeaderDigest",
        kind: Kind::List,
        min: 0,
        max: 0,
        discovery: true,
    },
    KeyDef {
        name: "DataDigest",
        kind: Kind::List,
        min: 0,
        max: 0,
        discovery: true,
    },
    KeyDef {
        name: "MaxConnections",
        kind: Kind::Min,
        min: 1,
        max: 65535,
        discovery: false,
    },
    KeyDef {
        name: "InitialR2T",
        kind: Kind::Or,
        min: 0,
        max: 0,
        discovery: false,
    },
    KeyDef {
        name: "ImmediateData",
        kind: Kind::And,
        min: 0,
        max: 0,
        discovery: false,
    },
    KeyDef {
        name: "MaxRecvDataSegmentLength",
        kind: Kind::Declarative,
        min: 512,
        max: 16_777_215,
        discovery: true,
    },
    KeyDef {
        name: "MaxBurstLength",
        kind: Kind::Min,
        min: 512,
        max: 16_777_215,
        discovery: false,
    },
    KeyDef {
        name: "FirstBurstLength",
        kind: Kind::Min,
        min: 512,
        max: 16_777_215,
        discovery: false,
    },
    KeyDef {
        name: "DefaultTime2Wait",
        kind: Kind::Max,
        min: 0,
        max: 3600,
        discovery: true,
    },
    KeyDef {
        name: "DefaultTime2Retain",
        kind: Kind::Min,
        min: 0,
        max: 3600,
        discovery: true,
    },
    KeyDef {
        name: "MaxOutstandingR2T",
        kind: Kind::Min,
        min: 1,
        max: 65535,
        discovery: false,
    },
    KeyDef {
        name: "DataPDUInOrder",
        kind: Kind::Or,
        min: 0,
        max: 0,
        discovery: false,
    },
    KeyDef {
        name: "DataSequenceInOrder",
        kind: Kind::Or,
        min: 0,
        max: 0,
        discovery: false,
    },
    KeyDef {
        name: "ErrorRecoveryLevel",
        kind: Kind::Min,
        min: 0,
        max: 2,
        discovery: true,
    },
    KeyDef {
        name: "iSCSIProtocolLevel",
        kind: Kind::Min,
        min: 0,
        max: 31,
        discovery: true,
    },
    // RFC 3720 markers, removed by RFC 7143; old initiators still offer them "No".
    KeyDef {
        name: "IFMarker",
        kind: Kind::And,
        min: 0,
        max: 0,
        discovery: true,
    },
    KeyDef {
        name: "OFMarker",
        kind: Kind::And,
        min: 0,
        max: 0,
        discovery: true,
    },
];

/// Keys the login code itself handles (names, session type, authentication).
const LOGIN_KEYS: &[&str] = &[
    "InitiatorName",
    "TargetName",
    "SessionType",
    "InitiatorAlias",
    "TargetAlias",
    "TargetAddress",
    "TargetPortalGroupTag",
    "AuthMethod",
    "SendTargets",
];

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_owned()
}

/// One login's (or text exchange's) negotiation state.
pub struct Negotiator {
    role: Role,
    session_type: SessionType,
    limits: Limits,
    params: Params,
    /// Keys already negotiated (offered by the peer or answered).
    seen: HashSet<String>,
    /// Keys we offered and await an answer for.
    offered: HashSet<String>,
    declared_mrdsl: bool,
}

impl Negotiator {
    /// A negotiator for `role`. `leading` is whether this is the session's first
    /// connection (this implementation negotiates only leading connections).
    #[must_use]
    pub fn new(role: Role, session_type: SessionType, leading: bool, limits: Limits) -> Self {
        debug_assert!(
            leading,
            "only leading logins are negotiated (MaxConnections=1)"
        );
        Self {
            role,
            session_type,
            limits,
            params: Params::default(),
            seen: HashSet::new(),
            offered: HashSet::new(),
            declared_mrdsl: false,
        }
    }

    /// The results so far.
    #[must_use]
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Responder: answers the peer's keys and records the results. Keys handled by the
    /// login code (names, AuthMethod, CHAP) must not be passed in.
    pub fn respond(
        &mut self,
        offered: &[(String, String)],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let mut out = Vec::new();
        for (k, v) in offered {
            if !self.seen.insert(k.clone()) {
                return Err(NegotiationError::Duplicate(k.clone()));
            }
            if self.offered.remove(k) {
                // An answer to a key we offered in an earlier round.
                self.apply_answer(k, v)?;
                continue;
            }
            if let Some(answer) = self.answer(k, v) {
                if self.is_declarative(k) {
                    // Found by the `negotiate` fuzz target: a bad declaration was answered
                    // with Reject, and the target's own declaration of the same key
                    // followed in the same response: one key twice.
                    return Err(NegotiationError::BadDeclaration {
                        key: k.clone(),
                        value: v.clone(),
                    });
                }
                out.push((k.clone(), answer));
            }
        }
        if !self.declared_mrdsl && self.role == Role::Target {
            // The target declares what it can receive in its first answer.
            out.extend(self.pending_declarations());
        }
        self.fix_first_burst();
        Ok(out)
    }

    /// Declarations we still owe the peer (our MaxRecvDataSegmentLength).
    pub fn pending_declarations(&mut self) -> Vec<(String, String)> {
        if self.declared_mrdsl {
            return Vec::new();
        }
        self.declared_mrdsl = true;
        vec![(
            "MaxRecvDataSegmentLength".to_owned(),
            self.limits.max_recv_data_segment_length.to_string(),
        )]
    }

    /// Whether `k` is a declarative key this negotiator knows (it is never answered) in
    /// this session type.
    fn is_declarative(&self, k: &str) -> bool {
        KEYS.iter().any(|d| {
            d.name == k
                && d.kind == Kind::Declarative
                && (self.session_type == SessionType::Normal || d.discovery)
        })
    }

    fn answer(&mut self, k: &str, v: &str) -> Option<String> {
        if LOGIN_KEYS.contains(&k) {
            return None;
        }
        if k.starts_with("X-") || k.starts_with("X#") {
            return Some("NotUnderstood".into());
        }
        if k == "TaskReporting" {
            return Some("RFC3720".into());
        }
        if matches!(k, "OFMarkInt" | "IFMarkInt") {
            return Some("Irrelevant".into());
        }
        let Some(def) = KEYS.iter().find(|d| d.name == k) else {
            return Some("NotUnderstood".into());
        };
        if self.session_type == SessionType::Discovery && !def.discovery {
            return Some("Irrelevant".into());
        }
        if matches!(v, "Reject" | "Irrelevant" | "NotUnderstood") {
            return None;
        }
        let lim = &self.limits;
        let p = &mut self.params;
        Some(match def.kind {
            Kind::List => {
                let ours = if k == "HeaderDigest" {
                    &lim.header_digest
                } else {
                    &lim.data_digest
                };
                let Some(choice) = v.split(',').find(|c| ours.iter().any(|o| o == c)) else {
                    return Some("Reject".into());
                };
                let on = choice == "CRC32C";
                if k == "HeaderDigest" {
                    p.header_digest = on;
                } else {
                    p.data_digest = on;
                }
                choice.to_owned()
            }
            Kind::And | Kind::Or => {
                let Some(b) = parse_bool(v) else {
                    return Some("Reject".into());
                };
                let (ours, slot): (bool, Option<&mut bool>) = match k {
                    "InitialR2T" => (lim.initial_r2t, Some(&mut p.initial_r2t)),
                    "ImmediateData" => (lim.immediate_data, Some(&mut p.immediate_data)),
                    "DataPDUInOrder" => (true, Some(&mut p.data_pdu_in_order)),
                    "DataSequenceInOrder" => (true, Some(&mut p.data_sequence_in_order)),
                    _ => (false, None), // markers: we support none
                };
                let r = if def.kind == Kind::And {
                    b && ours
                } else {
                    b || ours
                };
                if let Some(s) = slot {
                    *s = r;
                }
                yes_no(r)
            }
            Kind::Min | Kind::Max | Kind::Declarative => {
                let Some(n) = parse_num(v) else {
                    return Some("Reject".into());
                };
                if n < u64::from(def.min) || n > u64::from(def.max) {
                    return Some("Reject".into());
                }
                let n = n as u32;
                let ours = match k {
                    "MaxConnections" => lim.max_connections,
                    "MaxBurstLength" => lim.max_burst_length,
                    "FirstBurstLength" => lim.first_burst_length,
                    "DefaultTime2Wait" => lim.default_time2wait,
                    "DefaultTime2Retain" => lim.default_time2retain,
                    "MaxOutstandingR2T" => lim.max_outstanding_r2t,
                    "ErrorRecoveryLevel" => 0,
                    "iSCSIProtocolLevel" => 1,
                    _ => n,
                };
                let r = match def.kind {
                    Kind::Min => n.min(ours),
                    Kind::Max => n.max(ours),
                    _ => n,
                };
                match k {
                    "MaxConnections" => p.max_connections = r,
                    "MaxBurstLength" => p.max_burst_length = r,
                    "FirstBurstLength" => p.first_burst_length = r,
                    "DefaultTime2Wait" => p.default_time2wait = r,
                    "DefaultTime2Retain" => p.default_time2retain = r,
                    "MaxOutstandingR2T" => p.max_outstanding_r2t = r,
                    "ErrorRecoveryLevel" => p.error_recovery_level = r,
                    "MaxRecvDataSegmentLength" => {
                        p.peer_max_recv_data_segment_length = r;
                        // Declarative: no answer; we declare ours separately.
                        return None;
                    }
                    _ => {}
                }
                r.to_string()
            }
        })
    }

    /// FirstBurstLength never exceeds MaxBurstLength (RFC 7143 13.14).
    fn fix_first_burst(&mut self) {
        let p = &mut self.params;
        if p.first_burst_length > p.max_burst_length {
            p.first_burst_length = p.max_burst_length;
        }
    }

    /// Originator: the keys we propose in the first operational round.
    pub fn offer(&mut self) -> Vec<(String, String)> {
        let l = self.limits.clone();
        let mut v: Vec<(String, String)> = vec![
            ("HeaderDigest".into(), l.header_digest.join(",")),
            ("DataDigest".into(), l.data_digest.join(",")),
            (
                "MaxRecvDataSegmentLength".into(),
                l.max_recv_data_segment_length.to_string(),
            ),
            ("DefaultTime2Wait".into(), l.default_time2wait.to_string()),
            (
                "DefaultTime2Retain".into(),
                l.default_time2retain.to_string(),
            ),
            ("ErrorRecoveryLevel".into(), "0".into()),
        ];
        if self.session_type == SessionType::Normal {
            v.extend([
                ("MaxConnections".into(), l.max_connections.to_string()),
                ("InitialR2T".into(), yes_no(l.initial_r2t)),
                ("ImmediateData".into(), yes_no(l.immediate_data)),
                ("MaxBurstLength".into(), l.max_burst_length.to_string()),
                ("FirstBurstLength".into(), l.first_burst_length.to_string()),
                (
                    "MaxOutstandingR2T".into(),
                    l.max_outstanding_r2t.to_string(),
                ),
                ("DataPDUInOrder".into(), "Yes".into()),
                ("DataSequenceInOrder".into(), "Yes".into()),
            ]);
        }
        self.declared_mrdsl = true;
        for (k, _) in &v {
            if k != "MaxRecvDataSegmentLength" {
                self.offered.insert(k.clone());
            }
        }
        v
    }

    /// Originator: applies the peer's answers. Answers to keys we did not offer are new
    /// offers from the peer; their answers are returned for the next round.
    pub fn handle_answers(
        &mut self,
        answers: &[(String, String)],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        let mut ours = Vec::new();
        for (k, v) in answers {
            // RFC 7143 6.1: a key is sent at most once in a negotiation (TargetAddress, a
            // list, excepted); the initiator drops the connection when it is not.
            if k != "TargetAddress" && !self.seen.insert(k.clone()) {
                return Err(NegotiationError::Duplicate(k.clone()));
            }
            if self.offered.remove(k) {
                self.apply_answer(k, v)?;
            } else if k == "MaxRecvDataSegmentLength" {
                if let Some(n) = parse_num(v).filter(|&n| (512..=16_777_215).contains(&n)) {
                    self.params.peer_max_recv_data_segment_length = n as u32;
                }
            } else if let Some(a) = self.answer(k, v) {
                if !LOGIN_KEYS.contains(&k.as_str()) {
                    ours.push((k.clone(), a));
                }
            }
        }
        self.fix_first_burst();
        Ok(ours)
    }

    fn apply_answer(&mut self, k: &str, v: &str) -> Result<(), NegotiationError> {
        let bad = || NegotiationError::BadAnswer {
            key: k.to_owned(),
            value: v.to_owned(),
        };
        if matches!(v, "Irrelevant" | "NotUnderstood") {
            return Ok(());
        }
        if v == "Reject" {
            // The RFC default stays in force.
            return Ok(());
        }
        let p = &mut self.params;
        let l = &self.limits;
        match k {
            "HeaderDigest" | "DataDigest" => {
                let list = if k == "HeaderDigest" {
                    &l.header_digest
                } else {
                    &l.data_digest
                };
                if !list.iter().any(|x| x == v) {
                    return Err(bad());
                }
                if k == "HeaderDigest" {
                    p.header_digest = v == "CRC32C";
                } else {
                    p.data_digest = v == "CRC32C";
                }
            }
            "InitialR2T" => p.initial_r2t = parse_bool(v).ok_or_else(bad)?,
            "ImmediateData" => p.immediate_data = parse_bool(v).ok_or_else(bad)?,
            "DataPDUInOrder" => p.data_pdu_in_order = parse_bool(v).ok_or_else(bad)?,
            "DataSequenceInOrder" => p.data_sequence_in_order = parse_bool(v).ok_or_else(bad)?,
            _ => {
                let n = parse_num(v).ok_or_else(bad)?;
                // An answer outside the key's RFC 7143 range fails the negotiation: found by
                // the `negotiate` fuzz target, FirstBurstLength=262 was taken as is.
                if let Some(def) = KEYS.iter().find(|d| d.name == k) {
                    if n < u64::from(def.min) || n > u64::from(def.max) {
                        return Err(bad());
                    }
                }
                let n = u32::try_from(n).map_err(|_| bad())?;
                match k {
                    "MaxConnections" => p.max_connections = n.min(l.max_connections),
                    "MaxBurstLength" => p.max_burst_length = n.min(l.max_burst_length),
                    "FirstBurstLength" => p.first_burst_length = n.min(l.first_burst_length),
                    "DefaultTime2Wait" => p.default_time2wait = n,
                    "DefaultTime2Retain" => p.default_time2retain = n,
                    "MaxOutstandingR2T" => {
                        p.max_outstanding_r2t = n.clamp(1, l.max_outstanding_r2t)
                    }
                    // We support level 0 only, whatever the answer says.
                    "ErrorRecoveryLevel" => p.error_recovery_level = 0,
                    _ => {}
                }
            }
        }
        Ok(())
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

    fn get<'a>(v: &'a [(String, String)], k: &str) -> Option<&'a str> {
        v.iter().find(|(a, _)| a == k).map(|(_, b)| b.as_str())
    }

    #[test]
    fn target_answers_by_the_key_rules() {
        let mut n = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
        let a = n
            .respond(&kv(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "2097152"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxOutstandingR2T", "1"),
                ("DefaultTime2Wait", "0"),
                ("ErrorRecoveryLevel", "2"),
                ("X-com.example.Foo", "1"),
                ("Bogus", "1"),
                ("MaxConnections", "8"),
            ]))
            .expect("valid offer");
        assert_eq!(get(&a, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(get(&a, "DataDigest"), Some("None"));
        assert_eq!(get(&a, "InitialR2T"), Some("No"));
        assert_eq!(get(&a, "ImmediateData"), Some("Yes"));
        assert_eq!(get(&a, "MaxBurstLength"), Some("1048576"));
        assert_eq!(get(&a, "DefaultTime2Wait"), Some("2"));
        assert_eq!(get(&a, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(get(&a, "X-com.example.Foo"), Some("NotUnderstood"));
        assert_eq!(get(&a, "Bogus"), Some("NotUnderstood"));
        assert_eq!(get(&a, "MaxConnections"), Some("1"));
        assert_eq!(
            get(&a, "MaxRecvDataSegmentLength"),
            Some("262144"),
            "our declaration"
        );
        let p = n.params();
        assert!(p.header_digest && !p.data_digest);
        assert_eq!(p.peer_max_recv_data_segment_length, 65536);
        assert_eq!(p.first_burst_length, 262_144);
        assert!(p.first_burst_length <= p.max_burst_length);
    }

    #[test]
    fn out_of_range_and_malformed_values_are_rejected() {
        let mut n = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
        let a = n
            .respond(&kv(&[
                ("MaxBurstLength", "12"),
                ("FirstBurstLength", "lots"),
                ("InitialR2T", "Maybe"),
                ("HeaderDigest", "MD5"),
                ("MaxOutstandingR2T", "0"),
            ]))
            .expect("answers, not errors");
        for k in [
            "MaxBurstLength",
            "FirstBurstLength",
            "InitialR2T",
            "HeaderDigest",
            "MaxOutstandingR2T",
        ] {
            assert_eq!(get(&a, k), Some("Reject"), "{k}");
        }
        assert_eq!(
            n.params(),
            &Params {
                ..Params::default()
            }
        );
    }

    #[test]
    fn discovery_sessions_ignore_normal_keys() {
        let mut n = Negotiator::new(
            Role::Target,
            SessionType::Discovery,
            true,
            Limits::default(),
        );
        let a = n
            .respond(&kv(&[
                ("InitialR2T", "Yes"),
                ("MaxBurstLength", "65536"),
                ("HeaderDigest", "None"),
            ]))
            .expect("valid");
        assert_eq!(get(&a, "InitialR2T"), Some("Irrelevant"));
        assert_eq!(get(&a, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(get(&a, "HeaderDigest"), Some("None"));
    }

    #[test]
    fn duplicate_keys_are_a_protocol_error() {
        let mut n = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
        n.respond(&kv(&[("MaxBurstLength", "65536")]))
            .expect("first time");
        let e = n
            .respond(&kv(&[("MaxBurstLength", "65536")]))
            .expect_err("second time");
        assert_eq!(e, NegotiationError::Duplicate("MaxBurstLength".into()));
        assert_eq!(e.login_status(), (2, 0));
    }

    /// An initiator that has made its first offer, waiting for the target's answers.
    fn offering(st: SessionType) -> Negotiator {
        let mut n = Negotiator::new(Role::Initiator, st, true, Limits::default());
        let _ = n.offer();
        n
    }

    #[test]
    fn a_declaration_out_of_range_fails_the_login_rather_than_being_answered() {
        // Found by the `negotiate` fuzz target (testdata/fuzz-regressions/negotiate): the
        // answer held MaxRecvDataSegmentLength twice, Reject and our own declaration.
        for bad in ["100", "16777216", "lots", "0x"] {
            let mut n = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
            let e = n
                .respond(&kv(&[("MaxRecvDataSegmentLength", bad)]))
                .expect_err(bad);
            assert!(
                matches!(e, NegotiationError::BadDeclaration { .. }),
                "{bad}: {e:?}"
            );
            assert_eq!(e.login_status(), (2, 0));
        }
        let mut n = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
        let a = n
            .respond(&kv(&[("MaxRecvDataSegmentLength", "65536")]))
            .expect("valid");
        assert_eq!(
            a.iter()
                .filter(|(k, _)| k == "MaxRecvDataSegmentLength")
                .count(),
            1,
            "{a:?}"
        );
        assert_eq!(n.params().peer_max_recv_data_segment_length, 65536);
    }

    #[test]
    fn an_initiator_refuses_numeric_answers_outside_the_rfc_ranges() {
        // Found by the `negotiate` fuzz target (testdata/fuzz-regressions/negotiate).
        for (k, v) in [
            ("FirstBurstLength", "262"),
            ("MaxBurstLength", "16777216"),
            ("MaxConnections", "0"),
            ("MaxOutstandingR2T", "0"),
            ("DefaultTime2Wait", "3601"),
            ("DefaultTime2Retain", "99999"),
        ] {
            let mut n = offering(SessionType::Normal);
            let e = n.handle_answers(&kv(&[(k, v)])).expect_err(k);
            assert!(
                matches!(e, NegotiationError::BadAnswer { .. }),
                "{k}={v}: {e:?}"
            );
        }
        let mut n = offering(SessionType::Normal);
        n.handle_answers(&kv(&[("FirstBurstLength", "512")]))
            .expect("the RFC minimum");
        assert_eq!(n.params().first_burst_length, 512);
    }

    #[test]
    fn an_initiator_refuses_a_key_the_target_sends_twice() {
        // Found by the `negotiate` fuzz target (testdata/fuzz-regressions/negotiate): the
        // originator answered an unknown key sent twice with two NotUnderstood.
        let mut n = offering(SessionType::Discovery);
        let e = n
            .handle_answers(&kv(&[("E", ""), ("E", "")]))
            .expect_err("one response");
        assert_eq!(e, NegotiationError::Duplicate("E".into()));
        let mut n = offering(SessionType::Normal);
        n.handle_answers(&kv(&[("MaxBurstLength", "65536")]))
            .expect("first time");
        let e = n
            .handle_answers(&kv(&[("MaxBurstLength", "65536")]))
            .expect_err("a later response");
        assert_eq!(e, NegotiationError::Duplicate("MaxBurstLength".into()));
        // TargetAddress is a list: it may repeat.
        let mut n = offering(SessionType::Discovery);
        n.handle_answers(&kv(&[
            ("TargetAddress", "127.0.0.1:3260,1"),
            ("TargetAddress", "[::1]:3260,1"),
        ]))
        .expect("repeatable");
    }

    #[test]
    fn initiator_and_target_agree() {
        let mut ini = Negotiator::new(
            Role::Initiator,
            SessionType::Normal,
            true,
            Limits {
                header_digest: vec!["CRC32C".into(), "None".into()],
                max_burst_length: 65536,
                ..Limits::default()
            },
        );
        let mut tgt = Negotiator::new(Role::Target, SessionType::Normal, true, Limits::default());
        let offer = ini.offer();
        let answers = tgt.respond(&offer).expect("target answers");
        let more = ini.handle_answers(&answers).expect("initiator applies");
        assert!(more.is_empty());
        let (a, b) = (ini.params(), tgt.params());
        assert_eq!(a.header_digest, b.header_digest);
        assert!(a.header_digest);
        assert_eq!(a.max_burst_length, 65536);
        assert_eq!(b.max_burst_length, 65536);
        assert_eq!(a.first_burst_length, b.first_burst_length);
        assert_eq!(a.immediate_data, b.immediate_data);
        assert_eq!(a.initial_r2t, b.initial_r2t);
        assert_eq!(a.peer_max_recv_data_segment_length, 262_144);
        assert_eq!(b.peer_max_recv_data_segment_length, 262_144);
    }
}
