//! The block index: where in the ring the newest cached copy of each block is, kept as
//! extents. A record's blocks lie back to back in its payload, so one entry stands for
//! all of a write's blocks (256 for a 128 KiB write of 512-byte blocks) until a newer
//! record covers some of them and splits it. Its memory follows the records waiting for
//! destage, not their blocks: with an entry per block, a quarter of the 256 MiB ring
//! waiting took 25 MiB more (docs/bench/diary.md).

use std::collections::BTreeMap;
use std::ops::Range;

/// Blocks `start..end` (the key holds the volume and `start`) whose copies lie back to
/// back from log position `pos`, all in one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    end: u64,
    pos: u64,
}

/// The index: non-overlapping extents keyed by (volume, first block). Log positions are
/// never reused within a run, so an extent's position also says which record it belongs
/// to (that record's `pos..end`): destage releases a record's extents by position.
#[derive(Default)]
pub(super) struct BlockIndex {
    map: BTreeMap<(u32, u64), Extent>,
}

impl BlockIndex {
    /// Number of extents (each one entry of memory).
    #[cfg(test)]
    fn extents(&self) -> usize {
        self.map.len()
    }

    /// Blocks `lba..lba + n` of `volume` now have their newest copies back to back from
    /// log position `pos`, `bs` bytes each; older entries for them go.
    pub(super) fn insert(&mut self, volume: u32, lba: u64, n: u64, pos: u64, bs: u64) {
        if n == 0 {
            return;
        }
        self.remove(volume, lba, n, bs);
        let end = lba.saturating_add(n);
        self.map.insert((volume, lba), Extent { end, pos });
    }

    /// Drops the entries of blocks `lba..lba + n` of `volume` (a discard supersedes
    /// them, or a newer write): extents partly inside keep the parts outside.
    pub(super) fn remove(&mut self, volume: u32, lba: u64, n: u64, bs: u64) {
        let end = lba.saturating_add(n);
        if end == lba {
            return;
        }
        // The extent that starts before the range and reaches into it: keep its head,
        // and its tail if it reaches past the range.
        if let Some((&(v, s), &e)) = self.map.range(..(volume, lba)).next_back() {
            if v == volume && e.end > lba {
                self.map.insert(
                    (v, s),
                    Extent {
                        end: lba,
                        pos: e.pos,
                    },
                );
                if e.end > end {
                    let tail = Extent {
                        end: e.end,
                        pos: e.pos + (end - s) * bs,
                    };
                    self.map.insert((v, end), tail);
                }
            }
        }
        // Extents that start inside: gone, but for a tail past the range (keyed at
        // `end`, so this loop does not meet it again).
        while let Some((&(v, s), &e)) = self.map.range((volume, lba)..(volume, end)).next() {
            self.map.remove(&(v, s));
            if e.end > end {
                let tail = Extent {
                    end: e.end,
                    pos: e.pos + (end - s) * bs,
                };
                self.map.insert((v, end), tail);
            }
        }
    }

    /// Drops what is left of one record's entries: those of blocks `lba..lba + n` of
    /// `volume` that still point into its log span `span` (destage has put the record on
    /// the mirrors; blocks a newer record holds keep that record's entries).
    pub(super) fn release(&mut self, volume: u32, lba: u64, n: u64, span: Range<u64>) {
        let end = lba.saturating_add(n);
        let mut from = lba;
        while from < end {
            let Some((&(v, s), &e)) = self.map.range((volume, from)..(volume, end)).next() else {
                break;
            };
            // A record's extents never start before its first block, so none of them
            // lies before `lba`.
            if span.contains(&e.pos) {
                self.map.remove(&(v, s));
            }
            from = e.end.max(s + 1);
        }
    }

    /// Calls `f(first, count, pos)` for each run of cached blocks inside
    /// `lba..lba + n` of `volume`, in order: blocks `first..first + count` are in the
    /// ring back to back from `pos`.
    pub(super) fn runs(
        &self,
        volume: u32,
        lba: u64,
        n: u64,
        bs: u64,
        mut f: impl FnMut(u64, u64, u64),
    ) {
        let end = lba.saturating_add(n);
        if end == lba {
            return;
        }
        if let Some((&(v, s), &e)) = self.map.range(..(volume, lba)).next_back() {
            if v == volume && e.end > lba {
                f(lba, e.end.min(end) - lba, e.pos + (lba - s) * bs);
            }
        }
        for (&(_, s), &e) in self.map.range((volume, lba)..(volume, end)) {
            f(s, e.end.min(end) - s, e.pos);
        }
    }

    /// Panics unless the extents are non-empty and do not overlap (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut last: Option<(u32, u64)> = None;
        for (&(v, s), e) in &self.map {
            assert!(e.end > s, "empty extent at {v}:{s}");
            if let Some((lv, lend)) = last {
                assert!(lv != v || lend <= s, "extents overlap at {v}:{s}");
            }
            last = Some((v, e.end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const BS: u64 = 512;
    const BLOCKS: u64 = 96;

    #[derive(Clone, Debug)]
    enum Step {
        /// A record of `n` blocks from `lba`.
        Write {
            volume: u32,
            lba: u64,
            n: u64,
        },
        Discard {
            volume: u32,
            lba: u64,
            n: u64,
        },
        /// Destage of the k-th record written so far (modulo their number).
        Release {
            k: usize,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..2u32, 0..BLOCKS, 1..20u64).prop_map(|(volume, lba, n)| Step::Write { volume, lba, n }),
            1 => (0..2u32, 0..BLOCKS, 1..40u64).prop_map(|(volume, lba, n)| Step::Discard { volume, lba, n }),
            2 => any::<usize>().prop_map(|k| Step::Release { k }),
        ]
    }

    /// The index against the map it replaced, one entry per block, after every step.
    fn run(steps: &[Step]) {
        let mut index = BlockIndex::default();
        let mut model: HashMap<(u32, u64), u64> = HashMap::new();
        // Records as the ring has them: (volume, lba, blocks, log span); positions grow
        // and are never reused, with a 48-byte header before each payload.
        let mut records: Vec<(u32, u64, u64, Range<u64>)> = Vec::new();
        let mut head = 0u64;
        for s in steps {
            match *s {
                Step::Write { volume, lba, n } => {
                    let pos = head + 48;
                    head = pos + n * BS;
                    index.insert(volume, lba, n, pos, BS);
                    for k in 0..n {
                        model.insert((volume, lba + k), pos + k * BS);
                    }
                    records.push((volume, lba, n, head - n * BS - 48..head));
                }
                Step::Discard { volume, lba, n } => {
                    index.remove(volume, lba, n, BS);
                    for b in lba..lba + n {
                        model.remove(&(volume, b));
                    }
                }
                Step::Release { k } => {
                    if records.is_empty() {
                        continue;
                    }
                    let (volume, lba, n, span) = records[k % records.len()].clone();
                    index.release(volume, lba, n, span.clone());
                    for b in lba..lba + n {
                        if model.get(&(volume, b)).is_some_and(|p| span.contains(p)) {
                            model.remove(&(volume, b));
                        }
                    }
                }
            }
            index.check();
            for volume in 0..2 {
                let mut got = vec![None; (BLOCKS + 60) as usize];
                index.runs(volume, 0, BLOCKS + 60, BS, |first, count, pos| {
                    for k in 0..count {
                        got[(first + k) as usize] = Some(pos + k * BS);
                    }
                });
                for b in 0..BLOCKS + 60 {
                    assert_eq!(
                        got[b as usize],
                        model.get(&(volume, b)).copied(),
                        "{volume}:{b} after {s:?}"
                    );
                }
                // A window that starts and ends inside extents sees the same.
                let (lo, n) = (BLOCKS / 3, BLOCKS / 4);
                index.runs(volume, lo, n, BS, |first, count, pos| {
                    assert!(first >= lo && first + count <= lo + n);
                    for k in 0..count {
                        assert_eq!(Some(pos + k * BS), model.get(&(volume, first + k)).copied());
                    }
                });
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn the_extents_answer_as_the_map_of_blocks_did(steps in proptest::collection::vec(step(), 1..60)) {
            run(&steps);
        }
    }

    #[test]
    fn a_write_inside_an_extent_splits_it_in_three() {
        let mut index = BlockIndex::default();
        index.insert(0, 10, 10, 1000, BS);
        index.insert(0, 13, 2, 9000, BS);
        let mut runs = Vec::new();
        index.runs(0, 0, 100, BS, |f, c, p| runs.push((f, c, p)));
        assert_eq!(runs, [(10, 3, 1000), (13, 2, 9000), (15, 5, 1000 + 5 * BS)]);
        assert_eq!(index.extents(), 3);
        // Destage of the first record drops both of its pieces, not the newer one.
        index.release(0, 10, 10, 952..1000 + 10 * BS);
        runs.clear();
        index.runs(0, 0, 100, BS, |f, c, p| runs.push((f, c, p)));
        assert_eq!(runs, [(13, 2, 9000)]);
    }

    #[test]
    fn volumes_do_not_touch() {
        let mut index = BlockIndex::default();
        index.insert(1, 0, 8, 100, BS);
        index.insert(0, u64::MAX - 4, 4, 200, BS);
        index.remove(0, 0, u64::MAX, BS);
        let mut runs = Vec::new();
        index.runs(1, 0, 8, BS, |f, c, p| runs.push((f, c, p)));
        assert_eq!(runs, [(0, 8, 100)]);
        assert_eq!(index.extents(), 1);
    }
}
