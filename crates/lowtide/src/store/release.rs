//! Giving dropped RAM copies back to the system on a background thread.
//!
//! Unmapping a large copy costs the kernel time per page freed (a few milliseconds per GiB
//! with huge pages, about a hundred without). When a caller drops copies on purpose —
//! releasing a model, spilling a tensor — it should not wait for that: the buffers go to a
//! releaser thread, and the bytes stay counted as *pending* until it has freed them. Nothing
//! is hidden from the governor: pending bytes count against the budget, and every path that
//! needs the memory really back (room within the budget, the reserve, pressure) waits for the
//! releaser first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::ram::RamBuf;
use crate::sys::fork::Owner;

/// Copies smaller than this are freed at once: cheap, and not worth a thread's wake-up.
const BACKGROUND_MIN: u64 = 1 << 20;

#[derive(Default)]
struct Queue {
    bufs: Vec<Arc<RamBuf>>,
    stop: bool,
}

#[derive(Default)]
struct Inner {
    queue: Mutex<Queue>,
    /// Signalled when buffers arrive or the releaser must stop.
    work: Condvar,
    /// Signalled when the queue has been emptied and its buffers freed.
    idle: Condvar,
    /// Bytes handed over and not yet freed.
    pending: AtomicU64,
}

/// The releaser: a thread started on first use, stopped (after freeing everything it holds)
/// when the store is dropped.
///
/// A child forked from the process that made it has a copy of it but not its thread: there it
/// frees inline, waits for nothing, and its drop joins nothing.
pub(super) struct Releaser {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
    owner: Owner,
}

impl Default for Releaser {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            thread: Mutex::new(None),
            owner: Owner::current(),
        }
    }
}

impl Releaser {
    /// Bytes handed over and not yet given back to the system.
    pub(super) fn pending(&self) -> u64 {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Frees `buf` in the background (at once when small, or when no thread can be started).
    /// A buffer another holder still shares is freed when that holder lets go, as always.
    pub(super) fn release(&self, buf: Arc<RamBuf>) {
        let len = buf.len();
        if len < BACKGROUND_MIN || !self.running() {
            drop(buf);
            return;
        }
        self.inner.pending.fetch_add(len, Ordering::AcqRel);
        let mut queue = self.lock();
        queue.bufs.push(buf);
        drop(queue);
        self.inner.work.notify_one();
    }

    /// Waits until every buffer handed over so far has been freed (in a forked child: returns
    /// at once, the buffers handed over are the parent thread's).
    pub(super) fn wait(&self) {
        if !self.owner.is_current() {
            return;
        }
        let mut queue = self.lock();
        while self.pending() > 0 {
            queue = self
                .inner
                .idle
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the thread if it is not running; says whether it runs.
    fn running(&self) -> bool {
        if !self.owner.is_current() {
            return false;
        }
        let mut thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if thread.is_some() {
            return true;
        }
        let inner = Arc::clone(&self.inner);
        match std::thread::Builder::new()
            .name("lowtide-release".into())
            .spawn(move || run(&inner))
        {
            Ok(handle) => {
                *thread = Some(handle);
                true
            }
            Err(err) => {
                log::warn!("cannot start the releaser thread ({err}); freeing inline");
                false
            }
        }
    }
}

fn run(inner: &Inner) {
    let mut queue = inner.queue.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if queue.bufs.is_empty() {
            if queue.stop {
                return;
            }
            queue = inner
                .work
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        let bufs = std::mem::take(&mut queue.bufs);
        drop(queue);
        for buf in bufs {
            let len = buf.len();
            drop(buf);
            inner.pending.fetch_sub(len, Ordering::AcqRel);
        }
        queue = inner.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.bufs.is_empty() {
            inner.idle.notify_all();
        }
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        if !self.owner.is_current() {
            // A forked child: the thread (and any lock it held at the fork) is the parent's.
            // What it was to free is left to the child's exit.
            let thread = self
                .thread
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            std::mem::forget(thread);
            return;
        }
        self.lock().stop = true;
        self.inner.work.notify_one();
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // It frees what it still holds before it returns.
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser")
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Releaser;
    use crate::store::ram::RamBuf;
    use crate::sys::AlignedBuf;

    fn buf(len: usize) -> Arc<RamBuf> {
        Arc::new(RamBuf::Aligned(AlignedBuf::zeroed(len).unwrap()))
    }

    #[test]
    fn frees_in_the_background_and_waits() {
        let releaser = Releaser::default();
        for _ in 0..8 {
            releaser.release(buf(4 << 20));
        }
        releaser.release(buf(4096));
        releaser.wait();
        assert_eq!(releaser.pending(), 0);
        // A shared buffer stays alive with its other holder.
        let shared = buf(2 << 20);
        releaser.release(Arc::clone(&shared));
        releaser.wait();
        assert_eq!(shared.len(), 2 << 20);
        // Dropping the releaser frees what it still holds.
        releaser.release(buf(8 << 20));
        drop(releaser);
    }
}
