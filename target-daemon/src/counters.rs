//! The counters and latency histograms the hot paths bump as they go (per LUN and kind of
//! command, the write cache's commits): plain atomics with fixed buckets, so a command
//! pays a few relaxed adds and no allocation or lock. They depend on nothing else in the
//! daemon, so the layers that keep them (`scsi`, `media`) need not import the metrics
//! endpoint ([`crate::metrics`]), which reads them, with everything else, at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ftss_proto::cdb::op;

/// Upper bounds of the latency buckets, in seconds: 50 us (a cached write) to 10 s (a
/// command stuck behind a failing disk); everything slower lands in +Inf.
pub const LATENCY_BOUNDS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// The same bounds in nanoseconds, for the comparison on the hot path.
const LATENCY_BOUNDS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram with the fixed buckets of [`LATENCY_BOUNDS_S`], lock-free: each
/// observation adds to one bucket and to the sum. A scrape derives the count from the
/// buckets, so `_count` always equals the `+Inf` bucket, even mid-update.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    /// Sum of all observations in nanoseconds (584 years before it wraps).
    sum_ns: AtomicU64,
}

/// A histogram read at one moment, in the form `prometheus-client`'s encoder takes.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations in seconds.
    pub sum_s: f64,
    /// Number of observations.
    pub count: u64,
    /// (upper bound in seconds, observations in this bucket alone): the encoder makes
    /// them cumulative. The last, +Inf, has the bound `f64::MAX` as the encoder wants.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The figures now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0u64;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            acc += n;
            // The encoder writes the last bucket as `+Inf` when its bound is f64::MAX.
            let bound = LATENCY_BOUNDS_S.get(i).copied().unwrap_or(f64::MAX);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: acc,
            buckets,
        }
    }
}

/// What kind of work a SCSI command is, for the per-LUN metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// READ (6/10/12/16).
    Read,
    /// WRITE, WRITE AND VERIFY, WRITE SAME, ORWRITE, WRITE ATOMIC.
    Write,
    /// SYNCHRONIZE CACHE (10/16).
    Flush,
    /// UNMAP.
    Unmap,
    /// COMPARE AND WRITE.
    CompareAndWrite,
    /// Everything else a LUN executes (INQUIRY, MODE SENSE, TEST UNIT READY, ...).
    Other,
}

impl OpKind {
    /// Every kind, in label order.
    pub const ALL: [OpKind; 6] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Unmap,
        OpKind::CompareAndWrite,
        OpKind::Other,
    ];

    /// The kind of the command whose CDB starts with `opcode`.
    pub const fn of(opcode: u8) -> OpKind {
        match opcode {
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => OpKind::Read,
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_VERIFY_10
            | op::WRITE_VERIFY_12
            | op::WRITE_VERIFY_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::ORWRITE_16
            | op::WRITE_ATOMIC_16 => OpKind::Write,
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => OpKind::Flush,
            op::UNMAP => OpKind::Unmap,
            op::COMPARE_AND_WRITE => OpKind::CompareAndWrite,
            _ => OpKind::Other,
        }
    }

    /// The `kind` label value.
    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Unmap => "unmap",
            OpKind::CompareAndWrite => "compare_and_write",
            OpKind::Other => "other",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Operations, bytes and latency of one kind of command on one LUN.
#[derive(Debug, Default)]
struct KindMetrics {
    ops: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// Per-LUN command counters, kept in the LUN and bumped when a command's response is
/// sent; and how commands tried on the connection's async worker fared.
#[derive(Debug, Default)]
pub struct LunMetrics {
    kinds: [KindMetrics; OpKind::ALL.len()],
    /// Commands of each kind that completed on the async worker.
    inline_served: [AtomicU64; OpKind::ALL.len()],
    /// Commands of each kind that would have waited there and ran again on a blocking
    /// thread.
    inline_refused: [AtomicU64; OpKind::ALL.len()],
}

impl LunMetrics {
    /// One command of `kind` completed after `latency`, moving `bytes` of data.
    pub fn record(&self, kind: OpKind, bytes: u64, latency: Duration) {
        let k = &self.kinds[kind.index()];
        k.ops.fetch_add(1, Ordering::Relaxed);
        k.bytes.fetch_add(bytes, Ordering::Relaxed);
        k.latency.observe(latency);
    }

    /// Commands of `kind` completed so far.
    pub fn ops(&self, kind: OpKind) -> u64 {
        self.kinds[kind.index()].ops.load(Ordering::Relaxed)
    }

    /// Data bytes moved by commands of `kind` so far.
    pub fn bytes(&self, kind: OpKind) -> u64 {
        self.kinds[kind.index()].bytes.load(Ordering::Relaxed)
    }

    /// Latency histogram of `kind`.
    pub fn latency(&self, kind: OpKind) -> &Histogram {
        &self.kinds[kind.index()].latency
    }

    /// One command of `kind` tried on the async worker: `served` there, or refused.
    pub fn record_inline(&self, kind: OpKind, served: bool) {
        let c = if served {
            &self.inline_served
        } else {
            &self.inline_refused
        };
        c[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Commands of `kind` served on the async worker so far.
    pub fn inline_served(&self, kind: OpKind) -> u64 {
        self.inline_served[kind.index()].load(Ordering::Relaxed)
    }

    /// Commands of `kind` refused on the async worker (run again blocking) so far.
    pub fn inline_refused(&self, kind: OpKind) -> u64 {
        self.inline_refused[kind.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_count_is_the_sum_of_its_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS_S.len() + 1);
        assert_eq!(s.buckets[0], (0.000_05, 2), "50 us is inside its bound");
        assert_eq!(s.buckets.last(), Some(&(f64::MAX, 1)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), s.count);
        let at_5ms = s.buckets.iter().find(|b| b.0 == 0.005).map(|b| b.1);
        assert_eq!(at_5ms, Some(1));
        assert!((s.sum_s - 60.003_06).abs() < 1e-9, "{}", s.sum_s);
    }

    #[test]
    fn bounds_agree() {
        for (s, ns) in LATENCY_BOUNDS_S.iter().zip(LATENCY_BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn opcodes_are_classified() {
        assert_eq!(OpKind::of(op::READ_10), OpKind::Read);
        assert_eq!(OpKind::of(op::WRITE_16), OpKind::Write);
        assert_eq!(OpKind::of(op::SYNCHRONIZE_CACHE_10), OpKind::Flush);
        assert_eq!(OpKind::of(op::UNMAP), OpKind::Unmap);
        assert_eq!(OpKind::of(op::COMPARE_AND_WRITE), OpKind::CompareAndWrite);
        assert_eq!(OpKind::of(op::INQUIRY), OpKind::Other);
        for (i, k) in OpKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
