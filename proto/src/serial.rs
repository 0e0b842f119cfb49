//! Sequence-number newtypes compared in RFC 1982 serial arithmetic (SERIAL_BITS = 32).
//!
//! iSCSI's CmdSN, StatSN, DataSN, R2TSN and ExpCmdSN/MaxCmdSN all wrap at 2^32, so a plain
//! `<` is wrong near the wrap. Each newtype carries its own comparisons so a CmdSN can never
//! be compared with a StatSN by accident.

use core::cmp::Ordering;

/// RFC 1982 comparison of two 32-bit serial numbers. `None` when they are exactly 2^31
/// apart, where the RFC leaves the order undefined.
#[must_use]
pub fn serial_cmp(a: u32, b: u32) -> Option<Ordering> {
    if a == b {
        return Some(Ordering::Equal);
    }
    let d = b.wrapping_sub(a);
    match d.cmp(&0x8000_0000) {
        Ordering::Less => Some(Ordering::Less),
        Ordering::Greater => Some(Ordering::Greater),
        Ordering::Equal => None,
    }
}

macro_rules! serial_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name(pub u32);

        impl $name {
            /// The next number, wrapping at 2^32.
            #[must_use]
            pub const fn next(self) -> Self {
                Self(self.0.wrapping_add(1))
            }
            /// `self + n`, wrapping at 2^32.
            #[must_use]
            pub const fn add(self, n: u32) -> Self {
                Self(self.0.wrapping_add(n))
            }
            /// Distance from `earlier` to `self`, wrapping.
            #[must_use]
            pub const fn since(self, earlier: Self) -> u32 {
                self.0.wrapping_sub(earlier.0)
            }
            /// RFC 1982 `self < other`.
            #[must_use]
            pub fn lt(self, other: Self) -> bool {
                serial_cmp(self.0, other.0) == Some(Ordering::Less)
            }
            /// RFC 1982 `self <= other`.
            #[must_use]
            pub fn le(self, other: Self) -> bool {
                matches!(serial_cmp(self.0, other.0), Some(Ordering::Less | Ordering::Equal))
            }
            /// RFC 1982 `self > other`.
            #[must_use]
            pub fn gt(self, other: Self) -> bool {
                serial_cmp(self.0, other.0) == Some(Ordering::Greater)
            }
            /// RFC 1982 `self >= other`.
            #[must_use]
            pub fn ge(self, other: Self) -> bool {
                matches!(serial_cmp(self.0, other.0), Some(Ordering::Greater | Ordering::Equal))
            }
            /// True when `lo <= self <= hi` in serial arithmetic.
            #[must_use]
            pub fn in_window(self, lo: Self, hi: Self) -> bool {
                lo.le(self) && self.le(hi)
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

serial_newtype!(
    /// Command sequence number (RFC 7143 section 4.2.2.1).
    CmdSn
);
serial_newtype!(
    /// Status sequence number of one connection.
    StatSn
);
serial_newtype!(
    /// Data-In / Data-Out / R2T sequence number within one task.
    DataSn
);
serial_newtype!(
    /// R2T sequence number within one task.
    R2tSn
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        let a = CmdSn(u32::MAX);
        assert!(a.lt(a.next()));
        assert!(a.next().gt(a));
        assert_eq!(a.next(), CmdSn(0));
        assert!(CmdSn(5).in_window(CmdSn(u32::MAX - 3), CmdSn(10)));
        assert!(!CmdSn(11).in_window(CmdSn(u32::MAX - 3), CmdSn(10)));
        assert_eq!(serial_cmp(0, 0x8000_0000), None);
        assert_eq!(CmdSn(3).since(CmdSn(u32::MAX)), 4);
    }
}
