//! Restores of many tensors as one stream: the reads of the next tensors are in flight while
//! the current one completes.
//!
//! A [`RamStream`] begins tensors ahead of the one it hands out next (room admitted by the
//! governor, pinned, source chosen: the first half of [`Store::acquire_ram`]), up to the bytes
//! in flight of its device's shape ([`super::tune`]). Extents wholly out of the page cache are
//! read with `O_DIRECT` through one [`ReadQueue`] that stays full across tensor boundaries, and
//! so are spill extents when the spill file reads with `O_DIRECT` alone (checked against their
//! checksums as they are handed out); everything else (cached bytes, recipes, device copies)
//! is restored as one acquire would, in order. Tensors come out in the order asked, each as its guard or its own
//! error: one tensor's failure is not the others'.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::copies::{CopySource, Target};
use super::error::{MemoryError, RestoreError};
use super::evict::Room;
use super::ram::RamBuf;
use super::reread::FileRead;
use super::state::FileExtent;
use super::tune::{LADDER, in_flight, top_within};
use super::{Begun, Pending, Store, StoreError, TensorGuard, TensorId, unwinding};
use crate::source::Source;
use crate::spill::Extent;
use crate::sys::direct::{BLOCK, DirectBuf, IoShape, ReadQueue, populate_write_parallel};

/// Bytes of a fresh buffer faulted in at once, between two looks at the queue.
const POPULATE_STEP: usize = 16 << 20;

/// Bytes a stream measures a shape over, at least (and at least twice its bytes in flight).
const SEGMENT: u64 = 64 << 20;

/// What a stream did, for tests and benchmarks: a [`RamStream`]'s, or a
/// [`DeviceStream`](super::DeviceStream)'s (also in [`LoadOutcome`](super::LoadOutcome)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Tensors read through the queue with `O_DIRECT`.
    pub queued_tensors: u64,
    /// Tensors restored one by one (cached, spilled, recomputed, already in RAM or on the
    /// device).
    pub other_tensors: u64,
    /// The most direct requests in flight at once.
    pub max_requests_in_flight: usize,
    /// The most tensors with reads in flight at once.
    pub max_tensors_in_flight: usize,
    /// Times a tensor was handed out with no read in flight although tensors were left to
    /// begin: the queue ran dry at a tensor boundary (the RAM budget or the stream's bound
    /// kept the next tensors out).
    pub drained_at_boundary: u64,
    /// Shape segments measured for the device's tuning (device streams measure none).
    pub segments_measured: u64,
}

/// Tensors restored into RAM as one stream; an iterator of their guards, in the order asked.
/// See [`Store::stream_ram`].
pub struct RamStream<'a> {
    /// Declared first: dropped (waiting for every request in flight) before the buffers.
    queue: Option<ReadQueue>,
    /// Buffers of reads whose push failed: some of their requests may be in the ring, so
    /// they are freed only after the queue (in `Drop`).
    orphans: Vec<DirectBuf>,
    /// Whether a queue could not be set up (no `io_uring`): then everything is
    /// restored one by one.
    no_queue: bool,
    store: &'a Store,
    ids: Vec<TensorId>,
    /// The next of `ids` to begin.
    next: usize,
    /// Begun tensors, in order.
    items: VecDeque<Item>,
    /// Bytes of begun tensors not yet handed out.
    ahead: u64,
    /// How tensors ahead of the one handed out next are admitted.
    room: Room,
    /// The most bytes begun ahead of the one handed out next: twice the deepest shape's bytes
    /// in flight, at most half the RAM budget.
    bound: u64,
    /// The highest rung of the shape ladder the RAM budget allows.
    top: usize,
    /// The device being measured, its rung and the segment so far.
    measuring: Option<Segment>,
    tag: u64,
    stats: StreamStats,
}

struct Segment {
    device: u64,
    rung: usize,
    /// Bytes to complete before the clock starts: the shape's bytes in flight, so that the
    /// requests of the previous shape (or the queue's first filling) are not counted.
    warmup: u64,
    began: Option<Instant>,
    bytes: u64,
}

/// What became of a read handed to the queue ([`RamStream::queue_read`]).
enum Queued {
    /// In the queue: the buffer, for the item that holds it, and the read's tag.
    Read(DirectBuf, u64),
    /// Not queued: the queue failed and is gone, and the buffer is given back.
    NoQueue(DirectBuf),
    /// The push failed (the buffer is kept until the queue is gone).
    Failed(std::io::Error),
}

/// Where a queued read comes from.
enum Origin {
    /// The tensor's extent in its model file, read as `read` says.
    File { source: Arc<Source>, read: FileRead },
    /// Its extent in the spill file, checked against its checksum once read.
    Spill(Extent),
}

enum Item {
    Done(Result<TensorGuard, StoreError>),
    Reading(Box<Reading>),
}

struct Reading {
    pending: Pending,
    buf: DirectBuf,
    origin: Origin,
    tag: u64,
    /// Bytes the read must reach: the tensor's end within its blocks.
    wanted: usize,
    result: Option<std::io::Result<usize>>,
}

impl Store {
    /// Restores `ids` into RAM as one stream and hands out their guards in that order: while
    /// one is handed out, the reads of the next ones are in flight (within the bytes in flight
    /// of the device's shape and the RAM budget). Each item is what [`Store::acquire_ram`]
    /// would return for that tensor; dropping the stream early undoes the tensors begun ahead.
    ///
    /// A model larger than its budget streams through it: drop each guard when done with it,
    /// and the copies behind it are evicted for the next ones as usual.
    pub fn stream_ram(&self, ids: Vec<TensorId>) -> RamStream<'_> {
        RamStream::new(self, ids, Room::Evict)
    }

    /// Pins RAM copies of all of `ids` (reading them as one stream, see
    /// [`Store::stream_ram`]), or none: on the first error, the guards taken so far are
    /// dropped and the error returned.
    pub fn acquire_ram_many(&self, ids: &[TensorId]) -> Result<Vec<TensorGuard>, StoreError> {
        self.stream_ram(ids.to_vec()).collect()
    }

    /// The shapes this store's streams read each device with (see [`RamStream`]).
    pub fn read_shapes(&self) -> Vec<super::DeviceShape> {
        let top = top_within(self.shared.governor.ram_budget / 4);
        self.shared.tuner.shapes(top)
    }

    pub(super) fn stream_with(&self, ids: Vec<TensorId>, room: Room) -> RamStream<'_> {
        RamStream::new(self, ids, room)
    }
}

impl<'a> RamStream<'a> {
    fn new(store: &'a Store, ids: Vec<TensorId>, room: Room) -> Self {
        let budget = store.shared.governor.ram_budget;
        let top = top_within(budget / 4);
        Self {
            queue: None,
            orphans: Vec::new(),
            no_queue: false,
            store,
            ids,
            next: 0,
            items: VecDeque::new(),
            ahead: 0,
            room,
            // The bytes in flight and as many queued behind them, so that the queue stays
            // full while the next tensors are begun.
            bound: (2 * in_flight(LADDER[top])).min(budget / 2),
            top,
            measuring: None,
            tag: 0,
            stats: StreamStats::default(),
        }
    }

    /// What the stream did so far.
    pub fn stats(&self) -> StreamStats {
        let mut stats = self.stats;
        if let Some(queue) = &self.queue {
            stats.max_requests_in_flight = queue.max_in_flight;
        }
        stats
    }

    /// Begins tensors ahead while the bound and the budget allow; the first one (nothing
    /// begun) always, with the stream's room, so that its error is its own.
    fn fill(&mut self) {
        while self.next < self.ids.len() {
            let id = self.ids[self.next];
            let head = self.items.is_empty();
            let len = self.store.shared.lock().tensor(id).map_or(0, |e| e.len);
            if !head && self.ahead + len > self.bound {
                return;
            }
            let begun = unwinding(|| self.store.begin_ram(id, self.room)).unwrap_or_else(|| {
                Err(StoreError::Restore(RestoreError::Panicked {
                    name: format!("#{}", id.0),
                }))
            });
            let item = match begun {
                Ok(Begun::Ready(guard)) => {
                    self.stats.other_tensors += 1;
                    Item::Done(Ok(guard))
                }
                Ok(Begun::Pending(pending)) => self.start(pending),
                Err(StoreError::Memory(
                    MemoryError::OverBudget { .. } | MemoryError::UnderReserve { .. },
                )) if !head => return,
                Err(err) => Item::Done(Err(err)),
            };
            self.ahead += len;
            self.items.push_back(item);
            self.next += 1;
        }
    }

    /// Queues the read of a begun tensor, or restores it now when it cannot be queued.
    fn start(&mut self, mut pending: Pending) -> Item {
        let (extent, read) = match &pending.from {
            CopySource::File(extent, again) => {
                (extent.clone(), self.store.shared.file_read(*again))
            }
            CopySource::Spill { extent, .. } => {
                let extent = *extent;
                return self.start_spill(pending, extent);
            }
            _ => return Item::Done(self.restore_now(pending, None)),
        };
        let Some(direct) =
            extent
                .source
                .direct_only(extent.offset, pending.len, read.keeps_cached())
        else {
            return Item::Done(self.restore_now(pending, Some(&(extent, read))));
        };
        if !self.ensure_queue(|stream| stream.shape_for(extent.source.device())) {
            return Item::Done(self.restore_now(pending, Some(&(extent, read))));
        }
        if self
            .measuring
            .as_ref()
            .is_some_and(|segment| segment.device != extent.source.device())
        {
            // Files on another device share the queue: its rate is no longer one device's.
            self.measuring = None;
        }
        if let Err(err) = extent.source.check_unchanged() {
            self.stats.other_tensors += 1;
            return Item::Done(self.store.finish_ram(pending, Err(err.into())));
        }
        let Some(buf) = self.buffer_for(&mut pending, extent.offset) else {
            let err = extent
                .source
                .read_error(std::io::ErrorKind::OutOfMemory.into());
            return Item::Done(self.store.finish_ram(pending, Err(err.into())));
        };
        let start = extent.offset / BLOCK * BLOCK;
        let wanted = (extent.offset - start) as usize + pending.len as usize;
        // The direct file lives in `source`, held by the item returned below.
        let (buf, tag) = match self.queue_read(direct, start, buf) {
            Queued::Read(buf, tag) => (buf, tag),
            Queued::NoQueue(buf) => {
                pending.reuse = Some(buf.into_inner());
                return Item::Done(self.restore_now(pending, Some(&(extent, read))));
            }
            Queued::Failed(err) => {
                let err = extent.source.read_error(err);
                return Item::Done(self.store.finish_ram(pending, Err(err.into())));
            }
        };
        Item::Reading(Box::new(Reading {
            pending,
            buf,
            origin: Origin::File {
                source: Arc::clone(&extent.source),
                read,
            },
            tag,
            wanted,
            result: None,
        }))
    }

    /// Queues the read of a begun tensor's spill extent, when the spill file reads with
    /// `O_DIRECT` alone; else restores it now. Its checksum is checked when it is delivered.
    fn start_spill(&mut self, mut pending: Pending, extent: Extent) -> Item {
        let store = self.store;
        let Some((direct, spill_shape)) = store.shared.spill.direct_reads() else {
            return Item::Done(self.restore_now(pending, None));
        };
        if !self.ensure_queue(|_| spill_shape) {
            return Item::Done(self.restore_now(pending, None));
        }
        // The spill file's reads share the queue: its rate is no longer one model file's.
        self.measuring = None;
        let Some(buf) = self.buffer_for(&mut pending, 0) else {
            return Item::Done(self.restore_now(pending, None));
        };
        // The spill file belongs to the store, which outlives the stream, and keeps the
        // extent while the tensor's `spill_readers` (counted by `begin_ram`) is above zero;
        // its reserved blocks cover the buffer's.
        let (buf, tag) = match self.queue_read(direct, extent.offset, buf) {
            Queued::Read(buf, tag) => (buf, tag),
            Queued::NoQueue(buf) => {
                pending.reuse = Some(buf.into_inner());
                return Item::Done(self.restore_now(pending, None));
            }
            // Read again the ordinary way.
            Queued::Failed(_) => return Item::Done(self.restore_now(pending, None)),
        };
        let wanted = pending.len as usize;
        Item::Reading(Box::new(Reading {
            pending,
            buf,
            origin: Origin::Spill(extent),
            tag,
            wanted,
            result: None,
        }))
    }

    /// Sets the queue up on the first read through it, in `shape(self)`; whether there is
    /// one (none where `io_uring` is missing: then everything is restored one by one).
    fn ensure_queue(&mut self, shape: impl FnOnce(&mut Self) -> IoShape) -> bool {
        if self.queue.is_none() && !self.no_queue {
            let deepest = LADDER[..=self.top].iter().map(|s| s.depth).max();
            let shape = shape(self);
            self.queue = ReadQueue::new(shape, deepest.unwrap_or(shape.depth));
            self.no_queue = self.queue.is_none();
        }
        self.queue.is_some()
    }

    /// The buffer a begun tensor is read into, laid out for a read at `offset`: its pooled
    /// one, or new memory faulted in now, on every CPU, while the reads ahead of it are in
    /// flight (the queue kept full between pieces). `None` when the allocator refuses.
    fn buffer_for(&mut self, pending: &mut Pending, offset: u64) -> Option<DirectBuf> {
        let (mut buf, fresh) = DirectBuf::reused_or_new(pending.reuse.take(), offset, pending.len)?;
        if fresh {
            for piece in buf.blocks_mut().chunks_mut(POPULATE_STEP) {
                populate_write_parallel(piece);
                self.collect(false);
            }
        }
        Some(buf)
    }

    /// Queues the read of `buf`'s blocks at the block-aligned `at` of `direct` (which stays
    /// open while the stream lives) and counts it. When the push fails the buffer becomes an
    /// orphan: part of the read may be in the ring, so it outlives the queue.
    fn queue_read(&mut self, direct: &std::fs::File, at: u64, mut buf: DirectBuf) -> Queued {
        // Faulting a buffer in looks at the queue, which may have failed and gone meanwhile.
        let Some(queue) = self.queue.as_mut() else {
            return Queued::NoQueue(buf);
        };
        let blocks = buf.blocks_mut();
        let (ptr, len) = (blocks.as_mut_ptr(), blocks.len());
        self.tag += 1;
        let tag = self.tag;
        // SAFETY: `buf` is a heap buffer; it goes to the item the caller builds, which stays
        // in `self.items` until its read is reported (`deliver` takes it only then) or the
        // queue is dropped (`Drop` drops the queue, waiting for every request, before the
        // items), or on failure to `self.orphans`, freed after the queue. `direct` stays open
        // as long (the caller's item holds its owner, or the store does).
        if let Err(err) = unsafe { queue.push(direct, at, ptr, len, tag) } {
            self.orphans.push(buf);
            return Queued::Failed(err);
        }
        self.count_queued();
        Queued::Read(buf, tag)
    }

    /// Counts a tensor whose read was just queued, with those still reading.
    fn count_queued(&mut self) {
        self.stats.queued_tensors += 1;
        crate::stats::Stats::add(&self.store.shared.stats.restores_queued, 1);
        let reading = self
            .items
            .iter()
            .filter(|item| matches!(item, Item::Reading(r) if r.result.is_none()))
            .count()
            + 1;
        self.stats.max_tensors_in_flight = self.stats.max_tensors_in_flight.max(reading);
    }

    /// Restores a begun tensor as one acquire would.
    fn restore_now(
        &mut self,
        mut pending: Pending,
        file: Option<&(FileExtent, FileRead)>,
    ) -> Result<TensorGuard, StoreError> {
        self.stats.other_tensors += 1;
        let shared = &self.store.shared;
        let reuse = pending.reuse.take();
        let restored = unwinding(|| match file {
            Some((extent, read)) => shared
                .restore_file_ram(extent, pending.len, reuse, *read)
                .map(Some),
            None => shared.restore(
                &pending.name,
                pending.len,
                &pending.from,
                Target::Ram { reuse },
            ),
        })
        .unwrap_or_else(|| {
            Err(StoreError::Restore(RestoreError::Panicked {
                name: pending.name.clone(),
            }))
        });
        self.store.finish_ram(pending, restored)
    }

    /// The shape to read `device` with: its settled one, or the rung being measured.
    fn shape_for(&mut self, device: u64) -> crate::sys::direct::IoShape {
        let (rung, settled) = self.store.shared.tuner.rung(device, self.top);
        self.measuring = (!settled).then_some(Segment {
            device,
            rung,
            warmup: in_flight(LADDER[rung]),
            began: None,
            bytes: 0,
        });
        LADDER[rung]
    }

    /// Counts `bytes` read by the queue towards the segment being measured; at its end,
    /// records the rate and moves the queue to the next rung.
    fn measure(&mut self, bytes: u64) {
        let Some(segment) = &mut self.measuring else {
            return;
        };
        let Some(began) = segment.began else {
            segment.warmup = segment.warmup.saturating_sub(bytes);
            if segment.warmup == 0 {
                segment.began = Some(Instant::now());
            }
            return;
        };
        segment.bytes += bytes;
        let length = SEGMENT.max(2 * in_flight(LADDER[segment.rung]));
        if segment.bytes < length {
            return;
        }
        let seconds = began.elapsed().as_secs_f64();
        if seconds > 0.0 {
            let tuner = &self.store.shared.tuner;
            let rate = segment.bytes as f64 / seconds;
            log::debug!(
                "device {}: {:.2} GB/s with {} MiB x {} in flight",
                segment.device,
                rate / 1e9,
                LADDER[segment.rung].chunk >> 20,
                LADDER[segment.rung].depth
            );
            tuner.record(segment.device, segment.rung, rate);
            self.stats.segments_measured += 1;
        }
        let device = segment.device;
        let shape = self.shape_for(device);
        if let Some(queue) = &mut self.queue {
            queue.set_shape(shape);
        }
    }

    /// Waits for reads in flight and records their outcomes.
    fn wait(&mut self) {
        self.collect(true);
    }

    /// Records the outcomes of reads finished, waiting for one if `wait`; keeps the queue
    /// full. A failure of the queue itself fails every read in flight.
    fn collect(&mut self, wait: bool) {
        let Some(queue) = &mut self.queue else {
            return;
        };
        let finished = match if wait { queue.wait() } else { queue.poll() } {
            Ok(finished) => finished,
            Err(err) => {
                // The queue cannot go on: waiting for its requests (dropping it) before the
                // buffers are handed back.
                self.queue = None;
                self.no_queue = true;
                let kind = err.kind();
                for item in &mut self.items {
                    if let Item::Reading(r) = item
                        && r.result.is_none()
                    {
                        r.result = Some(Err(std::io::Error::new(kind, err.to_string())));
                    }
                }
                return;
            }
        };
        for done in finished {
            let bytes = done.result.as_ref().map_or(0, |&n| n as u64);
            if let Some(Item::Reading(r)) = self
                .items
                .iter_mut()
                .find(|item| matches!(item, Item::Reading(r) if r.tag == done.tag))
            {
                r.result = Some(done.result);
            }
            self.measure(bytes);
        }
    }

    /// Finishes the first item, whose read is over.
    fn deliver(&mut self, reading: Reading) -> Result<TensorGuard, StoreError> {
        let Reading {
            pending,
            buf,
            origin,
            wanted,
            result,
            ..
        } = reading;
        let (source, read) = match origin {
            Origin::File { source, read } => (source, read),
            // A failed read is read again the ordinary way, which reports its error.
            Origin::Spill(extent) => {
                let read = result.and_then(Result::ok);
                return self.deliver_spill(pending, buf, extent, read);
            }
        };
        let len = pending.len;
        let checked = match result.expect("delivered when reported") {
            Ok(n) if n >= wanted => source.check_unchanged().map_err(StoreError::from),
            Ok(_) => Err(source
                .read_error(std::io::ErrorKind::UnexpectedEof.into())
                .into()),
            Err(err) => Err(source.read_error(err).into()),
        };
        let restored = checked.map(|()| {
            self.store.shared.stats.restored_from_source(len, len, read);
            Some(RamBuf::Direct(buf))
        });
        self.store.finish_ram(pending, restored)
    }

    /// Finishes a spilled tensor whose queued read is over (`read`: the bytes it read, `None`
    /// when it failed): its bytes if they match the
    /// extent's checksum; else it is restored as one acquire would (which reads the extent
    /// again, and on a mismatch counts it and falls back on the recipe or reports the loss).
    fn deliver_spill(
        &mut self,
        mut pending: Pending,
        buf: DirectBuf,
        extent: Extent,
        read: Option<usize>,
    ) -> Result<TensorGuard, StoreError> {
        let len = pending.len;
        let whole = read.is_some_and(|n| n as u64 >= len);
        if whole && extent.verify(&buf.as_slice()[..len as usize]) {
            crate::stats::Stats::add(&self.store.shared.stats.bytes_restored_spill, len);
            return self
                .store
                .finish_ram(pending, Ok(Some(RamBuf::Direct(buf))));
        }
        pending.reuse = Some(buf.into_inner());
        self.restore_now(pending, None)
    }
}

impl Iterator for RamStream<'_> {
    type Item = Result<TensorGuard, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.fill();
            if self.items.is_empty() {
                return None;
            }
            if self.ready() {
                break;
            }
            self.wait();
        }
        let item = self.items.pop_front()?;
        let len = match &item {
            Item::Reading(r) => r.pending.len,
            Item::Done(Ok(guard)) => guard.bytes().len() as u64,
            Item::Done(Err(_)) => 0,
        };
        let result = match item {
            Item::Done(result) => result,
            Item::Reading(reading) => self.deliver(*reading),
        };
        self.ahead = self.ahead.saturating_sub(len);
        let reading = self.queue.as_ref().map_or(0, ReadQueue::in_flight);
        if reading == 0 && self.next < self.ids.len() {
            self.stats.drained_at_boundary += 1;
        }
        Some(result)
    }
}

impl RamStream<'_> {
    /// Whether the first item can be handed out.
    fn ready(&self) -> bool {
        match self.items.front() {
            Some(Item::Reading(r)) => r.result.is_some(),
            _ => true,
        }
    }
}

impl Drop for RamStream<'_> {
    fn drop(&mut self) {
        // Every request in flight completes before a buffer goes.
        drop(self.queue.take());
        for item in self.items.drain(..) {
            if let Item::Reading(reading) = item {
                let _ = self.store.finish_ram(
                    reading.pending,
                    Err(StoreError::Restore(RestoreError::Panicked {
                        name: String::new(),
                    })),
                );
            }
        }
    }
}

impl std::fmt::Debug for RamStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamStream")
            .field("tensors", &self.ids.len())
            .field("handed_out", &(self.next - self.items.len()))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
