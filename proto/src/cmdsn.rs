//! The target's CmdSN window (RFC 7143 sections 3.2.2.1 and 4.2.2.1).
//!
//! Non-immediate commands are handed to the SCSI layer in CmdSN order. A command ahead of
//! ExpCmdSN waits here until the gap fills; one below ExpCmdSN (a duplicate) or beyond
//! MaxCmdSN is dropped silently, as the RFC requires, and the connection lives on.
//! Immediate commands bypass ordering and never move the window.
//!
//! MaxCmdSN only grows: initiators keep the largest MaxCmdSN they have seen, so a target
//! that shrank it would later drop commands the initiator was entitled to send. It grows
//! by one each time an admitted command completes (as LIO does), so the open window is
//! `depth - commands in flight` and a full queue closes it (MaxCmdSN = ExpCmdSN - 1) until
//! a completion opens it again; the response that reports a completion carries the new
//! MaxCmdSN, so the window is never left closed.

use std::collections::BTreeMap;

use crate::serial::CmdSn;

/// Why a command was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// CmdSN below ExpCmdSN: already received.
    Duplicate,
    /// CmdSN beyond MaxCmdSN.
    OutOfWindow,
    /// Same CmdSN as a command already waiting for a gap to fill.
    DuplicateQueued,
}

/// What to do with a command just received.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Deliver these, in order (the command itself and any queued ones it unblocked).
    Deliver(Vec<T>),
    /// In the window, but waiting for lower CmdSNs.
    Queued,
    /// Dropped silently.
    Dropped(Drop),
}

enum Slot<T> {
    Cmd(T),
    /// A CmdSN that an ABORT TASK's RefCmdSN said to treat as received.
    Skip,
}

/// The CmdSN window of one session.
pub struct CmdWindow<T> {
    exp: CmdSn,
    max: CmdSn,
    depth: u32,
    /// Non-immediate commands delivered and not yet completed.
    in_flight: u32,
    /// Commands (or skips) ahead of `exp`, keyed by CmdSN; released when `exp` reaches them.
    waiting: BTreeMap<u32, Slot<T>>,
}

impl<T> CmdWindow<T> {
    /// A window starting at `exp` (the login's CmdSN) with room for `depth` commands.
    #[must_use]
    pub fn new(exp: CmdSn, depth: u32) -> Self {
        assert!(depth >= 1, "a CmdSN window needs room for one command");
        Self {
            exp,
            max: exp.add(depth - 1),
            depth,
            in_flight: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// ExpCmdSN to report.
    #[must_use]
    pub fn exp_cmd_sn(&self) -> CmdSn {
        self.exp
    }

    /// MaxCmdSN to report.
    #[must_use]
    pub fn max_cmd_sn(&self) -> CmdSn {
        self.max
    }

    /// Non-immediate commands delivered and not completed.
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether `sn` lies in [ExpCmdSN, MaxCmdSN].
    #[must_use]
    pub fn in_window(&self, sn: CmdSn) -> bool {
        sn.in_window(self.exp, self.max) && self.max.ge(self.exp)
    }

    /// Handles a received command with CmdSN `sn`.
    pub fn admit(&mut self, sn: CmdSn, immediate: bool, cmd: T) -> Admit<T> {
        if immediate {
            // Immediate commands are delivered at once and do not advance the window.
            return Admit::Deliver(vec![cmd]);
        }
        if sn.lt(self.exp) {
            return Admit::Dropped(Drop::Duplicate);
        }
        if !self.in_window(sn) {
            return Admit::Dropped(Drop::OutOfWindow);
        }
        if sn != self.exp {
            if self.waiting.contains_key(&sn.0) {
                return Admit::Dropped(Drop::DuplicateQueued);
            }
            self.waiting.insert(sn.0, Slot::Cmd(cmd));
            return Admit::Queued;
        }
        let mut out = vec![cmd];
        self.advance();
        self.release(&mut out);
        Admit::Deliver(out)
    }

    /// Treats `sn` as received without a command (ABORT TASK for a command that never
    /// arrived, RFC 7143 11.5.1). Returns commands this unblocked. Only CmdSNs in the
    /// window and not yet received are affected; returns `false` in `.0` otherwise.
    pub fn skip(&mut self, sn: CmdSn) -> (bool, Vec<T>) {
        if !self.in_window(sn) {
            return (false, Vec::new());
        }
        let mut out = Vec::new();
        if sn == self.exp {
            self.advance();
            self.completed();
            self.release(&mut out);
            return (true, out);
        }
        let abs = sn.0;
        if self.waiting.contains_key(&abs) {
            return (false, out);
        }
        self.waiting.insert(abs, Slot::Skip);
        (true, out)
    }

    /// Whether a CmdSN in the window has been received (delivered or waiting).
    #[must_use]
    pub fn received(&self, sn: CmdSn) -> bool {
        sn.lt(self.exp) || self.waiting.contains_key(&sn.0)
    }

    /// A delivered non-immediate command finished: the window opens by one.
    pub fn completed(&mut self) {
        debug_assert!(self.in_flight > 0, "completion without a command in flight");
        self.in_flight = self.in_flight.saturating_sub(1);
        self.max = self.max.next();
        debug_assert!(self.max.since(self.exp).wrapping_add(1) <= self.depth);
    }

    fn advance(&mut self) {
        self.exp = self.exp.next();
        self.in_flight += 1;
    }

    fn release(&mut self, out: &mut Vec<T>) {
        while let Some(slot) = self.waiting.remove(&self.exp.0) {
            self.advance();
            match slot {
                Slot::Cmd(c) => out.push(c),
                Slot::Skip => self.completed(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(a: Admit<u32>) -> Vec<u32> {
        match a {
            Admit::Deliver(v) => v,
            other => panic!("expected delivery, got {other:?}"),
        }
    }

    #[test]
    fn in_order_and_completion_opens_window() {
        let mut w = CmdWindow::new(CmdSn(1), 2);
        assert_eq!(w.max_cmd_sn(), CmdSn(2));
        assert_eq!(delivered(w.admit(CmdSn(1), false, 1)), vec![1]);
        assert_eq!(delivered(w.admit(CmdSn(2), false, 2)), vec![2]);
        // Full: closed window is MaxCmdSN = ExpCmdSN - 1.
        assert_eq!(w.exp_cmd_sn(), CmdSn(3));
        assert_eq!(w.max_cmd_sn(), CmdSn(2));
        assert_eq!(
            w.admit(CmdSn(3), false, 3),
            Admit::Dropped(Drop::OutOfWindow)
        );
        w.completed();
        assert_eq!(w.max_cmd_sn(), CmdSn(3));
        assert_eq!(delivered(w.admit(CmdSn(3), false, 3)), vec![3]);
    }

    #[test]
    fn gaps_queue_then_release_in_order() {
        let mut w = CmdWindow::new(CmdSn(10), 8);
        assert_eq!(w.admit(CmdSn(12), false, 12), Admit::Queued);
        assert_eq!(w.admit(CmdSn(11), false, 11), Admit::Queued);
        assert_eq!(
            w.admit(CmdSn(11), false, 99),
            Admit::Dropped(Drop::DuplicateQueued)
        );
        assert_eq!(delivered(w.admit(CmdSn(10), false, 10)), vec![10, 11, 12]);
        assert_eq!(w.admit(CmdSn(9), false, 9), Admit::Dropped(Drop::Duplicate));
        assert_eq!(w.exp_cmd_sn(), CmdSn(13));
    }

    #[test]
    fn immediate_commands_bypass_window() {
        let mut w = CmdWindow::new(CmdSn(5), 1);
        assert_eq!(delivered(w.admit(CmdSn(5), false, 5)), vec![5]);
        // The window is closed, yet an immediate command is delivered and moves nothing.
        assert_eq!(delivered(w.admit(CmdSn(6), true, 6)), vec![6]);
        assert_eq!(w.exp_cmd_sn(), CmdSn(6));
        assert_eq!(w.max_cmd_sn(), CmdSn(5));
    }

    #[test]
    fn wraps_around_2_pow_32() {
        let mut w = CmdWindow::new(CmdSn(u32::MAX - 1), 4);
        assert_eq!(w.max_cmd_sn(), CmdSn(1));
        assert_eq!(w.admit(CmdSn(0), false, 0), Admit::Queued);
        assert_eq!(
            w.admit(CmdSn(2), false, 2),
            Admit::Dropped(Drop::OutOfWindow)
        );
        assert_eq!(delivered(w.admit(CmdSn(u32::MAX - 1), false, 1)), vec![1]);
        assert_eq!(delivered(w.admit(CmdSn(u32::MAX), false, 2)), vec![2, 0]);
        assert_eq!(w.exp_cmd_sn(), CmdSn(1));
        for _ in 0..3 {
            w.completed();
        }
        assert_eq!(w.max_cmd_sn(), CmdSn(4));
        assert!(w.in_window(CmdSn(4)));
    }

    #[test]
    fn skip_fills_a_gap() {
        let mut w = CmdWindow::new(CmdSn(1), 8);
        assert_eq!(w.admit(CmdSn(2), false, 2), Admit::Queued);
        let (ok, out) = w.skip(CmdSn(1));
        assert!(ok);
        assert_eq!(out, vec![2]);
        assert_eq!(w.exp_cmd_sn(), CmdSn(3));
        // The skipped CmdSN counts as completed: only command 2 is in flight.
        assert_eq!(w.in_flight(), 1);
        assert!(!w.skip(CmdSn(100)).0);
    }

    #[test]
    fn max_cmd_sn_never_decreases() {
        let mut w = CmdWindow::new(CmdSn(0), 4);
        let mut last = w.max_cmd_sn();
        let mut next = 0u32;
        for step in 0..1000u32 {
            if step % 3 != 2 && w.in_window(CmdSn(next)) {
                let _ = w.admit(CmdSn(next), false, next);
                next += 1;
            } else if w.in_flight() > 0 {
                w.completed();
            }
            assert!(w.max_cmd_sn().ge(last));
            last = w.max_cmd_sn();
        }
    }
}
