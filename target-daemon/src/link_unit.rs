//! The link unit: on every session it splits the commands by opcode. Standard SCSI
//! commands go to the file operations unit (the LUN's SBC/SPC execution over its media);
//! vendor-specific opcodes (0xC0-0xFF) go to the routing agent, which carries network
//! packets. Both share the connection, the CmdSN window and the LUNs, so packets and
//! block I/O travel in one session.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_opcodes_go_to_the_routing_agent_and_the_rest_to_the_lun() {
        assert_eq!(unit_for(0x28), Unit::FileOperations); // READ(10)
        assert_eq!(unit_for(0xa0), Unit::FileOperations); // REPORT LUNS
        assert_eq!(unit_for(0xbf), Unit::FileOperations);
        assert_eq!(unit_for(0xc0), Unit::RoutingAgent); // SEND
        assert_eq!(unit_for(0xff), Unit::RoutingAgent);
    }
}
