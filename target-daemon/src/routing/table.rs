//! The routing table: which node has which addresses, which sessions (nexuses) are that
//! node's, and whether it can take packets now.
//!
//! A node is known from the configuration (`[[node]]`: addresses by initiator name) or
//! from NODE REGISTER at run time. It is *available* while at least one of its sessions
//! is logged in and it is not in maintenance, *down* otherwise. A node stays in the table
//! after its last session ends, so packets to it are answered "destination down" rather
//! than "unknown", and its queued packets wait for it.

use std::collections::{BTreeSet, HashMap};

use ftss_proto::vendor::{NodeAddr, RouteEntry, RouteState};

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

/// The routing table.
#[derive(Default)]
pub struct RoutingTable {
    nodes: Vec<Node>,
    by_nexus: HashMap<u64, usize>,
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
            });
        }
        t
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
        let target = mine.or_else(|| self.nodes.iter().position(same));
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
                });
                self.nodes.len() - 1
            }
        };
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

#[cfg(test)]
mod tests {
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
}
