//! The opcode table: every command the target executes, how REPORT SUPPORTED OPERATION
//! CODES describes it (CDB length and usage map), and the function of its command set
//! that runs it.

use ftss_proto::cdb::op;

use super::command::Command;
use super::{atomic_io, block_io, defect, medium, pr, provisioning, spc, xcopy};

/// Every command in the table.
pub(crate) fn commands() -> impl Iterator<Item = &'static Command> {
    COMMANDS.iter()
}

/// Every command this target executes, with its REPORT SUPPORTED OPERATION CODES
/// entry. A command is looked up by opcode (and service action where it has one).
pub(crate) static COMMANDS: &[Command] = &[
    Command {
        opcode: op::TEST_UNIT_READY,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: spc::test_unit_ready,
    },
    Command {
        opcode: op::REQUEST_SENSE,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0, 0, 0xff, 0x04],
        run: spc::request_sense_cmd,
    },
    Command {
        opcode: op::READ_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x1f, 0xff, 0xff, 0xff, 0x04],
        run: block_io::read,
    },
    Command {
        opcode: op::WRITE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x1f, 0xff, 0xff, 0xff, 0x04],
        run: block_io::write,
    },
    Command {
        opcode: op::INQUIRY,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0xff, 0xff, 0xff, 0x04],
        run: spc::inquiry,
    },
    Command {
        opcode: op::MODE_SELECT_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x11, 0, 0, 0xff, 0x04],
        run: spc::mode_select,
    },
    Command {
        opcode: op::MODE_SENSE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x08, 0xff, 0xff, 0xff, 0x04],
        run: spc::mode_sense,
    },
    Command {
        opcode: op::START_STOP_UNIT,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0x01, 0, 0x0f, 0xf7, 0x04],
        run: medium::start_stop_unit,
    },
    Command {
        opcode: op::PREVENT_ALLOW,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0x03, 0x04],
        run: medium::prevent_allow,
    },
    Command {
        opcode: op::READ_CAPACITY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04],
        run: medium::read_capacity_10,
    },
    Command {
        opcode: op::READ_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::read,
    },
    Command {
        opcode: op::WRITE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::write_verify,
    },
    Command {
        opcode: op::VERIFY_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::verify,
    },
    Command {
        opcode: op::PRE_FETCH_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::pre_fetch,
    },
    Command {
        opcode: op::SYNCHRONIZE_CACHE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x06, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: block_io::synchronize_cache,
    },
    Command {
        opcode: op::MODE_SELECT_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: spc::mode_select,
    },
    Command {
        opcode: op::MODE_SENSE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
        run: spc::mode_sense,
    },
    Command {
        opcode: op::READ_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::read,
    },
    Command {
        opcode: op::WRITE_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::write_verify,
    },
    Command {
        opcode: op::VERIFY_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::verify,
    },
    Command {
        opcode: op::PRE_FETCH_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::pre_fetch,
    },
    Command {
        opcode: op::SYNCHRONIZE_CACHE_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: block_io::synchronize_cache,
    },
    Command {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SA_READ_CAPACITY_16),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: medium::read_capacity_16,
    },
    Command {
        opcode: op::REPORT_LUNS,
        sa: None,
        cdb_len: 12,
        usage: &[0xff, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: spc::report_luns_cmd,
    },
    Command {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::SA_REPORT_SUPPORTED_OPCODES),
        cdb_len: 12,
        usage: &[
            0xff, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: spc::report_supported_opcodes,
    },
    Command {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::SA_REPORT_SUPPORTED_TMFS),
        cdb_len: 12,
        usage: &[0xff, 0x1f, 0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: spc::report_supported_tmfs,
    },
    Command {
        opcode: op::READ_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: block_io::read,
    },
    Command {
        opcode: op::WRITE_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: block_io::write,
    },
    Command {
        opcode: op::WRITE_VERIFY_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: block_io::write_verify,
    },
    Command {
        opcode: op::VERIFY_12,
        sa: None,
        cdb_len: 12,
        usage: &[
            0xff, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04,
        ],
        run: block_io::verify,
    },
    // ---- reservations (pr.rs), copy manager (xcopy.rs), defect data (defect.rs) ----
    Command {
        opcode: pr::op::RESERVE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: pr::reserve,
    },
    Command {
        opcode: pr::op::RELEASE_6,
        sa: None,
        cdb_len: 6,
        usage: &[0xff, 0, 0, 0, 0, 0x04],
        run: pr::release,
    },
    Command {
        opcode: pr::op::RESERVE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x04],
        run: pr::reserve,
    },
    Command {
        opcode: pr::op::RELEASE_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x04],
        run: pr::release,
    },
    pr_in(0x00),  // READ KEYS
    pr_in(0x01),  // READ RESERVATION
    pr_in(0x02),  // REPORT CAPABILITIES
    pr_in(0x03),  // READ FULL STATUS
    pr_out(0x00), // REGISTER
    pr_out(0x01), // RESERVE
    pr_out(0x02), // RELEASE
    pr_out(0x03), // CLEAR
    pr_out(0x04), // PREEMPT
    pr_out(0x05), // PREEMPT AND ABORT
    pr_out(0x06), // REGISTER AND IGNORE EXISTING KEY
    pr_out(0x07), // REGISTER AND MOVE
    Command {
        opcode: xcopy::op::EXTENDED_COPY,
        sa: Some(xcopy::op::SA_EXTENDED_COPY_LID1),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::extended_copy,
    },
    Command {
        opcode: xcopy::op::RECEIVE_COPY_RESULTS,
        sa: Some(xcopy::op::SA_COPY_STATUS),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0xff, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::receive_copy_results,
    },
    Command {
        opcode: xcopy::op::RECEIVE_COPY_RESULTS,
        sa: Some(xcopy::op::SA_OPERATING_PARAMETERS),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
        run: xcopy::receive_copy_results,
    },
    Command {
        opcode: defect::READ_DEFECT_DATA_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: defect::read_defect_data,
    },
    Command {
        opcode: defect::READ_DEFECT_DATA_12,
        sa: None,
        cdb_len: 12,
        usage: &[0xff, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
        run: defect::read_defect_data,
    },
    // SBC-3 beyond plain reads and writes: provisioning, atomic read-modify-writes.
    Command {
        opcode: provisioning::SANITIZE,
        sa: Some(provisioning::SANITIZE_BLOCK_ERASE),
        cdb_len: 10,
        usage: &[0xff, 0xbf, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: provisioning::sanitize,
    },
    Command {
        opcode: provisioning::SANITIZE,
        sa: Some(provisioning::SANITIZE_EXIT_FAILURE_MODE),
        cdb_len: 10,
        usage: &[0xff, 0xbf, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: provisioning::sanitize_exit_failure_mode,
    },
    Command {
        opcode: op::WRITE_SAME_10,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0xe8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04],
        run: provisioning::write_same,
    },
    Command {
        opcode: op::UNMAP,
        sa: None,
        cdb_len: 10,
        usage: &[0xff, 0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x04],
        run: provisioning::unmap,
    },
    Command {
        opcode: op::COMPARE_AND_WRITE,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x04,
        ],
        run: atomic_io::compare_and_write,
    },
    Command {
        opcode: op::ORWRITE_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: atomic_io::orwrite,
    },
    Command {
        opcode: op::WRITE_SAME_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xe9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: provisioning::write_same,
    },
    Command {
        opcode: op::WRITE_ATOMIC_16,
        sa: None,
        cdb_len: 16,
        usage: &[
            0xff, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x1f, 0x04,
        ],
        run: atomic_io::write_atomic,
    },
    Command {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SA_GET_LBA_STATUS),
        cdb_len: 16,
        usage: &[
            0xff, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
        run: provisioning::get_lba_status,
    },
];

/// Commands whose service action field (byte 1, bits 4-0) selects among the table's
/// entries: an unlisted service action is an invalid CDB field, not an unknown opcode.
pub(crate) const SA_IN_BYTE_1: [u8; 5] = [
    pr::op::PERSISTENT_RESERVE_IN,
    pr::op::PERSISTENT_RESERVE_OUT,
    xcopy::op::EXTENDED_COPY,
    xcopy::op::RECEIVE_COPY_RESULTS,
    provisioning::SANITIZE,
];

/// PERSISTENT RESERVE IN with service action `sa`.
const fn pr_in(sa: u8) -> Command {
    Command {
        opcode: pr::op::PERSISTENT_RESERVE_IN,
        sa: Some(sa),
        cdb_len: 10,
        usage: &[0xff, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
        run: pr::persistent_reserve_in,
    }
}

/// PERSISTENT RESERVE OUT with service action `sa`.
const fn pr_out(sa: u8) -> Command {
    Command {
        opcode: pr::op::PERSISTENT_RESERVE_OUT,
        sa: Some(sa),
        cdb_len: 10,
        usage: &[0xff, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04],
        run: pr::persistent_reserve_out,
    }
}
