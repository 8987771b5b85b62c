//! Where a tensor's bytes come from, and the one restore that brings them into RAM or onto a
//! device.
//!
//! [`CopySource::of`] is the only place that decides which copy a restore reads: for a RAM
//! copy the file (clean), else a device copy, the spill file, the recipe; for a device copy
//! a RAM copy first, then the same list. [`Shared::restore`] is the only function that moves
//! those bytes, into a RAM buffer or a device allocation in the device's chunks. Both run
//! outside the registry lock; the tensor is pinned meanwhile, so none of the copies they use
//! goes away.

use std::sync::Arc;

use super::error::{MemoryError, RestoreError};
use super::ram::RamBuf;
use super::reread::FileRead;
use super::state::{FileExtent, State, TensorEntry};
use super::{Recipe, Shared, StoreError, Tier};
use crate::device::{Device, DeviceAlloc};
use crate::spill::{Extent, SpillError};
use crate::stats::Stats;
use crate::sys::AlignedBuf;
use crate::sys::direct::{DirectBuf, with_prefault};

/// Bytes restored at once for a device upload (rounded to the device's chunks): two
/// direct-I/O requests of the default size in flight, and little staging memory — the
/// reader works on the next window while this one is uploaded. (Measured with `SimDevice`,
/// 4-32 MiB windows loaded at the same speed within noise, warm or cold; the simulated
/// device's own copy into fresh memory was the limit.)
const UPLOAD_WINDOW: u64 = 8 << 20;

/// The most host memory one upload from a source holds in window buffers: the window being
/// uploaded, the one the reader fills, and one in the channel between them, each padded to
/// whole blocks on both ends.
pub(super) fn upload_windows_bound(largest: u64, chunk_len: usize) -> u64 {
    let chunk = chunk_len.max(1) as u64;
    let window = ((UPLOAD_WINDOW / chunk).max(1) * chunk).min(largest);
    3 * (window.div_ceil(crate::sys::direct::BLOCK) + 2) * crate::sys::direct::BLOCK
}

/// A copy a restore reads from, chosen under the lock.
pub(super) enum CopySource {
    Ram(Arc<RamBuf>),
    /// The model file, and whether this restore from it is a repeated one.
    File(FileExtent, Again),
    /// A dirty tensor's device copy (kept while the tensor is pinned).
    Device {
        device: Arc<dyn Device>,
        alloc: Arc<DeviceAlloc>,
    },
    /// The spill file, with the recipe to fall back on if the extent cannot be read.
    Spill {
        extent: Extent,
        recipe: Option<Recipe>,
    },
    Recipe(Recipe),
}

/// Where a restore puts the bytes.
pub(super) enum Target<'a> {
    /// A new RAM copy, in `reuse` when given (a pooled buffer).
    Ram { reuse: Option<AlignedBuf> },
    /// A device allocation.
    Device {
        device: &'a Arc<dyn Device>,
        alloc: &'a DeviceAlloc,
    },
}

/// Whether a restore from the model file repeats an earlier one, with what `reread` weighs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Again {
    /// The tensor was restored from its file before.
    again: bool,
    /// Its model's file bytes.
    model_bytes: u64,
}

impl CopySource {
    /// Where the bytes for a new copy of `entry` (a tensor of `state`) in `into` (RAM or a
    /// device) come from, fastest first.
    pub(super) fn of(state: &State, entry: &TensorEntry, into: Tier) -> Result<Self, StoreError> {
        let devices = &state.devices;
        if into != Tier::Ram
            && let Some(buf) = &entry.ram
        {
            return Ok(Self::Ram(Arc::clone(buf)));
        }
        if let Some(extent) = entry.clean_extent() {
            let again = Again {
                again: entry.file_restores > 0,
                model_bytes: state.model(entry.model).map_or(0, |m| m.file_bytes),
            };
            return Ok(Self::File(extent.clone(), again));
        }
        // A device copy comes back over the bus, faster than from the disk.
        if into != Tier::Device
            && let Some(copy) = &entry.device
            && let Some(device) = devices.get(copy.device.0 as usize)
        {
            return Ok(Self::Device {
                device: Arc::clone(device),
                alloc: Arc::clone(&copy.alloc),
            });
        }
        if let Some(extent) = entry.spilled {
            return Ok(Self::Spill {
                extent,
                recipe: entry.recipe.clone(),
            });
        }
        if let Some(recipe) = &entry.recipe {
            return Ok(Self::Recipe(recipe.clone()));
        }
        // Strict builds check that a dirty tensor always has a copy; this only answers a
        // request that the tensor's one copy cannot serve (it is the target tier itself).
        Err(StoreError::Restore(RestoreError::NoCopy {
            name: entry.name.clone(),
            tier: into,
        }))
    }

    pub(super) fn reads_spill(&self) -> bool {
        matches!(self, Self::Spill { .. })
    }

    pub(super) fn reads_file(&self) -> bool {
        matches!(self, Self::File(..))
    }
}

impl Shared {
    /// Fills `into` with the tensor's `len` bytes from `from`. Returns the RAM copy for a
    /// RAM target. A spill extent that cannot be read falls back on the recipe if there is
    /// one; without one, a checksum mismatch is [`RestoreError::Lost`] and an I/O error
    /// [`RestoreError::SpillRead`] (the extent is kept: a retry may succeed).
    pub(super) fn restore(
        &self,
        name: &str,
        len: u64,
        from: &CopySource,
        mut into: Target<'_>,
    ) -> Result<Option<RamBuf>, StoreError> {
        match from {
            CopySource::Spill { extent, recipe } => {
                let reuse = match &mut into {
                    Target::Ram { reuse } => reuse.take(),
                    Target::Device { .. } => None,
                };
                let read = self.restore_spill(len, extent, &into_ref(&into), reuse);
                match read {
                    Ok(buf) => {
                        Stats::add(&self.stats.bytes_restored_spill, len);
                        Ok(buf)
                    }
                    Err(err) => {
                        if matches!(err, SpillError::Checksum { .. }) {
                            Stats::add(&self.stats.checksum_failures, 1);
                        }
                        log::warn!("tensor `{}`: {err}", crate::text::Escaped(name));
                        match recipe {
                            Some(recipe) => self.recompute(name, len, recipe, &into),
                            None => Err(spill_read_error(name, err)),
                        }
                    }
                }
            }
            CopySource::Recipe(recipe) => self.recompute(name, len, recipe, &into),
            CopySource::Ram(buf) => match into {
                // `of` never picks a RAM copy for a RAM copy.
                Target::Ram { .. } => Err(StoreError::Restore(RestoreError::NoCopy {
                    name: name.to_owned(),
                    tier: Tier::Ram,
                })),
                Target::Device { device, alloc } => {
                    upload(device, alloc, name, 0, buf.as_slice())?;
                    Ok(None)
                }
            },
            CopySource::Device { device, alloc: src } => match into {
                Target::Ram { .. } => {
                    let mut buf = alloc(name, len)?;
                    device
                        .download(src, 0, buf.as_mut_slice())
                        .map_err(|source| {
                            StoreError::Restore(RestoreError::Device {
                                name: name.to_owned(),
                                source,
                            })
                        })?;
                    Stats::add(&self.stats.bytes_downloaded, len);
                    Ok(Some(RamBuf::Aligned(buf)))
                }
                Target::Device { .. } => Err(StoreError::Restore(RestoreError::NoCopy {
                    name: name.to_owned(),
                    tier: Tier::Device,
                })),
            },
            CopySource::File(extent, again) => {
                let read = self.file_read(*again);
                match into {
                    Target::Ram { reuse } => {
                        self.restore_file_ram(extent, len, reuse, read).map(Some)
                    }
                    Target::Device { device, alloc } => {
                        let FileExtent { source, offset } = extent;
                        self.stream_file(source, *offset, name, device, alloc, read)?;
                        Ok(None)
                    }
                }
            }
        }
    }

    /// A RAM copy of a file extent, read as `read` says.
    pub(super) fn restore_file_ram(
        &self,
        extent: &FileExtent,
        len: u64,
        reuse: Option<AlignedBuf>,
        read: FileRead,
    ) -> Result<RamBuf, StoreError> {
        let (buf, cold) = extent
            .source
            .restore(extent.offset, len, reuse, read.keeps_cached())?;
        self.stats.restored_from_source(len, cold, read);
        Ok(RamBuf::Direct(buf))
    }

    /// How a restore from a model file reads (see `reread`): the memory figures are read
    /// only for a streamed tensor. Counted in the stats.
    pub(super) fn file_read(&self, again: Again) -> FileRead {
        let streamed =
            !self.streamed_direct && (again.again || again.model_bytes > self.governor.ram_budget);
        let read = if streamed {
            let available = self.governor.recent_available();
            super::reread::choose(
                true,
                again.model_bytes,
                available,
                self.governor.reserve_ram(),
            )
        } else {
            FileRead::First
        };
        let counter = match read {
            FileRead::First => &self.stats.restores_direct_first,
            FileRead::Cached => &self.stats.restores_cached,
            FileRead::Short => &self.stats.restores_direct_short,
        };
        Stats::add(counter, 1);
        read
    }

    /// Reads a spill extent into a RAM copy (in `reuse`, a pooled buffer, when it is large
    /// enough; else in new memory, faulted in by a helper thread while the reads run, as a
    /// restore from the model file is) or onto a device.
    fn restore_spill(
        &self,
        len: u64,
        extent: &Extent,
        into: &TargetRef<'_>,
        reuse: Option<AlignedBuf>,
    ) -> Result<Option<RamBuf>, SpillError> {
        match into {
            TargetRef::Ram => {
                let (mut buf, fresh) =
                    DirectBuf::reused_or_new(reuse, 0, len).ok_or_else(|| SpillError::Io {
                        dir: std::path::PathBuf::new(),
                        op: "allocate a buffer for",
                        source: std::io::ErrorKind::OutOfMemory.into(),
                    })?;
                let n = usize::try_from(len).unwrap_or(usize::MAX);
                let read = |blocks: &mut [u8]| self.spill.read(extent, &mut blocks[..n]);
                if fresh {
                    with_prefault(buf.blocks_mut(), read)?;
                } else {
                    read(buf.blocks_mut())?;
                }
                Ok(Some(RamBuf::Direct(buf)))
            }
            TargetRef::Device { device, alloc } => {
                self.spill
                    .read_with(extent, device.chunk_len(), |offset, chunk| {
                        device.upload(alloc, offset, chunk)
                    })?;
                Ok(None)
            }
        }
    }

    fn recompute(
        &self,
        name: &str,
        len: u64,
        recipe: &Recipe,
        into: &Target<'_>,
    ) -> Result<Option<RamBuf>, StoreError> {
        let Some(_depth) = RecipeDepth::enter() else {
            return Err(StoreError::Restore(RestoreError::RecipeLoop {
                name: name.to_owned(),
            }));
        };
        let bytes = (recipe.compute)();
        if bytes.len() as u64 != len {
            return Err(StoreError::Restore(RestoreError::Recipe {
                name: name.to_owned(),
                expected: len,
                actual: bytes.len() as u64,
            }));
        }
        Stats::add(&self.stats.recomputes, 1);
        match into {
            Target::Ram { .. } => Ok(Some(RamBuf::Owned(bytes.into_boxed_slice()))),
            Target::Device { device, alloc } => {
                upload(device, alloc, name, 0, &bytes)?;
                Ok(None)
            }
        }
    }

    /// Restores a file extent window by window (cached parts copied, the rest read as `read`
    /// says, as for RAM copies) on a reader thread while the previous window is uploaded in
    /// the device's chunks: no full host copy is kept, nothing is left in the page cache
    /// unless `read` keeps it there, and at most three windows of buffer exist at once.
    pub(super) fn stream_file(
        &self,
        source: &crate::source::Source,
        offset: u64,
        name: &str,
        device: &Arc<dyn Device>,
        alloc: &DeviceAlloc,
        read: FileRead,
    ) -> Result<(), StoreError> {
        let len = alloc.len();
        let chunk = device.chunk_len().max(1) as u64;
        let window = (UPLOAD_WINDOW / chunk).max(1) * chunk;
        let (to_uploader, windows) = std::sync::mpsc::sync_channel(1);
        let (to_reader, spares) = std::sync::mpsc::channel::<AlignedBuf>();
        std::thread::scope(|scope| -> Result<(), StoreError> {
            scope.spawn(move || {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(window);
                    let restored = source.restore(
                        offset + done,
                        n,
                        spares.try_recv().ok(),
                        read.keeps_cached(),
                    );
                    let failed = restored.is_err();
                    // The uploader stops receiving when it fails.
                    if to_uploader.send((done, n, restored)).is_err() || failed {
                        return;
                    }
                    done += n;
                }
            });
            for (done, n, restored) in windows {
                let (buf, cold) = restored?;
                self.stats.restored_from_source(n, cold, read);
                for (i, piece) in buf.as_slice().chunks(chunk as usize).enumerate() {
                    upload(device, alloc, name, done + i as u64 * chunk, piece)?;
                }
                // The reader may have finished: then the buffer is simply freed.
                let _ = to_reader.send(buf.into_inner());
            }
            Ok(())
        })
    }
}

/// Recipes that acquire tensors whose recipes acquire tensors...: nesting deeper than this on
/// one thread is a loop (a recipe needing its own tensor), an error instead of a stack
/// overflow.
const RECIPE_DEPTH_MAX: u32 = 32;

thread_local! {
    static RECIPE_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// One level of recipe nesting on this thread, for as long as it lives.
struct RecipeDepth;

impl RecipeDepth {
    fn enter() -> Option<Self> {
        RECIPE_DEPTH.with(|depth| {
            (depth.get() < RECIPE_DEPTH_MAX).then(|| {
                depth.set(depth.get() + 1);
                RecipeDepth
            })
        })
    }
}

impl Drop for RecipeDepth {
    fn drop(&mut self) {
        RECIPE_DEPTH.with(|depth| depth.set(depth.get() - 1));
    }
}

/// A borrowed view of a [`Target`], for the spill path that may fall back on the recipe.
enum TargetRef<'a> {
    Ram,
    Device {
        device: &'a Arc<dyn Device>,
        alloc: &'a DeviceAlloc,
    },
}

fn into_ref<'a>(into: &Target<'a>) -> TargetRef<'a> {
    match into {
        Target::Ram { .. } => TargetRef::Ram,
        Target::Device { device, alloc } => TargetRef::Device { device, alloc },
    }
}

fn upload(
    device: &Arc<dyn Device>,
    alloc: &DeviceAlloc,
    name: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    device.upload(alloc, offset, bytes).map_err(|source| {
        StoreError::Restore(RestoreError::Device {
            name: name.to_owned(),
            source,
        })
    })
}

/// A fresh, zeroed, page-aligned RAM buffer (fallible: a host that cannot hold it is an
/// error, not an abort).
pub(super) fn alloc(name: &str, len: u64) -> Result<AlignedBuf, StoreError> {
    usize::try_from(len)
        .ok()
        .and_then(AlignedBuf::zeroed)
        .ok_or_else(|| {
            StoreError::Memory(MemoryError::Alloc {
                name: name.to_owned(),
                bytes: len,
            })
        })
}

/// A spill extent that could not be read: lost when its bytes are corrupt, retryable when
/// the read itself failed.
fn spill_read_error(name: &str, err: SpillError) -> StoreError {
    match err {
        SpillError::Checksum { .. } => StoreError::Restore(RestoreError::Lost {
            name: name.to_owned(),
            source: err,
        }),
        err => StoreError::Restore(RestoreError::SpillRead {
            name: name.to_owned(),
            source: err,
        }),
    }
}
