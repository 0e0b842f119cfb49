//! The link unit: on every session it splits the commands by opcode. Standard SCSI
//! commands go to the file operations unit (the LUN's SBC/SPC execution over its media);
//! vendor-specific opcodes (0xC0-0xFF) go to the routing agent, which carries network
//! packets. Both share the connection, the CmdSN window and the LUNs, so packets and
//! block I/O travel in one session.
//!
//! Each target's [`ScsiTarget`](crate::scsi::ScsiTarget) holds one [`LinkUnit`] and asks
//! it first, for every command, which unit runs it; the transport only asks
//! [`unit_for`] where it treats the two kinds differently (an abort of a LUN's tasks
//! leaves the routing agent's long polls alone).

use std::sync::{Arc, PoisonError, RwLock};

use crate::scsi::{ItNexus, ScsiCommand, ScsiOutcome};

/// Where a command is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// The LUN: block and SPC commands.
    FileOperations,
    /// The routing agent: the vendor packet commands.
    RoutingAgent,
}

/// First vendor-specific opcode (SPC-4 table 34: C0h-FFh).
pub const VENDOR_FIRST: u8 = 0xc0;

/// The unit that executes `opcode`.
pub const fn unit_for(opcode: u8) -> Unit {
    if opcode >= VENDOR_FIRST {
        Unit::RoutingAgent
    } else {
        Unit::FileOperations
    }
}

/// The routing agent's side of the link unit: executes the vendor opcodes (0xC0-0xFF)
/// and hears of every session, so it knows which nodes are logged in.
pub trait VendorHandler: Send + Sync {
    /// Executes a vendor command.
    fn execute(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> ScsiOutcome;

    /// A session logged in.
    fn nexus_added(&self, _nexus: &ItNexus) {}

    /// A session ended.
    fn nexus_removed(&self, _nexus: &ItNexus) {}
}

/// What the link unit did with a command.
#[derive(Debug)]
pub enum Routed {
    /// A standard opcode: the file operations unit (the target's LUN) runs it.
    FileOperations,
    /// A vendor opcode, and the routing agent's answer.
    RoutingAgent(ScsiOutcome),
    /// A vendor opcode on a target without a routing agent (no packet queue configured):
    /// the opcode is unknown there.
    NoRoutingAgent,
}

/// The link unit of one target: which unit runs each command, and the routing agent
/// attached to it (the daemon attaches one when packets are configured).
#[derive(Default)]
pub struct LinkUnit {
    routing_agent: RwLock<Option<Arc<dyn VendorHandler>>>,
}

impl LinkUnit {
    /// Sends the vendor opcodes to `agent` from now on.
    pub fn attach_routing_agent(&self, agent: Arc<dyn VendorHandler>) {
        *self
            .routing_agent
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(agent);
    }

    fn agent(&self) -> Option<Arc<dyn VendorHandler>> {
        // The slot is only ever replaced whole, so a poisoned lock still holds a whole
        // value.
        self.routing_agent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `cmd` on the routing agent if its opcode is a vendor one; a standard opcode
    /// (or an empty CDB) is left to the file operations unit.
    pub fn route(&self, nexus: &ItNexus, cmd: &ScsiCommand<'_>) -> Routed {
        match cmd.cdb.first().copied().map(unit_for) {
            Some(Unit::RoutingAgent) => match self.agent() {
                Some(agent) => Routed::RoutingAgent(agent.execute(nexus, cmd)),
                None => Routed::NoRoutingAgent,
            },
            _ => Routed::FileOperations,
        }
    }

    /// A session logged in: the routing agent learns of it.
    pub fn nexus_added(&self, nexus: &ItNexus) {
        if let Some(agent) = self.agent() {
            agent.nexus_added(nexus);
        }
    }

    /// A session ended: the routing agent learns of it.
    pub fn nexus_removed(&self, nexus: &ItNexus) {
        if let Some(agent) = self.agent() {
            agent.nexus_removed(nexus);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::scsi::TaskAttr;

    #[test]
    fn vendor_opcodes_go_to_the_routing_agent_and_the_rest_to_the_lun() {
        assert_eq!(unit_for(0x28), Unit::FileOperations); // READ(10)
        assert_eq!(unit_for(0xa0), Unit::FileOperations); // REPORT LUNS
        assert_eq!(unit_for(0xbf), Unit::FileOperations);
        assert_eq!(unit_for(0xc0), Unit::RoutingAgent); // SEND
        assert_eq!(unit_for(0xff), Unit::RoutingAgent);
    }

    /// Counts what reaches it.
    #[derive(Default)]
    struct Agent {
        executed: AtomicUsize,
        sessions: AtomicUsize,
    }

    impl VendorHandler for Agent {
        fn execute(&self, _: &ItNexus, _: &ScsiCommand<'_>) -> ScsiOutcome {
            self.executed.fetch_add(1, Ordering::Relaxed);
            ScsiOutcome::default()
        }
        fn nexus_added(&self, _: &ItNexus) {
            self.sessions.fetch_add(1, Ordering::Relaxed);
        }
        fn nexus_removed(&self, _: &ItNexus) {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_link_unit_sends_vendor_commands_to_the_attached_agent_only() {
        let nexus = ItNexus {
            id: 1,
            initiator_name: Arc::from("iqn.2026-11.org.ftss:a"),
            isid: [0; 6],
            tpgt: 1,
        };
        let cmd = |cdb: &'static [u8]| ScsiCommand {
            lun: 0,
            cdb,
            data_out: &[],
            expected_len: 0,
            attr: TaskAttr::Simple,
            resume_until: None,
        };
        let link = LinkUnit::default();
        assert!(matches!(
            link.route(&nexus, &cmd(&[0xc1; 16])),
            Routed::NoRoutingAgent
        ));
        let agent = Arc::new(Agent::default());
        link.attach_routing_agent(Arc::clone(&agent) as Arc<dyn VendorHandler>);
        link.nexus_added(&nexus);
        assert_eq!(agent.sessions.load(Ordering::Relaxed), 1);
        assert!(matches!(
            link.route(&nexus, &cmd(&[0xc1; 16])),
            Routed::RoutingAgent(_)
        ));
        for standard in [&[0x28u8; 10][..], &[0x00; 6], &[]] {
            assert!(matches!(
                link.route(&nexus, &cmd(standard)),
                Routed::FileOperations
            ));
        }
        assert_eq!(agent.executed.load(Ordering::Relaxed), 1);
        link.nexus_removed(&nexus);
        assert_eq!(agent.sessions.load(Ordering::Relaxed), 0);
    }
}
