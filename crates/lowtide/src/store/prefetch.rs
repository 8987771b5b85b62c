//! Prefetch: restoring a model's tensors into RAM in the background, so that the next model
//! arrives while the current one computes.
//!
//! A prefetch only uses room the governor has free: it never evicts anything, so it cannot
//! push out the weights of the model in use. It stops early when the budget or the reserve
//! leaves no room, and when cancelled. While it reads a tensor it pins it, like any guard:
//! wait for a prefetch (or cancel it) before replacing or reverting that model's tensors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::error::MemoryError;
use super::evict::Room;
use super::{ModelId, Store, StoreError, TensorId};
use crate::sys::fork::Owner;

/// What a prefetch restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefetchOutcome {
    /// Tensors that now have a RAM copy thanks to it.
    pub tensors: u32,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes left out for lack of room (the budget or the reserve).
    pub skipped_bytes: u64,
    /// Whether it was cancelled before the end.
    pub cancelled: bool,
}

/// A prefetch running in the background. Dropping it cancels what has not started yet; what
/// was restored stays (unpinned, evictable like any RAM copy).
#[derive(Debug)]
pub struct Prefetch {
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<PrefetchOutcome, StoreError>>>,
    /// The process whose thread runs it: a forked child has no such thread to wait for.
    owner: Owner,
}

/// Cancels a prefetch from any thread, also while another thread waits for it
/// ([`Prefetch::canceller`]).
#[derive(Debug, Clone)]
pub struct PrefetchCancel(Arc<AtomicBool>);

impl PrefetchCancel {
    /// Asks the prefetch to stop after the tensor it is restoring.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Prefetch {
    /// A handle that cancels this prefetch, usable while [`Prefetch::wait`] runs elsewhere.
    pub fn canceller(&self) -> PrefetchCancel {
        PrefetchCancel(Arc::clone(&self.cancel))
    }

    /// Waits for it to finish. In a child forked from the process that started it, fails
    /// with [`StoreError::Forked`] (its thread is not in the child).
    pub fn wait(mut self) -> Result<PrefetchOutcome, StoreError> {
        if !self.owner.is_current() {
            return Err(StoreError::Forked {
                owner_pid: self.owner.pid(),
                pid: crate::sys::fork::pid(),
            });
        }
        let thread = self.thread.take().expect("joined only here");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Whether it has finished.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks it to stop after the tensor it is restoring.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.cancel();
        if !self.owner.is_current() {
            // The thread is the parent's: its handle in the child leads nowhere.
            std::mem::forget(self.thread.take());
        }
    }
}

impl Store {
    /// Restores `model`'s tensors into RAM in the background, in name order, within the room
    /// the governor has free. Tensors that already have a RAM or device copy are skipped.
    pub fn prefetch(&self, model: ModelId) -> Result<Prefetch, StoreError> {
        self.prefetch_tensors(self.tensors(model)?)
    }

    /// Restores the given tensors into RAM in the background (see [`Store::prefetch`]).
    pub fn prefetch_tensors(&self, ids: Vec<TensorId>) -> Result<Prefetch, StoreError> {
        self.shared.not_forked()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (store, stop) = (self.clone(), Arc::clone(&cancel));
        let thread = std::thread::Builder::new()
            .name("lowtide-prefetch".into())
            .spawn(move || store.prefetch_now(&ids, &stop))
            .map_err(|source| StoreError::Thread { source })?;
        Ok(Prefetch {
            cancel,
            thread: Some(thread),
            owner: Owner::current(),
        })
    }

    fn prefetch_now(
        &self,
        ids: &[TensorId],
        cancel: &AtomicBool,
    ) -> Result<PrefetchOutcome, StoreError> {
        let mut outcome = PrefetchOutcome::default();
        // Tensors with a copy already, or closed meanwhile, are left out; the others are read
        // as one stream, each within the room free now.
        let wanted: Vec<(TensorId, u64)> = {
            let state = self.shared.lock();
            ids.iter()
                .filter_map(|&id| {
                    let entry = state.tensor(id).ok()?;
                    let has_copy = entry.ram.is_some() || entry.device.is_some();
                    (!has_copy).then_some((id, entry.len))
                })
                .collect()
        };
        let mut stream =
            self.stream_with(wanted.iter().map(|&(id, _)| id).collect(), Room::NoEviction);
        for &(_, len) in &wanted {
            if cancel.load(Ordering::Relaxed) {
                outcome.cancelled = true;
                break;
            }
            match stream.next() {
                None => break,
                Some(Ok(guard)) => {
                    drop(guard);
                    outcome.tensors += 1;
                    outcome.bytes += len;
                }
                Some(Err(StoreError::Memory(
                    MemoryError::OverBudget { .. } | MemoryError::UnderReserve { .. },
                ))) => {
                    outcome.skipped_bytes += len;
                }
                // Closed meanwhile: simply not prefetched.
                Some(Err(StoreError::Handle(_))) => {}
                Some(Err(err)) => return Err(err),
            }
        }
        Ok(outcome)
    }
}
