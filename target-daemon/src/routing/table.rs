//! The routing table: which node has which addresses, which sessions (nexuses) are that
//! node's, and whether it can take packets now.
//!
//! A node is known from the configuration (`[[node]]`: addresses by initiator name) or
//! from NODE REGISTER at run time. It is *available* while at least one of its sessions
//! is logged in and it is not in maintenance, *down* otherwise. A node stays in the table
//! after its last session ends, so packets to it are answered "destination down" rather
//! than "unknown", and its queued packets wait for it.
//!
//! Addresses registered at run time belong to the registering initiator for good: the
//! table keeps them in a registry that the routing agent stores durably (the packet
//! mirror set's metadata area) before NODE REGISTER answers, and restores at start. An
//! address stays its initiator's when that initiator re-registers another set, so a
//! queue key that holds packets or history is never handed to another initiator; only
//! an administrator's retire releases it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ftss_proto::vendor::{NodeAddr, RouteEntry, RouteState};

/// Magic of the registry record.
const REGISTRY_MAGIC: &[u8; 8] = b"FTSSNODE";
/// Version of the registry record.
const REGISTRY_VERSION: u16 = 1;

/// One node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Target-assigned id (stable while the daemon runs).
    pub id: u32,
    /// Its addresses; the first is the source address stamped on its packets.
    pub addrs: Vec<NodeAddr>,
    /// Initiator name its sessions log in with, when configured.
    pub initiator: Option<String>,
    /// Sessions of the node now logged in.
    pub nexuses: BTreeSet<u64>,
    /// Refusing packets for now (SET STATE maintenance).
    pub maintenance: bool,
    /// Made by NODE REGISTER (kept in the registry), not by the configuration.
    pub registered: bool,
}

impl Node {
    /// The key packets for this node are stored under: its smallest address, the same
    /// after a restart whatever order the addresses come in.
    pub fn key(&self) -> NodeAddr {
        self.addrs.iter().copied().min().unwrap_or_default()
    }

    /// The address stamped as source on its packets.
    pub fn source(&self) -> NodeAddr {
        self.addrs.first().copied().unwrap_or_default()
    }

    /// Routing state.
    pub fn state(&self) -> RouteState {
        if self.nexuses.is_empty() {
            RouteState::Down
        } else if self.maintenance {
            RouteState::Maintenance
        } else {
            RouteState::Available
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Address `index` of the list belongs to another node.
    Taken(usize),
}

/// Why a registry record could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("node registry: {0}")]
pub struct RegistryError(String);

/// The routing table.
#[derive(Default, Clone)]
pub struct RoutingTable {
    nodes: Vec<Node>,
    by_nexus: HashMap<u64, usize>,
    /// Every address ever registered at run time, with the initiator (lower case) it
    /// belongs to until retired.
    owners: BTreeMap<NodeAddr, String>,
}

impl RoutingTable {
    /// A table with the configured nodes (all down until their sessions log in).
    pub fn new(configured: &[(String, Vec<NodeAddr>)]) -> Self {
        let mut t = RoutingTable::default();
        for (initiator, addrs) in configured {
            let id = t.nodes.len() as u32 + 1;
            t.nodes.push(Node {
                id,
                addrs: addrs.clone(),
                initiator: Some(initiator.clone()),
                nexuses: BTreeSet::new(),
                maintenance: false,
                registered: false,
            });
        }
        t
    }

    /// Restores the registered nodes (down until their sessions register again) and
    /// address owners from a record [`Self::registry`] made. Configured nodes win over
    /// a registration of the same address by another initiator (the operator's word).
    pub fn restore(&mut self, record: &[u8]) -> Result<(), RegistryError> {
        let bad = |what: &str| RegistryError(what.to_owned());
        if record.len() < 18 || &record[..8] != REGISTRY_MAGIC {
            return Err(bad("bad magic"));
        }
        let (body, crc) = record.split_at(record.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let version = u16::from_le_bytes([body[8], body[9]]);
        if version != REGISTRY_VERSION {
            return Err(RegistryError(format!(
                "version {version}, this build reads {REGISTRY_VERSION}"
            )));
        }
        let mut r = RegReader { b: body, at: 10 };
        let nodes = r.u32().ok_or_else(|| bad("truncated"))?;
        for _ in 0..nodes {
            let initiator = r.name().ok_or_else(|| bad("truncated node"))?;
            let addrs = r.addrs().ok_or_else(|| bad("truncated node"))?;
            if addrs.iter().any(|a| self.lookup(a).is_some()) {
                continue;
            }
            let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
            self.nodes.push(Node {
                id,
                addrs,
                initiator: Some(initiator),
                nexuses: BTreeSet::new(),
                maintenance: false,
                registered: true,
            });
        }
        let owners = r.u32().ok_or_else(|| bad("truncated"))?;
        for _ in 0..owners {
            let initiator = r.name().ok_or_else(|| bad("truncated owner"))?;
            for a in r.addrs().ok_or_else(|| bad("truncated owner"))? {
                self.owners.insert(a, initiator.clone());
            }
        }
        if r.at != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(())
    }

    /// The durable record of the registered nodes and address owners: magic, version,
    /// the nodes (initiator, addresses), the owners grouped by initiator, crc32c.
    pub fn registry(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(REGISTRY_MAGIC);
        b.extend_from_slice(&REGISTRY_VERSION.to_le_bytes());
        let registered: Vec<&Node> = self.nodes.iter().filter(|n| n.registered).collect();
        b.extend_from_slice(&(registered.len() as u32).to_le_bytes());
        for n in registered {
            put_name(&mut b, n.initiator.as_deref().unwrap_or(""));
            put_addrs(&mut b, &n.addrs);
        }
        let mut by_owner: BTreeMap<&str, Vec<NodeAddr>> = BTreeMap::new();
        for (a, i) in &self.owners {
            by_owner.entry(i.as_str()).or_default().push(*a);
        }
        b.extend_from_slice(&(by_owner.len() as u32).to_le_bytes());
        for (i, addrs) in by_owner {
            put_name(&mut b, i);
            put_addrs(&mut b, &addrs);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Retires the run-time registrations of `initiator`: its registered nodes leave the
    /// table and its addresses are free for anyone. Refused while one of its nodes has a
    /// session. Returns the queue keys whose packets must be discarded (every address it
    /// owned: any of them may have keyed a queue under an earlier address set).
    pub fn retire(&mut self, initiator: &str) -> Result<Vec<NodeAddr>, String> {
        let mine = |i: &str| i.eq_ignore_ascii_case(initiator);
        if self.nodes.iter().any(|n| {
            n.registered && n.initiator.as_deref().is_some_and(mine) && !n.nexuses.is_empty()
        }) {
            return Err(format!(
                "{initiator} has sessions logged in: log them out first"
            ));
        }
        let mut keys: BTreeSet<NodeAddr> = self
            .owners
            .iter()
            .filter(|(_, i)| mine(i))
            .map(|(a, _)| *a)
            .collect();
        for n in &self.nodes {
            if n.registered && n.initiator.as_deref().is_some_and(mine) {
                keys.extend(n.addrs.iter().copied());
            }
        }
        if keys.is_empty() {
            return Err(format!("{initiator} has no registered addresses"));
        }
        self.owners.retain(|_, i| !mine(i));
        self.nodes
            .retain(|n| !(n.registered && n.initiator.as_deref().is_some_and(mine)));
        // Node positions moved: index the sessions again.
        self.by_nexus.clear();
        for (i, n) in self.nodes.iter().enumerate() {
            for &x in &n.nexuses {
                self.by_nexus.insert(x, i);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// Adds a node configured after the start (a reload): refused when its initiator
    /// already has a node or another node or initiator holds one of its addresses, so a
    /// reload never takes an address from anyone. Its sessions join it at their next
    /// login.
    pub fn add_configured(&mut self, initiator: &str, addrs: &[NodeAddr]) -> Result<(), String> {
        let mine = |i: &str| i.eq_ignore_ascii_case(initiator);
        if self
            .nodes
            .iter()
            .any(|n| n.initiator.as_deref().is_some_and(mine))
        {
            return Err(format!("{initiator} already has a node"));
        }
        for a in addrs {
            if let Some(n) = self.lookup(a) {
                return Err(format!("{a} belongs to node {}", n.id));
            }
            if let Some(owner) = self.owners.get(a).filter(|o| !mine(o)) {
                return Err(format!("{a} is registered to {owner}"));
            }
        }
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        self.nodes.push(Node {
            id,
            addrs: addrs.to_vec(),
            initiator: Some(initiator.to_owned()),
            nexuses: BTreeSet::new(),
            maintenance: false,
            registered: false,
        });
        Ok(())
    }

    /// Address owners: (address, initiator), for admin listings.
    pub fn owners(&self) -> impl Iterator<Item = (&NodeAddr, &String)> {
        self.owners.iter()
    }

    /// A session logged in: it joins the node configured for its initiator name, if any.
    /// Returns that node's key.
    pub fn nexus_added(&mut self, nexus: u64, initiator: &str) -> Option<NodeAddr> {
        let i = self.nodes.iter().position(|n| {
            n.initiator
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(initiator))
        })?;
        self.nodes[i].nexuses.insert(nexus);
        self.by_nexus.insert(nexus, i);
        Some(self.nodes[i].key())
    }

    /// A session ended.
    pub fn nexus_removed(&mut self, nexus: u64) {
        if let Some(i) = self.by_nexus.remove(&nexus) {
            self.nodes[i].nexuses.remove(&nexus);
        }
    }

    /// NODE REGISTER from `nexus`: its node gets exactly `addrs`. A session without a
    /// node joins the node that already has these addresses, or starts a new one.
    /// Returns the node's key.
    pub fn register(
        &mut self,
        nexus: u64,
        initiator: &str,
        addrs: &[NodeAddr],
    ) -> Result<NodeAddr, RegisterError> {
        let mine = self.by_nexus.get(&nexus).copied();
        let owner = |a: &NodeAddr| self.nodes.iter().position(|n| n.addrs.contains(a));
        // An address registered earlier belongs to its initiator even while no node
        // routes it (after a restart, or after that initiator registered another set).
        if let Some(k) = addrs.iter().position(|a| {
            self.owners
                .get(a)
                .is_some_and(|i| !i.eq_ignore_ascii_case(initiator))
        }) {
            return Err(RegisterError::Taken(k));
        }
        // A session without a node joins the node of its own initiator name that has
        // exactly these addresses (another path of the same server). Another initiator
        // can never take over a node's addresses: that would let it read the node's
        // packets and send in its name.
        let same = |n: &Node| {
            n.initiator
                .as_deref()
                .is_some_and(|i| i.eq_ignore_ascii_case(initiator))
                && n.addrs.len() == addrs.len()
                && addrs.iter().all(|a| n.addrs.contains(a))
        };
        // Or, with no session on it, a node of its own that holds some of these
        // addresses (restored at start, or left by an earlier session): it moves to the
        // new set rather than being refused by its own old addresses.
        let idle_own = |n: &Node| {
            n.nexuses.is_empty()
                && n.initiator
                    .as_deref()
                    .is_some_and(|i| i.eq_ignore_ascii_case(initiator))
                && addrs.iter().any(|a| n.addrs.contains(a))
        };
        let target = mine
            .or_else(|| self.nodes.iter().position(same))
            .or_else(|| self.nodes.iter().position(idle_own));
        for (k, a) in addrs.iter().enumerate() {
            if let Some(o) = owner(a) {
                if Some(o) != target {
                    return Err(RegisterError::Taken(k));
                }
            }
        }
        let i = match target {
            Some(i) => i,
            None => {
                let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
                self.nodes.push(Node {
                    id,
                    addrs: Vec::new(),
                    initiator: Some(initiator.to_owned()),
                    nexuses: BTreeSet::new(),
                    maintenance: false,
                    registered: true,
                });
                self.nodes.len() - 1
            }
        };
        let n = &mut self.nodes[i];
        // A configured node's addresses are the operator's: they never enter the registry.
        if n.registered {
            for a in addrs {
                self.owners.insert(*a, initiator.to_ascii_lowercase());
            }
        }
        let n = &mut self.nodes[i];
        n.addrs = addrs.to_vec();
        n.nexuses.insert(nexus);
        self.by_nexus.insert(nexus, i);
        Ok(n.key())
    }

    /// The node of a session.
    pub fn node_of(&self, nexus: u64) -> Option<&Node> {
        self.by_nexus.get(&nexus).map(|&i| &self.nodes[i])
    }

    /// Sets a session's node in or out of maintenance.
    pub fn set_maintenance(&mut self, nexus: u64, on: bool) -> bool {
        match self.by_nexus.get(&nexus) {
            Some(&i) => {
                self.nodes[i].maintenance = on;
                true
            }
            None => false,
        }
    }

    /// The node that has `addr`.
    pub fn lookup(&self, addr: &NodeAddr) -> Option<&Node> {
        self.nodes.iter().find(|n| n.addrs.contains(addr))
    }

    /// The node stored under `key`.
    pub fn by_key(&self, key: &NodeAddr) -> Option<&Node> {
        self.nodes.iter().find(|n| n.key() == *key)
    }

    /// Every node.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The ROUTING TABLE entries as `nexus` sees them.
    pub fn entries(&self, nexus: u64) -> Vec<RouteEntry> {
        let me = self.by_nexus.get(&nexus).copied();
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for a in &n.addrs {
                out.push(RouteEntry {
                    addr: *a,
                    state: n.state(),
                    local: Some(i) == me,
                    external: false,
                    node_id: n.id,
                });
            }
        }
        out
    }
}

fn put_name(b: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s);
}

fn put_addrs(b: &mut Vec<u8>, addrs: &[NodeAddr]) {
    b.extend_from_slice(&(addrs.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
    for a in addrs.iter().take(usize::from(u16::MAX)) {
        b.extend_from_slice(&a.0);
    }
}

/// Reads a registry record; `None` when it ends early.
struct RegReader<'a> {
    b: &'a [u8],
    at: usize,
}

impl RegReader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn name(&mut self) -> Option<String> {
        let n = usize::from(self.u16()?);
        Some(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn addrs(&mut self) -> Option<Vec<NodeAddr>> {
        let n = usize::from(self.u16()?);
        let raw = self.take(16 * n)?;
        Some(
            raw.chunks_exact(16)
                .map(|c| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(c);
                    NodeAddr(a)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_node_added_by_reload_takes_no_address_from_anyone() {
        let a = |x: u8| NodeAddr::from(std::net::Ipv4Addr::new(10, 0, 0, x));
        let mut t = RoutingTable::new(&[("iqn.x:a".into(), vec![a(1)])]);
        assert!(t.add_configured("iqn.x:b", &[a(1)]).is_err(), "a's address");
        assert!(
            t.add_configured("IQN.X:A", &[a(9)]).is_err(),
            "a has a node"
        );
        t.add_configured("iqn.x:b", &[a(2)]).expect("free address");
        assert_eq!(
            t.lookup(&a(2)).and_then(|n| n.initiator.as_deref()),
            Some("iqn.x:b")
        );
        assert_eq!(
            t.nexus_added(7, "iqn.x:b"),
            Some(a(2)),
            "b's sessions join it"
        );
    }

    use super::*;
    use std::net::Ipv4Addr;

    fn a(x: u8) -> NodeAddr {
        NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
    }

    #[test]
    fn configured_nodes_come_up_with_their_sessions_and_go_down_after() {
        let mut t = RoutingTable::new(&[("iqn.x:one".into(), vec![a(1)])]);
        assert_eq!(t.lookup(&a(1)).map(Node::state), Some(RouteState::Down));
        assert_eq!(t.nexus_added(7, "IQN.X:ONE"), Some(a(1)));
        assert_eq!(
            t.lookup(&a(1)).map(Node::state),
            Some(RouteState::Available)
        );
        assert!(t.set_maintenance(7, true));
        assert_eq!(
            t.lookup(&a(1)).map(Node::state),
            Some(RouteState::Maintenance)
        );
        t.nexus_removed(7);
        assert_eq!(t.lookup(&a(1)).map(Node::state), Some(RouteState::Down));
        assert_eq!(t.nexus_added(8, "iqn.x:other"), None);
    }

    #[test]
    fn registration_joins_replaces_and_refuses_taken_addresses() {
        let mut t = RoutingTable::new(&[]);
        assert_eq!(
            t.register(1, "i1", &[a(2), a(1)]),
            Ok(a(1)),
            "key is the smallest"
        );
        assert_eq!(t.node_of(1).map(Node::source), Some(a(2)));
        // A second session of the same initiator with the same addresses joins the node.
        assert_eq!(t.register(2, "i1", &[a(2), a(1)]), Ok(a(1)));
        assert_eq!(t.node_of(2).map(|n| n.id), t.node_of(1).map(|n| n.id));
        // Another initiator cannot take them, not even all of them.
        assert_eq!(
            t.register(4, "i2", &[a(2), a(1)]),
            Err(RegisterError::Taken(0))
        );
        assert_eq!(
            t.register(3, "i2", &[a(5), a(1)]),
            Err(RegisterError::Taken(1))
        );
        assert_eq!(t.register(3, "i2", &[a(5)]), Ok(a(5)));
        assert_eq!(t.entries(3).iter().filter(|e| e.local).count(), 1);
        t.nexus_removed(3);
        assert_eq!(t.lookup(&a(5)).map(Node::state), Some(RouteState::Down));
    }

    #[test]
    fn registered_addresses_stay_their_initiators_across_restarts_and_new_sets() {
        let mut t = RoutingTable::new(&[]);
        assert_eq!(t.register(1, "iqn.x", &[a(9)]), Ok(a(9)));
        // X moves to another address: the old one stays X's.
        assert_eq!(t.register(1, "iqn.x", &[a(8)]), Ok(a(8)));
        assert_eq!(
            t.register(2, "iqn.y", &[a(9)]),
            Err(RegisterError::Taken(0))
        );
        // A restart: the table comes back from its record.
        let record = t.registry();
        let mut t = RoutingTable::new(&[]);
        t.restore(&record).expect("restore");
        assert_eq!(t.lookup(&a(8)).map(Node::state), Some(RouteState::Down));
        assert_eq!(
            t.register(3, "iqn.y", &[a(8)]),
            Err(RegisterError::Taken(0))
        );
        assert_eq!(
            t.register(3, "iqn.y", &[a(9)]),
            Err(RegisterError::Taken(0))
        );
        // X comes back with its old address too and gets its node back.
        assert_eq!(t.register(4, "IQN.X", &[a(8), a(9)]), Ok(a(8)));
        assert_eq!(t.nodes().len(), 1);
        // Only a retire frees them, and not while X is logged in.
        assert!(t.retire("iqn.x").is_err());
        t.nexus_removed(4);
        let keys = t.retire("iqn.x").expect("retire");
        assert_eq!(keys, vec![a(8), a(9)]);
        assert_eq!(t.register(5, "iqn.y", &[a(9)]), Ok(a(9)));
    }

    #[test]
    fn a_damaged_registry_record_is_refused() {
        let mut t = RoutingTable::new(&[]);
        t.register(1, "iqn.x", &[a(9)]).expect("register");
        let mut record = t.registry();
        let last = record.len() - 6;
        record[last] ^= 1;
        assert!(RoutingTable::new(&[]).restore(&record).is_err());
        assert!(RoutingTable::new(&[]).restore(b"FTSSNODE").is_err());
        assert!(RoutingTable::new(&[]).restore(&[]).is_err());
    }
}
