//! Loads of many tensors onto a device as one stream: the `O_DIRECT` reads of the next tensors
//! are in flight while the current tensor's windows are uploaded.
//!
//! A [`DeviceStream`] begins tensors ahead of the one it hands out next
//! ([`Store::begin_device`]: the device allocation made with the usual eviction rules, the
//! tensor pinned, its source chosen). A tensor whose source is a file extent wholly out of the
//! page cache ([`Source::direct_only`]) is read in host staging windows (a multiple of the
//! device's chunk) through one [`ReadQueue`], cut to the shape [`super::tune`] holds for the
//! file's device: each window is uploaded in order as its read completes, and its buffer takes
//! the next read, whichever tensor that belongs to, so the queue does not drain at tensor
//! boundaries. Everything else (cached extents, spill extents, recipes, RAM copies) is uploaded
//! as one acquire would, when it is begun.
//!
//! The staging buffers are reserved in the RAM budget, without evicting anything: at most twice
//! the shape's bytes in flight and half the budget, and only what the governor admits. Where it
//! admits less than two windows, every tensor goes the one-tensor way (whose windows
//! [`crate::scratch_bytes`] counts). Streams read with the shape a device has settled on, or
//! the one its RAM streams measure next; they do not measure shapes themselves (their rate
//! includes the uploads).

use std::collections::VecDeque;
use std::sync::Arc;

use super::copies::CopySource;
use super::device::{DeviceBegun, DevicePending};
use super::error::RestoreError;
use super::evict::Room;
use super::reread::FileRead;
use super::stream::StreamStats;
use super::tune::{LADDER, in_flight, top_within};
use super::{DeviceGuard, Store, StoreError, TensorId, unwinding};
use crate::ids::{DeviceId, ModelId};
use crate::source::Source;
use crate::stats::Stats;
use crate::sys::AlignedBuf;
use crate::sys::direct::{BLOCK, DirectBuf, ReadDone, ReadQueue, populate_write_parallel};

/// Tensors uploaded to one device as one stream; an iterator of their guards, in the order
/// asked. See [`Store::stream_device`].
pub struct DeviceStream<'a> {
    /// Declared first: dropped (waiting for every request in flight) before the buffers.
    queue: Option<ReadQueue>,
    /// Whether a queue could not be set up (no `io_uring`, no room for staging) or failed:
    /// then everything goes the one-tensor way.
    no_queue: bool,
    store: &'a Store,
    device: DeviceId,
    /// The model whose device copies are not unloaded to make room (a load's own).
    spare: Option<ModelId>,
    /// The most bytes placed on the device, tensors past it left on the host (a load's
    /// budget), and the bytes of the tensors begun onto it so far.
    device_budget: Option<u64>,
    placed: u64,
    ids: Vec<TensorId>,
    /// The next of `ids` to begin.
    next: usize,
    /// Begun tensors, in order.
    items: VecDeque<Item>,
    /// Bytes of begun tensors not yet handed out.
    ahead: u64,
    /// The most bytes begun ahead of the one handed out next (one tensor ahead always):
    /// twice the deepest shape's bytes in flight, at most half the RAM budget.
    bound: u64,
    /// The highest rung of the shape ladder the RAM budget allows.
    top: usize,
    staging: Staging,
    /// Reads the queue reported that are not yet recorded in their windows.
    reported: Vec<ReadDone>,
    tag: u64,
    stats: StreamStats,
}

/// The host buffers reads land in before their upload.
#[derive(Default)]
struct Staging {
    /// Tensor bytes per window: a multiple of the device's chunk.
    window: u64,
    /// Bytes of each buffer: a window padded to whole blocks on both ends.
    buf_len: u64,
    /// Buffers free for the next reads.
    free: Vec<AlignedBuf>,
    /// Buffers made so far, and the most that may be.
    made: usize,
    most: usize,
    /// Bytes reserved in the RAM budget for them.
    reserved: u64,
}

/// A tensor in the stream.
enum Item {
    /// Past the load's budget: not begun, left on the host.
    Host { len: u64 },
    /// Done: its guard or its own error.
    Done {
        len: u64,
        result: Result<DeviceGuard, StoreError>,
    },
    /// Read through the queue, window by window.
    Queued(Box<Upload>),
}

/// A begun tensor whose file extent is read through the queue.
struct Upload {
    pending: DevicePending,
    source: Arc<Source>,
    /// Where its bytes start in the file.
    offset: u64,
    read: FileRead,
    /// Its windows: in all, queued so far, uploaded so far.
    count: usize,
    pushed: usize,
    uploaded: usize,
    /// Windows queued and not yet uploaded or given up, in order.
    windows: VecDeque<Window>,
    /// The first failure: no more windows are queued, the rest are waited for.
    failed: Option<StoreError>,
}

/// One window's read.
struct Window {
    index: usize,
    buf: DirectBuf,
    tag: u64,
    /// Bytes the read must reach: the window's end within its blocks.
    wanted: usize,
    result: Option<std::io::Result<usize>>,
}

/// What the stream did with the next tensor (for [`Store::load`]).
pub(super) enum Placed {
    /// Past the load's budget: left on the host.
    Host { len: u64 },
    /// On the device, or its own error.
    Tensor {
        len: u64,
        result: Result<DeviceGuard, StoreError>,
    },
}

impl Upload {
    /// Whether a window is left to queue.
    fn wants_window(&self) -> bool {
        self.failed.is_none() && self.pushed < self.count
    }

    /// Whether every read is over: uploaded, or given up.
    fn over(&self) -> bool {
        self.windows.is_empty() && (self.failed.is_some() || self.uploaded == self.count)
    }

    /// Records the first failure.
    fn fail(&mut self, err: impl FnOnce(&Source) -> StoreError) {
        if self.failed.is_none() {
            self.failed = Some(err(&self.source));
        }
    }

    fn reading(&self) -> bool {
        self.windows.iter().any(|w| w.result.is_none())
    }
}

impl Store {
    /// Uploads `ids` to `device` as one stream and hands out their guards in that order:
    /// while one tensor's windows are uploaded, the `O_DIRECT` reads of the next ones are in
    /// flight (within the bytes in flight of the disk's shape and the RAM budget, see
    /// [`DeviceStream`]). Each item is what [`Store::acquire_device`] would return for that
    /// tensor; dropping the stream early waits for the reads in flight and gives back the
    /// device allocations of the tensors begun ahead.
    ///
    /// The tensors begun ahead hold their device allocations (pinned, like a guard): on a
    /// device too small for them and the guards the caller keeps, the next tensor is
    /// [`MemoryError::DeviceFull`](super::MemoryError::DeviceFull) as [`Store::acquire_device`]
    /// would be with those copies pinned.
    pub fn stream_device(&self, ids: Vec<TensorId>, device: DeviceId) -> DeviceStream<'_> {
        DeviceStream::new(self, ids, device, None, None)
    }
}

impl<'a> DeviceStream<'a> {
    /// A stream of `ids` onto `device`, sparing `spare`'s device copies, placing at most
    /// `device_budget` bytes on the device.
    pub(super) fn new(
        store: &'a Store,
        ids: Vec<TensorId>,
        device: DeviceId,
        spare: Option<ModelId>,
        device_budget: Option<u64>,
    ) -> Self {
        let budget = store.shared.governor.ram_budget;
        let top = top_within(budget / 4);
        Self {
            queue: None,
            no_queue: false,
            store,
            device,
            spare,
            device_budget,
            placed: 0,
            ids,
            next: 0,
            items: VecDeque::new(),
            ahead: 0,
            bound: (2 * in_flight(LADDER[top])).min(budget / 2),
            top,
            staging: Staging::default(),
            reported: Vec::new(),
            tag: 0,
            stats: StreamStats::default(),
        }
    }

    /// What the stream did so far (`segments_measured` stays 0: device streams do not
    /// measure shapes).
    pub fn stats(&self) -> StreamStats {
        let mut stats = self.stats;
        if let Some(queue) = &self.queue {
            stats.max_requests_in_flight = stats.max_requests_in_flight.max(queue.max_in_flight);
        }
        stats
    }

    /// The next tensor: placed on the device, failed, or left on the host.
    pub(super) fn next_placed(&mut self) -> Option<Placed> {
        loop {
            self.fill();
            if self.items.is_empty() {
                return None;
            }
            if self.head_over() {
                break;
            }
            let uploaded = self.upload_ready();
            self.record_reported();
            self.refill();
            if !uploaded && !self.head_over() {
                self.wait();
            }
        }
        let placed = match self.items.pop_front()? {
            Item::Host { len } => Placed::Host { len },
            Item::Done { len, result } => Placed::Tensor { len, result },
            Item::Queued(upload) => {
                let len = upload.pending.len;
                Placed::Tensor {
                    len,
                    result: self.deliver(*upload),
                }
            }
        };
        let len = match &placed {
            Placed::Host { len } | Placed::Tensor { len, .. } => *len,
        };
        self.ahead = self.ahead.saturating_sub(len);
        let reading = self.queue.as_ref().map_or(0, ReadQueue::in_flight);
        if reading == 0 && self.next < self.ids.len() {
            self.stats.drained_at_boundary += 1;
        }
        if self.next == self.ids.len() && !self.items.iter().any(|i| matches!(i, Item::Queued(_))) {
            // Nothing left to read: the staging goes now, not when the stream is dropped.
            self.release_staging();
        }
        Some(placed)
    }

    /// Whether the first tensor can be handed out.
    fn head_over(&self) -> bool {
        match self.items.front() {
            Some(Item::Queued(upload)) => upload.over(),
            _ => true,
        }
    }

    /// Begins tensors ahead: the first one (nothing begun) always; the next ones while the
    /// queue wants reads (no window of a begun tensor waits for a buffer) and the bound
    /// allows, one ahead whatever its size (a large tensor begun only once the one before it
    /// is handed out would start after the queue drained).
    fn fill(&mut self) {
        while self.next < self.ids.len() {
            let id = self.ids[self.next];
            let len = self.store.shared.lock().tensor(id).map_or(0, |e| e.len);
            if !self.items.is_empty() {
                let waiting = self.items.iter().any(|item| match item {
                    Item::Queued(upload) => upload.wants_window(),
                    _ => false,
                });
                if self.no_queue || waiting {
                    return;
                }
                if self.items.len() > 1 && self.ahead + len > self.bound {
                    return;
                }
            }
            self.next += 1;
            self.ahead += len;
            if self
                .device_budget
                .is_some_and(|budget| self.placed + len > budget)
            {
                self.items.push_back(Item::Host { len });
                continue;
            }
            let begun = unwinding(|| self.store.begin_device(id, self.device, self.spare))
                .unwrap_or_else(|| {
                    Err(StoreError::Restore(RestoreError::Panicked {
                        name: format!("#{}", id.0),
                    }))
                });
            let item = match begun {
                Ok(DeviceBegun::Ready(guard)) => {
                    self.placed += len;
                    self.stats.other_tensors += 1;
                    Item::Done {
                        len,
                        result: Ok(guard),
                    }
                }
                Ok(DeviceBegun::Pending(pending)) => {
                    self.placed += len;
                    self.start(pending)
                }
                Err(err) => Item::Done {
                    len,
                    result: Err(err),
                },
            };
            self.items.push_back(item);
            self.refill();
        }
    }

    /// Queues a begun tensor's reads, or uploads it now when it cannot be queued.
    fn start(&mut self, pending: DevicePending) -> Item {
        let len = pending.len;
        let (source, offset, read) = match &pending.from {
            CopySource::File(extent, again) => (
                Arc::clone(&extent.source),
                extent.offset,
                self.store.shared.file_read(*again),
            ),
            _ => return self.upload_now(pending, None),
        };
        let direct = source
            .direct_only(offset, len, read.keeps_cached())
            .is_some();
        if !direct || !self.set_up(&source, pending.device.chunk_len()) {
            return self.upload_now(pending, Some(read));
        }
        if let Err(err) = source.check_unchanged() {
            self.stats.other_tensors += 1;
            return Item::Done {
                len,
                result: self.store.finish_device(pending, Err(err.into())),
            };
        }
        self.stats.queued_tensors += 1;
        Stats::add(&self.store.shared.stats.restores_queued, 1);
        Item::Queued(Box::new(Upload {
            count: len.div_ceil(self.staging.window) as usize,
            pending,
            source,
            offset,
            read,
            pushed: 0,
            uploaded: 0,
            windows: VecDeque::new(),
            failed: None,
        }))
    }

    /// Uploads a begun tensor as one acquire would (a file extent read as `read` says).
    fn upload_now(&mut self, pending: DevicePending, read: Option<FileRead>) -> Item {
        self.stats.other_tensors += 1;
        let restored = self.store.shared.fill_device(&pending, read);
        Item::Done {
            len: pending.len,
            result: self.store.finish_device(pending, restored),
        }
    }

    /// Sets the queue and its staging up on the first tensor read through it: the shape of
    /// `source`'s device, windows of at least its chunk (a multiple of the device's
    /// `chunk_len`), and as many buffers as the RAM budget admits up to twice the shape's
    /// bytes in flight. Whether the queue is there.
    fn set_up(&mut self, source: &Source, chunk_len: usize) -> bool {
        if self.queue.is_some() {
            return true;
        }
        if self.no_queue {
            return false;
        }
        // Unless set up below.
        self.no_queue = true;
        let (rung, _) = self.store.shared.tuner.rung(source.device(), self.top);
        let shape = LADDER[rung];
        let chunk = chunk_len.max(1) as u64;
        let window = (shape.chunk as u64).max(chunk).div_ceil(chunk) * chunk;
        let buf_len = (window.div_ceil(BLOCK) + 1) * BLOCK;
        // No more windows than the tensors left could fill.
        let needed: u64 = {
            let state = self.store.shared.lock();
            self.ids[self.next.saturating_sub(1)..]
                .iter()
                .filter_map(|&id| state.tensor(id).ok())
                .map(|t| t.len.div_ceil(window))
                .sum()
        };
        let most = (2 * in_flight(shape))
            .div_ceil(window)
            .max(2)
            .min(self.store.shared.governor.ram_budget / 2 / buf_len)
            .min(needed) as usize;
        let Some(queue) = ReadQueue::new(shape, shape.depth) else {
            return false;
        };
        // Two windows at least (one read while the other uploads), unless one is all it takes.
        let least = (needed as usize).min(2);
        let Some(admitted) = self.admit_staging(most, least, buf_len) else {
            return false;
        };
        self.staging = Staging {
            window,
            buf_len,
            free: Vec::new(),
            made: 0,
            most: admitted,
            reserved: admitted as u64 * buf_len,
        };
        self.queue = Some(queue);
        self.no_queue = false;
        true
    }

    /// Reserves `most` buffers of `buf_len` bytes in the RAM budget, or fewer (halving) down
    /// to `least`, without evicting anything. The number reserved, or `None`.
    fn admit_staging(&self, most: usize, least: usize, buf_len: u64) -> Option<usize> {
        let shared = &self.store.shared;
        let mut n = most;
        while n >= least.max(1) {
            // Staging belongs to no tensor: nothing is excluded from eviction (none is done).
            let admitted = shared.admit(
                TensorId(u32::MAX),
                "device stream staging",
                n as u64 * buf_len,
                Room::NoEviction,
            );
            if let Ok(mut state) = admitted {
                shared.check(&mut state);
                return Some(n);
            }
            n /= 2;
        }
        None
    }

    /// Queues windows, in tensor order, while staging buffers are free (or may be made).
    fn refill(&mut self) {
        let Self {
            queue,
            no_queue,
            items,
            staging,
            tag,
            stats,
            ..
        } = self;
        let Some(queue) = queue.as_mut() else {
            return;
        };
        let mut broken = None;
        while let Some(upload) = items.iter_mut().find_map(|item| match item {
            Item::Queued(upload) if upload.wants_window() => Some(upload),
            _ => None,
        }) {
            let Some((buf, fresh)) = staging.take() else {
                if staging.made == 0 {
                    // The host refused the first buffer: none will come back to wait for.
                    *no_queue = true;
                    upload.fail(|source| read_failed(source, std::io::ErrorKind::OutOfMemory));
                    continue;
                }
                break;
            };
            let index = upload.pushed;
            let at = index as u64 * staging.window;
            let n = (upload.pending.len - at).min(staging.window);
            let offset = upload.offset + at;
            let (mut buf, direct) = match (
                DirectBuf::in_buf(buf, offset, n),
                upload.source.direct_file(),
            ) {
                (Ok(buf), Some(direct)) => (buf, direct),
                (buf, _) => {
                    // Cannot happen (buffers hold a window, the file was opened for
                    // `direct_only`), but an error, not a panic.
                    staging
                        .free
                        .push(buf.map_or_else(|buf| buf, DirectBuf::into_inner));
                    upload.fail(|source| read_failed(source, std::io::ErrorKind::InvalidInput));
                    continue;
                }
            };
            if fresh {
                // Faulted in now, while the reads ahead of it are in flight.
                populate_write_parallel(buf.blocks_mut());
            }
            let start = offset / BLOCK * BLOCK;
            let wanted = (offset - start) as usize + n as usize;
            let blocks = buf.blocks_mut();
            let (ptr, len) = (blocks.as_mut_ptr(), blocks.len());
            *tag += 1;
            // SAFETY: `buf` is a heap buffer moved into the window pushed below, which stays
            // in its tensor's `windows` until the queue reports its read (`upload_ready` and
            // `record_reported` take it only then) or the queue is dropped (`fail_queue` and
            // `Drop` drop the queue, waiting for every request, before the items); the direct
            // file lives in `source`, held by the same tensor.
            let pushed = unsafe { queue.push(direct, start, ptr, len, *tag) };
            upload.windows.push_back(Window {
                index,
                buf,
                tag: *tag,
                wanted,
                result: None,
            });
            upload.pushed += 1;
            if let Err(err) = pushed {
                // Some of its requests may be in the ring: the buffer stays with its window
                // until the queue is gone.
                broken = Some(err);
                break;
            }
            let reading = items
                .iter()
                .filter(|item| matches!(item, Item::Queued(u) if u.reading()))
                .count();
            stats.max_tensors_in_flight = stats.max_tensors_in_flight.max(reading);
        }
        if let Some(err) = broken {
            self.fail_queue(&err);
        }
    }

    /// Uploads the first tensor's windows whose reads are over, in order, in the device's
    /// chunks (the queue kept full between them), and frees their buffers for the next
    /// reads. Whether any window was taken.
    fn upload_ready(&mut self) -> bool {
        let Self {
            queue,
            items,
            staging,
            reported,
            ..
        } = self;
        let Some(Item::Queued(upload)) = items.front_mut() else {
            return false;
        };
        let mut taken = false;
        while upload.windows.front().is_some_and(|w| w.result.is_some()) {
            let Some(window) = upload.windows.pop_front() else {
                break;
            };
            taken = true;
            // A failed or short read failed the tensor when it was recorded.
            if upload.failed.is_none() {
                let uploaded = upload_window(upload, &window, staging.window, queue, reported);
                if let Err(err) = uploaded {
                    upload.fail(|_| err);
                } else {
                    upload.uploaded += 1;
                }
            }
            staging.free.push(window.buf.into_inner());
        }
        taken
    }

    /// Waits for a read to complete, and records it.
    fn wait(&mut self) {
        let Some(queue) = &mut self.queue else {
            return;
        };
        match queue.wait() {
            Ok(done) if done.is_empty() && queue.in_flight() == 0 => {
                // Nothing in flight although the first tensor waits for a read: never
                // expected, but an error rather than a wait for good.
                self.fail_queue(&std::io::Error::other("a queued read was lost"));
            }
            Ok(done) => self.reported.extend(done),
            Err(err) => self.fail_queue(&err),
        }
        self.record_reported();
    }

    /// Records the reads the queue reported in their windows; a failed or short read fails
    /// its tensor (no more of its windows are queued).
    fn record_reported(&mut self) {
        for done in std::mem::take(&mut self.reported) {
            for item in &mut self.items {
                let Item::Queued(upload) = item else {
                    continue;
                };
                let Some(window) = upload.windows.iter_mut().find(|w| w.tag == done.tag) else {
                    continue;
                };
                let failed = match &done.result {
                    Ok(n) if *n >= window.wanted => None,
                    // The file ended early: it changed since it was checked.
                    Ok(_) => Some(std::io::ErrorKind::UnexpectedEof.into()),
                    Err(err) => Some(copy(err)),
                };
                window.result = Some(done.result);
                if let Some(err) = failed {
                    upload.fail(|source| source.read_error(err).into());
                }
                break;
            }
        }
    }

    /// The queue cannot go on: drops it (waiting for its requests) before any buffer goes,
    /// fails every read in flight and every tensor with windows left; the tensors begun next
    /// go the one-tensor way.
    fn fail_queue(&mut self, err: &std::io::Error) {
        if let Some(queue) = self.queue.take() {
            self.stats.max_requests_in_flight =
                self.stats.max_requests_in_flight.max(queue.max_in_flight);
        }
        self.no_queue = true;
        self.reported.clear();
        for item in &mut self.items {
            let Item::Queued(upload) = item else {
                continue;
            };
            let mut cut = upload.pushed < upload.count;
            for window in &mut upload.windows {
                if window.result.is_none() {
                    window.result = Some(Err(copy(err)));
                    cut = true;
                }
            }
            if cut {
                upload.fail(|source| source.read_error(copy(err)).into());
            }
        }
    }

    /// Drops the queue (waiting for its requests), frees the staging buffers and gives their
    /// room back to the RAM budget. Only once no window holds a buffer, or the queue is gone.
    fn release_staging(&mut self) {
        if let Some(queue) = self.queue.take() {
            self.stats.max_requests_in_flight =
                self.stats.max_requests_in_flight.max(queue.max_in_flight);
        }
        self.no_queue = true;
        self.staging.free.clear();
        let reserved = std::mem::take(&mut self.staging.reserved);
        if reserved > 0 {
            let mut state = self.store.shared.lock();
            state.unreserve(reserved);
            self.store.shared.check(&mut state);
        }
    }

    /// Finishes the first tensor, whose reads are over: the file's identity checked after
    /// them, the device synchronized, the copy installed (or everything undone).
    fn deliver(&mut self, upload: Upload) -> Result<DeviceGuard, StoreError> {
        let Upload {
            pending,
            source,
            read,
            failed,
            ..
        } = upload;
        let len = pending.len;
        let restored = match failed {
            Some(err) => Err(err),
            None => source
                .check_unchanged()
                .map_err(StoreError::from)
                .and_then(|()| synchronize(&pending)),
        };
        if restored.is_ok() {
            self.store.shared.stats.restored_from_source(len, len, read);
        }
        self.store.finish_device(pending, restored)
    }
}

impl Staging {
    /// A free buffer, or a new one while fewer than `most` were made (and the host gives
    /// it); whether it is fresh.
    fn take(&mut self) -> Option<(AlignedBuf, bool)> {
        if let Some(buf) = self.free.pop() {
            return Some((buf, false));
        }
        if self.made >= self.most {
            return None;
        }
        let Some(buf) = usize::try_from(self.buf_len)
            .ok()
            .and_then(AlignedBuf::zeroed)
        else {
            // The host refuses: go on with the buffers made.
            self.most = self.made;
            return None;
        };
        self.made += 1;
        Some((buf, true))
    }
}

/// Uploads one window of `upload` in the device's chunks, polling `queue` between them so that
/// requests keep going in (what it reports is left in `reported`).
fn upload_window(
    upload: &Upload,
    window: &Window,
    window_len: u64,
    queue: &mut Option<ReadQueue>,
    reported: &mut Vec<ReadDone>,
) -> Result<(), StoreError> {
    let DevicePending {
        device,
        alloc,
        name,
        ..
    } = &upload.pending;
    let chunk = device.chunk_len().max(1);
    let base = window.index as u64 * window_len;
    for (i, piece) in window.buf.as_slice().chunks(chunk).enumerate() {
        let at = base + (i * chunk) as u64;
        match unwinding(|| device.upload(alloc, at, piece)) {
            Some(Ok(())) => {}
            Some(Err(source)) => {
                return Err(StoreError::Restore(RestoreError::Device {
                    name: name.clone(),
                    source,
                }));
            }
            None => {
                return Err(StoreError::Restore(RestoreError::Panicked {
                    name: name.clone(),
                }));
            }
        }
        if let Some(q) = queue.as_mut() {
            // A failure of the queue shows again at the next wait.
            if let Ok(done) = q.poll() {
                reported.extend(done);
            }
        }
    }
    Ok(())
}

/// A read of `source` that could not be done.
fn read_failed(source: &Source, kind: std::io::ErrorKind) -> StoreError {
    source.read_error(kind.into()).into()
}

/// The same I/O error again, for each read it ends.
fn copy(err: &std::io::Error) -> std::io::Error {
    std::io::Error::new(err.kind(), err.to_string())
}

/// Waits for a tensor's uploads to complete.
fn synchronize(pending: &DevicePending) -> Result<(), StoreError> {
    match unwinding(|| pending.device.synchronize()) {
        Some(Ok(())) => Ok(()),
        Some(Err(source)) => Err(StoreError::Restore(RestoreError::Device {
            name: pending.name.clone(),
            source,
        })),
        None => Err(StoreError::Restore(RestoreError::Panicked {
            name: pending.name.clone(),
        })),
    }
}

impl Iterator for DeviceStream<'_> {
    type Item = Result<DeviceGuard, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            // No budget: nothing is left on the host.
            if let Placed::Tensor { result, .. } = self.next_placed()? {
                return Some(result);
            }
        }
    }
}

impl Drop for DeviceStream<'_> {
    fn drop(&mut self) {
        // Every request in flight completes before a buffer goes.
        drop(self.queue.take());
        for item in self.items.drain(..) {
            if let Item::Queued(upload) = item {
                let store = self.store;
                // Gives the allocation back and unpins; a device that panics on release
                // leaves its allocation, never a panic in a drop.
                let _ = unwinding(move || {
                    store.finish_device(
                        upload.pending,
                        Err(StoreError::Restore(RestoreError::Panicked {
                            name: String::new(),
                        })),
                    )
                });
            }
        }
        self.release_staging();
    }
}

impl std::fmt::Debug for DeviceStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStream")
            .field("tensors", &self.ids.len())
            .field("handed_out", &(self.next - self.items.len()))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
