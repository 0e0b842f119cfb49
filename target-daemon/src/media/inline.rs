//! Running a command on the connection's async worker instead of a blocking thread, for
//! as long as it can finish without waiting: inside a [`run_inline`] scope, every place
//! in the media layer that would wait (an append that needs ring space, a mirror read
//! whose data is not in memory) calls [`refuse`] and gives up without an effect, and the
//! whole command then runs again on a blocking thread, where it may wait.
//!
//! A thread-local rather than a parameter: the scope has to reach through the SCSI
//! command, the [`BlockStore`](super::BlockStore) and the write cache down to the mirror
//! files, and only the outermost caller (the connection) and the innermost waiters care.
//! Both the write cache and the mirror set use it, so it lives beside them, not in either.

use std::cell::Cell;

thread_local! {
    /// Set by [`run_inline`]: `Some(false)` while a command runs on an async worker,
    /// `Some(true)` once something in it would have waited and gave up instead.
    static NO_WAIT: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Runs `f` (one command) on the calling async worker: whatever would have to wait fails
/// instead, and then `None` says to discard the outcome and run the command again on a
/// blocking thread. Only for commands that have no effect before the point that may
/// refuse (a write's single append is its first and only effect; a read has none), so a
/// refused one has changed nothing. A write that fits is a copy into the map, a read a
/// copy out of the ring or the page cache; running them in place saves the thread handoff
/// that otherwise dominates their cost.
pub fn run_inline<R>(f: impl FnOnce() -> R) -> Option<R> {
    struct Scope(Option<bool>);
    impl Drop for Scope {
        fn drop(&mut self) {
            NO_WAIT.with(|n| n.set(self.0));
        }
    }
    let _scope = Scope(NO_WAIT.with(|n| n.replace(Some(false))));
    let r = f();
    match NO_WAIT.with(Cell::get) {
        Some(true) => None,
        _ => Some(r),
    }
}

/// In a [`run_inline`] scope: notes that the command would have blocked, so its outcome
/// is discarded and it runs again on a blocking thread; the caller then gives up at once,
/// changing nothing. `false` outside a scope, where the caller waits as usual.
pub fn refuse() -> bool {
    NO_WAIT.with(|n| match n.get() {
        Some(_) => {
            n.set(Some(true));
            true
        }
        None => false,
    })
}

/// Whether the calling thread runs a command in a [`run_inline`] scope, so reads must not
/// wait for the device. Marks nothing: see [`refuse`].
pub fn active() -> bool {
    NO_WAIT.with(Cell::get).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_discards_the_outcome_and_ends_with_its_scope() {
        assert!(!active());
        assert!(!refuse(), "nothing to refuse outside a scope");
        assert_eq!(run_inline(|| (active(), 7)), Some((true, 7)));
        assert_eq!(run_inline(refuse), None);
        assert!(!active(), "the scope ends with run_inline");
        assert_eq!(run_inline(|| 8), Some(8), "a later scope starts clean");
        // A scope inside a scope: the inner refusal is the inner scope's alone.
        let outer = run_inline(|| {
            let inner = run_inline(refuse);
            (inner, active())
        });
        assert_eq!(outer, Some((None, true)));
    }
}
