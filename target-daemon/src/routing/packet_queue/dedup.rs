//! The duplicate index: which (sender, packet id) pairs are taken, with the outcome and
//! sequence number of the packet that took them. Kept as runs, because initiators number
//! their packets consecutively and the queue stores a SEND batch under consecutive
//! sequence numbers:
//!
//! - `runs`: per sender, ids `first..first + len` got sequence numbers `seq..seq + len`
//!   and one outcome. Releasing or forgetting a middle id splits its run in two.
//! - `order`: the insertions, oldest first, as runs of consecutive sequence numbers of one
//!   sender whose ids step by 0 (the copies of one broadcast) or by 1. The last `window`
//!   insertions are kept; evicting one forgets its id only if the id still names that
//!   insertion's sequence number, so a newer packet that reused the id stays.
//! - `released`: the sequence numbers of released packet records, oldest first, as runs
//!   of consecutive numbers released at one time. Their ids are forgotten `hold` after the
//!   release (or when more than `window` are held); the id of a sequence number is found
//!   in `order` (if it is no longer there, it was already forgotten).
//!
//! Bytes per id (measured by `weight::dedup_bytes_per_id` with a counting allocator, at
//! full windows of 2^18 and 200,000 ids): typically a fraction of a byte (SENDs of 512
//! from one sender are one run in each of the three). At worst every id is its own run
//! (senders interleaved one packet at a time, ids not consecutive, a sender per packet):
//! a B-tree slot of 40 bytes in nodes about half full (about 80 bytes with the inner
//! nodes), an order run of 40 bytes and, while held, a released run of 24, the queues up
//! to twice that in spare capacity: measured 118 to 131 bytes per id with nothing
//! released, 130 to 146 with half held ([`WORST_BYTES_PER_ID`]). The hash map, insertion
//! queue and released queue of one entry per id this replaced took 96 to 114 and 122 to
//! 134: in that worst case the runs cost up to a third more. Every run holds at least one
//! id, and at most `window` ids are in `order` and in `released`, so memory is bounded by
//! the window.

use std::collections::{BTreeMap, VecDeque};

use ftss_proto::vendor::{NodeAddr, Outcome};

/// Ids `first..first + len` of one sender (the map's key) got sequence numbers
/// `seq..seq + len` and `outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    seq: u64,
    len: u32,
    outcome: Outcome,
}

/// Insertions `i < len`: id `id + step * i` of `sender` got sequence number `seq + i`.
#[derive(Clone, Copy, Debug)]
struct OrderRun {
    sender: NodeAddr,
    id: u64,
    seq: u64,
    len: u32,
    step: u8,
}

/// Packet records `seq..seq + len` were released at `at_ms`.
#[derive(Clone, Copy, Debug)]
struct ReleasedRun {
    seq: u64,
    at_ms: u64,
    len: u32,
}

/// The most bytes per id the duplicate index was measured to hold (module documentation).
#[cfg(test)]
const WORST_BYTES_PER_ID: f64 = 150.0;

/// The duplicate index (module documentation).
#[derive(Debug)]
pub(super) struct DedupIndex {
    runs: BTreeMap<(NodeAddr, u64), Run>,
    order: VecDeque<OrderRun>,
    /// Insertions in `order` (the sum of its runs' lengths).
    order_len: usize,
    released: VecDeque<ReleasedRun>,
    /// Records in `released`.
    released_len: usize,
    window: usize,
}

impl DedupIndex {
    pub(super) fn new(window: usize) -> Self {
        DedupIndex {
            runs: BTreeMap::new(),
            order: VecDeque::new(),
            order_len: 0,
            released: VecDeque::new(),
            released_len: 0,
            window,
        }
    }

    /// The run holding `id` of `sender`: its first id and the run.
    fn run_of(&self, sender: NodeAddr, id: u64) -> Option<(u64, Run)> {
        let (&(s, first), &run) = self.runs.range(..=(sender, id)).next_back()?;
        (s == sender && id - first < u64::from(run.len)).then_some((first, run))
    }

    /// The outcome and sequence number of the packet that took `id` of `sender`.
    pub(super) fn get(&self, sender: NodeAddr, id: u64) -> Option<(Outcome, u64)> {
        let (first, run) = self.run_of(sender, id)?;
        Some((run.outcome, run.seq + (id - first)))
    }

    /// A packet record was indexed (in log order): takes its id, or for a later copy of a
    /// broadcast moves the id to it. The copies of one broadcast share their key and are
    /// stored one after the other: the entry follows the last copy (keeping the first
    /// copy's outcome), so it lasts until the tail has released every copy.
    pub(super) fn note_stored(
        &mut self,
        sender: NodeAddr,
        id: u64,
        outcome: Outcome,
        seq: u64,
        broadcast: bool,
    ) {
        let taken = match self.get(sender, id) {
            None => {
                self.insert(sender, id, outcome, seq);
                true
            }
            Some((first_outcome, s)) if broadcast && s < seq => {
                self.remove(sender, id);
                self.insert(sender, id, first_outcome, seq);
                true
            }
            Some(_) => false,
        };
        if taken {
            self.push_order(sender, id, seq);
            while self.order_len > self.window {
                let Some((s, i, q)) = self.pop_order() else {
                    break;
                };
                self.forget(s, i, q);
            }
        }
    }

    /// Packet record `seq` was released at `at_ms` (in log order).
    pub(super) fn note_released(&mut self, seq: u64, at_ms: u64) {
        self.released_len += 1;
        if let Some(b) = self.released.back_mut() {
            assert!(seq >= b.seq + u64::from(b.len), "released out of log order");
            if b.seq + u64::from(b.len) == seq && b.at_ms == at_ms && b.len < u32::MAX {
                b.len += 1;
                return;
            }
        }
        self.released.push_back(ReleasedRun { seq, at_ms, len: 1 });
    }

    /// Forgets the ids of records released `hold_ms` ago or longer, and the oldest held
    /// while more than the window are.
    pub(super) fn expire(&mut self, now_ms: u64, hold_ms: u64) {
        while let Some(f) = self.released.front_mut() {
            if now_ms.saturating_sub(f.at_ms) < hold_ms && self.released_len <= self.window {
                break;
            }
            let seq = f.seq;
            if f.len == 1 {
                self.released.pop_front();
            } else {
                f.len -= 1;
                f.seq += 1;
            }
            assert!(self.released_len > 0, "released count below its runs");
            self.released_len -= 1;
            self.forget_seq(seq);
        }
        shrink(&mut self.released);
    }

    /// Forgets the id packet `seq` took, if it still names that packet.
    fn forget_seq(&mut self, seq: u64) {
        let i = self
            .order
            .partition_point(|r| r.seq + u64::from(r.len) <= seq);
        let Some(r) = self.order.get(i) else {
            return;
        };
        if r.seq > seq {
            // Not an insertion (a notice, or an id that was taken).
            return;
        }
        let id = r.id + u64::from(r.step) * (seq - r.seq);
        self.forget(r.sender, id, seq);
    }

    /// Forgets `id` of `sender` if it still names packet `seq`.
    fn forget(&mut self, sender: NodeAddr, id: u64, seq: u64) {
        if self.get(sender, id).is_some_and(|(_, s)| s == seq) {
            self.remove(sender, id);
        }
    }

    /// Takes `id` of `sender` (not taken) for packet `seq`, the newest.
    fn insert(&mut self, sender: NodeAddr, id: u64, outcome: Outcome, seq: u64) {
        if let Some(prev) = id.checked_sub(1) {
            if let Some((&(s, first), run)) = self.runs.range_mut(..=(sender, prev)).next_back() {
                if s == sender
                    && prev - first == u64::from(run.len) - 1
                    && run.outcome == outcome
                    && run.seq + u64::from(run.len) == seq
                    && run.len < u32::MAX
                {
                    run.len += 1;
                    return;
                }
            }
        }
        let old = self.runs.insert(
            (sender, id),
            Run {
                seq,
                len: 1,
                outcome,
            },
        );
        assert!(old.is_none(), "inserted a taken id");
    }

    /// Frees `id` of `sender`, splitting its run.
    fn remove(&mut self, sender: NodeAddr, id: u64) {
        let Some((first, run)) = self.run_of(sender, id) else {
            return;
        };
        let off = id - first;
        // `off < run.len`, a u32.
        let left = off as u32;
        let right = run.len - left - 1;
        if left == 0 {
            self.runs.remove(&(sender, first));
        } else if let Some(r) = self.runs.get_mut(&(sender, first)) {
            r.len = left;
        }
        if right > 0 {
            // `id < first + len - 1`: no overflow.
            self.runs.insert(
                (sender, id + 1),
                Run {
                    seq: run.seq + off + 1,
                    len: right,
                    outcome: run.outcome,
                },
            );
        }
    }

    fn push_order(&mut self, sender: NodeAddr, id: u64, seq: u64) {
        self.order_len += 1;
        if let Some(b) = self.order.back_mut() {
            let end = b.seq + u64::from(b.len);
            assert!(seq >= end, "indexed out of log order");
            if b.sender == sender && end == seq && b.len < u32::MAX {
                let last = b.id + u64::from(b.step) * u64::from(b.len - 1);
                let next = last.checked_add(1);
                if b.len == 1 && (id == b.id || Some(id) == next) {
                    b.step = u8::from(id != b.id);
                    b.len = 2;
                    return;
                }
                if (b.step == 0 && id == b.id) || (b.step == 1 && Some(id) == next) {
                    b.len += 1;
                    return;
                }
            }
        }
        self.order.push_back(OrderRun {
            sender,
            id,
            seq,
            len: 1,
            step: 0,
        });
    }

    /// The oldest insertion, removed from `order`.
    fn pop_order(&mut self) -> Option<(NodeAddr, u64, u64)> {
        let f = self.order.front_mut()?;
        let item = (f.sender, f.id, f.seq);
        if f.len == 1 {
            self.order.pop_front();
        } else {
            f.len -= 1;
            f.seq += 1;
            // The run's last id is `id + step * (len - 1)`: no overflow.
            f.id += u64::from(f.step);
        }
        assert!(self.order_len > 0, "order count below its runs");
        self.order_len -= 1;
        shrink(&mut self.order);
        Some(item)
    }

    /// (id runs, order runs, released runs, ids taken): for tests.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, usize, usize, u64) {
        let ids = self.runs.values().map(|r| u64::from(r.len)).sum();
        (self.runs.len(), self.order.len(), self.released.len(), ids)
    }

    /// Checks every invariant (slow): for tests.
    #[cfg(test)]
    pub(super) fn check(&self) {
        let sum: usize = self.order.iter().map(|r| r.len as usize).sum();
        assert_eq!(sum, self.order_len);
        assert!(self.order_len <= self.window);
        let sum: usize = self.released.iter().map(|r| r.len as usize).sum();
        assert_eq!(sum, self.released_len);
        for w in self.order.iter().collect::<Vec<_>>().windows(2) {
            assert!(w[0].seq + u64::from(w[0].len) <= w[1].seq);
        }
        let mut prev: Option<(NodeAddr, u64)> = None;
        for (&(s, first), r) in &self.runs {
            assert!(r.len > 0);
            let last = first.checked_add(u64::from(r.len) - 1).expect("run end");
            if let Some((ps, plast)) = prev {
                assert!(ps != s || plast < first, "runs overlap");
            }
            prev = Some((s, last));
            // Every taken id is an insertion still in `order`.
            for k in 0..u64::from(r.len) {
                let seq = r.seq + k;
                let i = self
                    .order
                    .partition_point(|o| o.seq + u64::from(o.len) <= seq);
                let o = self.order.get(i).expect("taken id in order");
                assert!(o.seq <= seq && o.sender == s);
                assert_eq!(o.id + u64::from(o.step) * (seq - o.seq), first + k);
            }
        }
    }
}

/// Gives back a queue's spare capacity once it is mostly unused, so a burst of runs does
/// not keep its memory (amortised: at most once per halving).
fn shrink<T>(q: &mut VecDeque<T>) {
    if q.capacity() > 64 && q.len() < q.capacity() / 4 {
        q.shrink_to(q.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    /// Both structures fed the same log: packet records (some notices, not indexed) and
    /// ACK records take sequence numbers; the tail releases the oldest records.
    struct Pair {
        new: DedupIndex,
        old: Model,
        /// Packet records not yet released: (seq, key).
        log: VecDeque<(u64, (NodeAddr, u64))>,
        next_seq: u64,
        now: u64,
        hold: u64,
        keys: Vec<(NodeAddr, u64)>,
    }

    impl Pair {
        fn new(window: usize, hold: u64) -> Pair {
            Pair {
                new: DedupIndex::new(window),
                old: Model::new(window),
                log: VecDeque::new(),
                next_seq: 1,
                now: 0,
                hold,
                keys: Vec::new(),
            }
        }

        /// Stores a packet as the queue does: a retry of a taken id is not stored (the
        /// copies of a broadcast are stored together, so `copies > 1` skips the check).
        fn store(&mut self, s: NodeAddr, id: u64, o: Outcome, copies: u64) {
            if copies == 1 && self.new.get(s, id).is_some() {
                return;
            }
            for _ in 0..copies {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.new.note_stored(s, id, o, seq, copies > 1);
                self.old.stored(s, id, o, seq, copies > 1);
                self.log.push_back((seq, (s, id)));
            }
            self.keys.push((s, id));
        }

        /// A notice (a packet record that takes no id) or an ACK record.
        fn other(&mut self, notice: bool) {
            let seq = self.next_seq;
            self.next_seq += 1;
            if notice {
                self.log.push_back((seq, (a(200), 7)));
            }
        }

        fn release(&mut self, n: usize) {
            for _ in 0..n {
                let Some((seq, key)) = self.log.pop_front() else {
                    break;
                };
                self.new.note_released(seq, self.now);
                self.old.released(key, seq, self.now);
            }
            self.new.expire(self.now, self.hold);
            self.old.expire(self.now, self.hold);
        }

        fn agree(&self) {
            self.agree_recent(usize::MAX);
        }

        /// Compares the `recent` ids stored last (and their successors), and everything
        /// the runs hold.
        fn agree_recent(&self, recent: usize) {
            assert_eq!(
                self.new.counts().3 as usize,
                self.old.map.len(),
                "ids taken"
            );
            if recent == usize::MAX {
                self.new.check();
                for (&(s, id), &(o, seq)) in &self.old.map {
                    assert_eq!(self.new.get(s, id), Some((o, seq)));
                }
            }
            let from = self.keys.len().saturating_sub(recent);
            for &(s, id) in &self.keys[from..] {
                assert_eq!(self.new.get(s, id), self.old.map.get(&(s, id)).copied());
                if let Some(next) = id.checked_add(1) {
                    assert_eq!(self.new.get(s, next), self.old.map.get(&(s, next)).copied());
                }
            }
        }
    }

    /// Random logs (consecutive ids, reused ids, random ids near the ends of u64,
    /// interleaved senders, broadcasts, notices, ACK records, releases, time passing,
    /// small windows) give the runs exactly the old structure's answers.
    #[test]
    fn runs_answer_as_the_map_they_replaced() {
        for seed in 1..=36u64 {
            let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let window = [1, 2, 5, 17, 64, 1000][(seed % 6) as usize];
            let mut p = Pair::new(window, [0, 10, 1000][(seed % 3) as usize]);
            let mut next_id = [0u64, 100, u64::MAX - 40, 5];
            for step in 0..2000 {
                let sender = r.below(4) as usize;
                let s = a(sender as u8 + 1);
                let o = if r.below(8) == 0 {
                    Outcome::Accepted
                } else {
                    Outcome::Delivered
                };
                match r.below(20) {
                    0..=8 => {
                        let id = next_id[sender];
                        next_id[sender] = id.wrapping_add(1);
                        p.store(s, id, o, 1);
                    }
                    9 => {
                        // A batch.
                        for _ in 0..r.below(12) {
                            let id = next_id[sender];
                            next_id[sender] = id.wrapping_add(1);
                            p.store(s, id, o, 1);
                        }
                    }
                    10 => {
                        // A retry or a reuse of a recent id.
                        let id = next_id[sender].wrapping_sub(1 + r.below(30));
                        p.store(s, id, o, 1);
                    }
                    11 => {
                        let id = next_id[sender];
                        next_id[sender] = id.wrapping_add(1);
                        p.store(s, id, o, 2 + r.below(3));
                    }
                    12 => p.store(s, r.next(), o, 1),
                    13 => p.other(r.below(2) == 0),
                    14..=17 => p.release(r.below(6) as usize),
                    18 => p.now += r.below(400),
                    _ => {
                        p.now += r.below(50);
                        p.release(0);
                    }
                }
                p.agree_recent(if step % 50 == 0 { usize::MAX } else { 40 });
            }
        }
    }

    /// Released ids stay taken for the hold, then are free and can be reused; the new
    /// packet's run is not disturbed by the old one's expiry.
    #[test]
    fn an_id_reused_after_the_hold_is_a_new_packet() {
        let mut p = Pair::new(1000, 100);
        for id in 1..=10 {
            p.store(a(1), id, Outcome::Delivered, 1);
        }
        p.release(10);
        p.agree();
        assert_eq!(p.new.get(a(1), 4), Some((Outcome::Delivered, 4)), "held");
        p.now = 100;
        p.release(0);
        assert_eq!(p.new.get(a(1), 4), None, "the hold is over");
        for id in 1..=10 {
            p.store(a(1), id, Outcome::Accepted, 1);
        }
        p.agree();
        assert_eq!(p.new.get(a(1), 4), Some((Outcome::Accepted, 14)));
        assert_eq!(p.new.counts().0, 1, "one run again");
    }

    /// Part of a run is released and its hold ends: the rest is still taken, a retry of
    /// a middle id still stored is a duplicate, and a released one is free.
    #[test]
    fn a_retry_of_a_middle_id_after_part_of_a_run_was_released() {
        let mut p = Pair::new(1000, 0);
        for id in 100..110 {
            p.store(a(1), id, Outcome::Delivered, 1);
        }
        assert_eq!(p.new.counts().0, 1);
        p.release(4);
        p.agree();
        assert_eq!(p.new.get(a(1), 103), None);
        assert_eq!(p.new.get(a(1), 104), Some((Outcome::Delivered, 5)));
        // The sender reuses a released id in the middle of its numbering.
        p.store(a(1), 102, Outcome::Delivered, 1);
        p.store(a(1), 105, Outcome::Delivered, 1);
        p.agree();
        assert_eq!(p.new.get(a(1), 102), Some((Outcome::Delivered, 11)));
        assert_eq!(p.new.get(a(1), 105), Some((Outcome::Delivered, 6)), "retry");
        p.release(6);
        p.agree();
        assert_eq!(p.new.get(a(1), 109), None);
        assert_eq!(p.new.get(a(1), 102), Some((Outcome::Delivered, 11)));
    }

    /// Two senders stored one packet at a time: neither run grows (sequence numbers
    /// alternate), and every id answers its own packet.
    #[test]
    fn interleaved_senders_keep_their_own_ids() {
        let mut p = Pair::new(1000, 0);
        for id in 0..50 {
            p.store(a(1), id, Outcome::Delivered, 1);
            p.store(a(2), id, Outcome::Accepted, 1);
        }
        p.agree();
        assert_eq!(p.new.get(a(1), 7), Some((Outcome::Delivered, 15)));
        assert_eq!(p.new.get(a(2), 7), Some((Outcome::Accepted, 16)));
        // Batches of each compress again.
        for b in 0..5 {
            for id in 0..10 {
                p.store(a(1), 1000 + b * 10 + id, Outcome::Delivered, 1);
            }
            for id in 0..10 {
                p.store(a(2), 1000 + b * 10 + id, Outcome::Delivered, 1);
            }
        }
        p.agree();
        assert_eq!(p.new.counts().0, 100 + 10, "a run per id, then per batch");
        p.release(130);
        p.agree();
    }

    /// The copies of a broadcast share their id: it follows the last copy, keeps the first
    /// copy's outcome, is one order run, and lasts until the last copy is released.
    #[test]
    fn a_broadcast_id_follows_its_last_copy() {
        let mut p = Pair::new(1000, 0);
        p.store(a(1), 1, Outcome::Delivered, 1);
        p.store(a(1), 2, Outcome::Accepted, 3);
        p.store(a(1), 3, Outcome::Accepted, 3);
        p.agree();
        assert_eq!(p.new.get(a(1), 2), Some((Outcome::Accepted, 4)));
        assert_eq!(p.new.get(a(1), 3), Some((Outcome::Accepted, 7)));
        // Broadcasts with a step of 0, the next ids a step of 1.
        assert!(p.new.counts().1 <= 4, "{:?}", p.new.counts());
        p.release(3);
        assert_eq!(
            p.new.get(a(1), 2),
            Some((Outcome::Accepted, 4)),
            "one copy left"
        );
        p.release(1);
        assert_eq!(p.new.get(a(1), 2), None);
        p.agree();
    }

    /// At the window's edge the oldest insertion is evicted, but an id that a newer
    /// packet reused (after its hold) stays with the newer packet.
    #[test]
    fn eviction_at_the_window_edge_spares_a_reused_id() {
        let mut p = Pair::new(4, 0);
        for id in 1..=3 {
            p.store(a(1), id, Outcome::Delivered, 1);
        }
        p.release(1);
        assert_eq!(p.new.get(a(1), 1), None);
        p.store(a(1), 1, Outcome::Accepted, 1);
        p.agree();
        assert_eq!(p.new.get(a(1), 1), Some((Outcome::Accepted, 4)));
        // The window is full; the next store evicts the insertion of seq 1 (id 1's
        // old packet): id 1 is the newer packet's and stays.
        p.store(a(1), 4, Outcome::Delivered, 1);
        p.agree();
        assert_eq!(p.new.get(a(1), 1), Some((Outcome::Accepted, 4)));
        assert_eq!(p.new.get(a(1), 2), Some((Outcome::Delivered, 2)));
        p.store(a(1), 5, Outcome::Delivered, 1);
        p.agree();
        assert_eq!(p.new.get(a(1), 2), None, "evicted");
        assert_eq!(p.new.counts().3, 4);
    }

    /// Ids at the ends of u64 neither overflow nor merge across the wrap.
    #[test]
    fn ids_at_the_ends_of_u64() {
        let mut p = Pair::new(100, 0);
        p.store(a(1), u64::MAX - 1, Outcome::Delivered, 1);
        p.store(a(1), u64::MAX, Outcome::Delivered, 1);
        p.store(a(1), 0, Outcome::Delivered, 1);
        p.store(a(1), 1, Outcome::Delivered, 1);
        p.agree();
        assert_eq!(p.new.counts().0, 2);
        p.store(a(1), u64::MAX, Outcome::Delivered, 2);
        p.release(2);
        p.agree();
    }
}

/// What the tests share: the structure this replaced (the oracle), logs, a generator.
#[cfg(test)]
mod tests_support {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    pub(super) fn a(x: u8) -> NodeAddr {
        NodeAddr::from(Ipv4Addr::new(10, 0, 0, x))
    }

    /// The structure this replaced, kept as the oracle: one hash map entry, one order
    /// entry and one released entry per id.
    pub(super) struct Model {
        pub(super) map: HashMap<(NodeAddr, u64), (Outcome, u64)>,
        order: VecDeque<((NodeAddr, u64), u64)>,
        released: VecDeque<((NodeAddr, u64), u64, u64)>,
        window: usize,
    }

    impl Model {
        pub(super) fn new(window: usize) -> Model {
            Model {
                map: HashMap::new(),
                order: VecDeque::new(),
                released: VecDeque::new(),
                window,
            }
        }

        pub(super) fn stored(&mut self, s: NodeAddr, id: u64, o: Outcome, seq: u64, bc: bool) {
            let key = (s, id);
            let entry = match self.map.entry(key) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((o, seq));
                    true
                }
                std::collections::hash_map::Entry::Occupied(mut e) if bc && e.get().1 < seq => {
                    e.get_mut().1 = seq;
                    true
                }
                std::collections::hash_map::Entry::Occupied(_) => false,
            };
            if entry {
                self.order.push_back((key, seq));
                while self.order.len() > self.window {
                    if let Some((old, seq)) = self.order.pop_front() {
                        self.forget(old, seq);
                    }
                }
            }
        }

        fn forget(&mut self, key: (NodeAddr, u64), seq: u64) {
            if self.map.get(&key).is_some_and(|&(_, s)| s == seq) {
                self.map.remove(&key);
            }
        }

        pub(super) fn released(&mut self, key: (NodeAddr, u64), seq: u64, at: u64) {
            self.released.push_back((key, seq, at));
        }

        pub(super) fn expire(&mut self, now: u64, hold: u64) {
            while let Some(&(key, seq, at)) = self.released.front() {
                if now.saturating_sub(at) < hold && self.released.len() <= self.window {
                    break;
                }
                self.released.pop_front();
                self.forget(key, seq);
            }
        }
    }

    /// xorshift64*: deterministic, no crate.
    pub(super) struct Rng(pub(super) u64);

    impl Rng {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A packet record: (seq, (sender, id, outcome, broadcast copy)).
    pub(super) type Rec = (u64, (NodeAddr, u64, Outcome, bool));

    /// `n` packet records stored as `pattern` says, with ACK records between SENDs.
    pub(super) fn make_log(n: usize, pattern: &str) -> Vec<Rec> {
        let mut log = Vec::with_capacity(n);
        let mut seq = 1u64;
        let mut r = Rng(0x1234_5678_9abc_def1);
        let base = 1_764_000_000_000_000u64;
        let d = Outcome::Delivered;
        let mut i = 0u64;
        while log.len() < n {
            match pattern {
                // One sender, SENDs of 512 consecutive ids, an ACK record after each.
                "batches" => {
                    for _ in 0..512 {
                        log.push((seq, (a(1), base + i, d, false)));
                        seq += 1;
                        i += 1;
                    }
                    seq += 1;
                }
                // Four senders, one packet per SEND, in turn, an ACK record between.
                "interleaved" => {
                    log.push((seq, (a(1 + (i % 4) as u8), base + i / 4, d, false)));
                    seq += 2;
                    i += 1;
                }
                "random" => {
                    log.push((seq, (a(1), r.next(), d, false)));
                    seq += 2;
                }
                // Every packet from a sender of its own.
                "senders" => {
                    let mut addr = [0u8; 16];
                    addr[..8].copy_from_slice(&i.to_be_bytes());
                    log.push((seq, (NodeAddr(addr), 1, d, false)));
                    seq += 2;
                    i += 1;
                }
                // Two senders in turn, broadcasts of three copies.
                _ => {
                    for _ in 0..3 {
                        log.push((seq, (a(1 + (i % 2) as u8), base + i / 2, d, true)));
                        seq += 1;
                    }
                    seq += 1;
                    i += 1;
                }
            }
        }
        log.truncate(n);
        log
    }

    /// Feeds a log to `f(sender, id, outcome, seq, broadcast)`.
    pub(super) fn feed(log: &[Rec], mut f: impl FnMut(NodeAddr, u64, Outcome, u64, bool)) {
        for &(seq, (s, id, o, bc)) in log {
            f(s, id, o, seq, bc);
        }
    }
}

/// Counts the bytes each thread holds, so a test can weigh a structure it built.
#[cfg(test)]
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
    }

    fn add(n: isize) {
        let _ = HELD.try_with(|c| c.set(c.get() + n));
    }

    /// The system allocator, counting.
    pub(super) struct Counting;

    // SAFETY: every call is passed on to `System` unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            // SAFETY: the caller's contract is System's.
            unsafe { System.alloc(l) }
        }

        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            add(l.size() as isize);
            // SAFETY: as above.
            unsafe { System.alloc_zeroed(l) }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            add(-(l.size() as isize));
            // SAFETY: as above.
            unsafe { System.dealloc(p, l) }
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            add(new as isize - l.size() as isize);
            // SAFETY: as above.
            unsafe { System.realloc(p, l, new) }
        }
    }

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Bytes this thread allocated and has not freed.
    pub(super) fn held() -> isize {
        HELD.with(Cell::get)
    }
}

#[cfg(test)]
mod weight {
    use super::tests_support::*;
    use super::*;

    /// Bytes per id the runs and the structure they replaced hold, for a log of `n` ids
    /// at a window of `n`, the first `released` of them released and held.
    fn weigh(n: usize, released: usize, pattern: &str) -> (f64, f64, (usize, usize, usize, u64)) {
        let log = make_log(n, pattern);
        let before = counting::held();
        let mut new = DedupIndex::new(n);
        feed(&log, |s, id, o, seq, bc| new.note_stored(s, id, o, seq, bc));
        for &(seq, _) in log.iter().take(released) {
            new.note_released(seq, 0);
        }
        new.expire(0, u64::MAX);
        let new_bytes = counting::held() - before;
        let counts = new.counts();
        drop(new);
        let before = counting::held();
        let mut old = Model::new(n);
        feed(&log, |s, id, o, seq, bc| old.stored(s, id, o, seq, bc));
        for &(seq, (s, id, _, _)) in log.iter().take(released) {
            old.released((s, id), seq, 0);
        }
        old.expire(0, u64::MAX);
        let old_bytes = counting::held() - before;
        drop(old);
        (
            new_bytes as f64 / n as f64,
            old_bytes as f64 / n as f64,
            counts,
        )
    }

    /// The bytes per id the module documentation states: a fraction of a byte for SENDs
    /// of consecutive ids, and at most [`WORST_BYTES_PER_ID`] when every id is its own
    /// run, at a window of 2^18 (a hash map at its emptiest) and of 200,000 (fuller).
    #[test]
    fn dedup_bytes_per_id() {
        for n in [1 << 18, 200_000] {
            for released in [0, n / 2] {
                for pattern in ["batches", "interleaved", "random", "senders", "broadcast"] {
                    let (new, old, counts) = weigh(n, released, pattern);
                    println!(
                        "{n} ids, {released} held, {pattern}: {new:.1} bytes per id \
                         (the hash map: {old:.1}), runs {counts:?}"
                    );
                    assert!(
                        new <= WORST_BYTES_PER_ID,
                        "{pattern}: {new:.1} bytes per id"
                    );
                    if pattern == "batches" {
                        assert!(new < 1.0, "batches: {new:.1} bytes per id");
                    }
                }
            }
        }
    }
}
