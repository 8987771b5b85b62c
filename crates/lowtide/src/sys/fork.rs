//! Processes made by `fork`: what a child inherits must not be used by parent and child both.
//!
//! A forked child gets a copy of its parent's memory and file descriptors, but none of its
//! other threads. What lowtide shares with the kernel belongs to the process that made it:
//! io_uring rings (their queues are memory shared by the kernel and every process holding the
//! ring, so a child's requests would steal the parent's completions), the spill file (a hole
//! the child punches is gone for the parent), and the store's threads (absent in the child:
//! joining or waiting for them never returns). [`Owner`] records that process, and the code
//! that holds such a resource compares it with the process running now ([`pid`]).
//!
//! `getpid` is a system call (0.19 µs measured here), too slow for the paths that take and
//! drop guards: the pid is cached, and refreshed in every child by a `pthread_atfork` handler,
//! which `fork(3)` runs — Python's `os.fork`, `multiprocessing` and PyTorch's `DataLoader`
//! workers all fork through it. A child made with the raw `clone` system call is not seen.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// This process's id once the fork handler is registered; 0 before that (or if the
/// registration failed: then [`pid`] asks the kernel every time).
static PID: AtomicU32 = AtomicU32::new(0);

/// Set by the one caller that registers the fork handler.
static REGISTERING: AtomicBool = AtomicBool::new(false);

/// The id of the process running now (cheap: a cached value after the first call).
pub(crate) fn pid() -> u32 {
    let cached = PID.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    let pid = std::process::id();
    // Only the registering thread fills the cache, after the handler is in place: a fork
    // before that leaves the child's cache empty, and it asks the kernel. No thread waits
    // for another here (a child must never wait for a thread it does not have).
    if !REGISTERING.swap(true, Ordering::AcqRel) {
        // SAFETY: `refresh` only calls `getpid` and stores an atomic, both async-signal-safe:
        // all a handler may do in the child of a multi-threaded process. It never unwinds.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(refresh)) };
        if rc == 0 {
            PID.store(pid, Ordering::Release);
        } else {
            log::debug!("pthread_atfork failed ({rc}); the pid is read at every check");
        }
    }
    pid
}

/// Runs in the child right after every `fork(3)`.
extern "C" fn refresh() {
    PID.store(std::process::id(), Ordering::Release);
}

/// The process that made something that must not be used by another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner(u32);

impl Owner {
    /// The process running now.
    pub(crate) fn current() -> Self {
        Self(pid())
    }

    /// Its process id.
    pub(crate) fn pid(self) -> u32 {
        self.0
    }

    /// Whether the process running now is this one (and not a child forked from it).
    pub(crate) fn is_current(self) -> bool {
        self.0 == pid()
    }
}

#[cfg(test)]
mod tests {
    use super::{Owner, pid};

    #[test]
    fn the_cached_pid_is_this_process() {
        assert_eq!(pid(), std::process::id());
        assert_eq!(pid(), std::process::id());
        let owner = Owner::current();
        assert!(owner.is_current());
        assert_eq!(owner.pid(), std::process::id());
    }
}
