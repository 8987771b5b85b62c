//! Errors of the store's operations.

use std::path::PathBuf;

use crate::dtype::Dtype;
use crate::size::Bytes;
use crate::source::SourceError;
use crate::spill::SpillError;
use crate::text::{Escaped, EscapedPath};

/// An impossible or contradictory store setting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The RAM budget is zero.
    #[error("ram_budget must be more than 0 bytes")]
    ZeroBudget,
    /// The spill directory does not exist or is not a directory.
    #[error("spill_dir {} is not a directory", EscapedPath(path))]
    SpillDir {
        /// The directory given.
        path: PathBuf,
    },
    /// `spill_max` is zero.
    #[error("spill_max must be more than 0 bytes (leave it unset for no limit)")]
    ZeroSpillMax,
    /// The PSI trigger cannot be registered as given.
    #[error(
        "pressure trigger of {stall:?} per {window:?}: the stall must be non-zero and within the window, and the window a multiple of 2 s"
    )]
    Trigger {
        /// Stall time.
        stall: std::time::Duration,
        /// Window.
        window: std::time::Duration,
    },
    /// The sample interval is zero.
    #[error("sample_interval must be more than 0")]
    ZeroInterval,
    /// The monitor thread could not be started.
    #[error("cannot start the memory monitor thread")]
    Monitor {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A handle or name that does not lead to a tensor, model or device of this store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandleError {
    /// The model handle does not belong to this store or was closed.
    #[error("model #{model} is not open in this store")]
    UnknownModel {
        /// The handle's number.
        model: u32,
    },
    /// The tensor handle does not belong to this store or its model was closed.
    #[error("tensor #{tensor} is not in this store")]
    UnknownTensor {
        /// The handle's number.
        tensor: u32,
    },
    /// The device handle does not belong to this store.
    #[error("device #{device} is not in this store")]
    UnknownDevice {
        /// The handle's number.
        device: u32,
    },
    /// A model has no tensor of that name.
    #[error("{}: no tensor named `{}`", EscapedPath(model), Escaped(name))]
    NoSuchTensor {
        /// The model's path.
        model: PathBuf,
        /// The name asked for.
        name: String,
    },
}

/// A change of a tensor refused: bytes that do not fit its dtype and shape, a name taken, a tensor in use, a spill that failed. The tensor is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// A derived tensor would shadow an existing name.
    #[error(
        "{}: a tensor named `{}` already exists",
        EscapedPath(model),
        Escaped(name)
    )]
    DuplicateName {
        /// The model's path.
        model: PathBuf,
        /// The name.
        name: String,
    },
    /// Bytes handed in do not match the dtype and shape.
    #[error(
        "tensor `{}`: {dtype} {shape:?} needs {}, got {}",
        Escaped(name),
        Bytes(*.expected),
        Bytes(*.actual)
    )]
    ByteLength {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes needed.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// The shape's byte size overflows or is not a whole number of bytes.
    #[error(
        "tensor `{}`: {dtype} {shape:?} is not a whole number of bytes that fits in 64 bits",
        Escaped(name)
    )]
    BadShape {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The operation needs the tensor's RAM copy, and it has none.
    #[error("tensor `{}` has no RAM copy to mark dirty", Escaped(name))]
    NotInRam {
        /// The tensor.
        name: String,
    },
    /// The operation needs the tensor unpinned, but a guard is alive.
    #[error("tensor `{}` is in use by {pins} guard(s)", Escaped(name))]
    Pinned {
        /// The tensor.
        name: String,
        /// Live guards.
        pins: u32,
    },
    /// Only tensors opened from a file can be reverted to it.
    #[error(
        "tensor `{}` was derived, not opened from a file: there is nothing to revert to",
        Escaped(name)
    )]
    NotFromFile {
        /// The tensor.
        name: String,
    },
    /// Only derived tensors can be discarded; a tensor opened from a file is reverted.
    #[error(
        "tensor `{}` was opened from a file: revert it to the file's bytes instead of \
         discarding it",
        Escaped(name)
    )]
    FromFile {
        /// The tensor.
        name: String,
    },
    /// A dirty tensor could not be written to the spill file; it keeps its RAM copy.
    #[error("tensor `{}` could not be spilled", Escaped(name))]
    Spill {
        /// The tensor.
        name: String,
        /// Why.
        #[source]
        source: SpillError,
    },
}

/// Not enough memory for a copy: the RAM budget, the reserve, a device's room, or the allocator itself. Nothing was allocated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Holding another RAM copy would exceed the budget, and nothing more can be evicted.
    #[error(
        "tensor `{}`: needs {} of RAM but only {} of the {} budget can be freed",
        Escaped(name), Bytes(*.requested), Bytes(*.available), Bytes(*.budget)
    )]
    OverBudget {
        /// The tensor.
        name: String,
        /// Bytes asked for.
        requested: u64,
        /// Bytes that are free or could be freed.
        available: u64,
        /// The RAM budget.
        budget: u64,
    },
    /// Keeping a new RAM copy would take available memory under the reserve, and nothing more
    /// can be evicted.
    #[error(
        "tensor `{}`: {} more of RAM would leave {} available, under the {} reserve",
        Escaped(name), Bytes(*.requested), Bytes(*.available), Bytes(*.reserve)
    )]
    UnderReserve {
        /// The tensor.
        name: String,
        /// Bytes asked for.
        requested: u64,
        /// Available memory now.
        available: u64,
        /// The reserve.
        reserve: u64,
    },
    /// The device cannot hold the tensor even after unloading every unpinned copy.
    #[error(
        "tensor `{}`: needs {} on {}, only {} can be freed",
        Escaped(name),
        Bytes(*.requested),
        Escaped(device),
        Bytes(*.available)
    )]
    DeviceFull {
        /// The tensor.
        name: String,
        /// The device's name.
        device: String,
        /// Bytes asked for.
        requested: u64,
        /// Bytes free or freeable.
        available: u64,
    },
    /// The allocator refused a RAM copy.
    #[error("tensor `{}`: cannot allocate {}", Escaped(name), Bytes(*.bytes))]
    Alloc {
        /// The tensor.
        name: String,
        /// Bytes asked for.
        bytes: u64,
    },
}

/// A tensor's bytes could not be brought back into RAM or onto a device. The tensor is where it was; retryable unless [`RestoreError::Lost`] or [`RestoreError::Recipe`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Reading a dirty tensor's spill extent failed (an I/O error, a short read). The extent
    /// is kept and the tensor is where it was: a retry may succeed.
    #[error(
        "tensor `{}`: cannot read its spilled bytes (retryable)",
        Escaped(name)
    )]
    SpillRead {
        /// The tensor.
        name: String,
        /// Why.
        #[source]
        source: SpillError,
    },
    /// A dirty tensor's bytes could not be brought back: its spill extent is corrupt (the
    /// checksum failed) and it has no recipe.
    #[error(
        "tensor `{}` is lost: its spilled bytes are corrupt and it has no recipe",
        Escaped(name)
    )]
    Lost {
        /// The tensor.
        name: String,
        /// Why.
        #[source]
        source: SpillError,
    },
    /// No copy of the tensor can serve the request: its only copy is in the tier asked for
    /// (for example a device copy asked to move to the same kind of target).
    #[error("tensor `{}`: no copy to restore a {tier:?} copy from", Escaped(name))]
    NoCopy {
        /// The tensor.
        name: String,
        /// The tier a copy was wanted in.
        tier: super::Tier,
    },
    /// Code run for the restore panicked: a recipe, a plugged-in device or source reader, or
    /// a helper thread the system refused to start. Nothing was installed and the tensor is
    /// where it was.
    #[error(
        "tensor `{}`: the restore panicked (a recipe, a device, a reader, or a thread the system refused); nothing was installed",
        Escaped(name)
    )]
    Panicked {
        /// The tensor.
        name: String,
    },
    /// Recipes nested more than 32 deep on one thread: a recipe that needs its own tensor,
    /// or a cycle of them.
    #[error(
        "tensor `{}`: its recipe needs itself (recipes nested more than 32 deep)",
        Escaped(name)
    )]
    RecipeLoop {
        /// The tensor.
        name: String,
    },
    /// A recipe produced the wrong number of bytes.
    #[error(
        "tensor `{}`: its recipe produced {}, expected {}",
        Escaped(name),
        Bytes(*.actual),
        Bytes(*.expected)
    )]
    Recipe {
        /// The tensor.
        name: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes produced.
        actual: u64,
    },
    /// A transfer to or from a device failed.
    #[error("tensor `{}`: device transfer failed", Escaped(name))]
    Device {
        /// The tensor.
        name: String,
        /// The device's error.
        #[source]
        source: crate::device::DeviceError,
    },
}

/// Errors of [`crate::Store`] operations: one enum per operation area, under this umbrella.
///
/// Match an area to handle a kind of failure (`StoreError::Memory(_)` for "no room"), or a
/// variant inside it for the details. [`StoreError::is_retryable`] says whether the same
/// call may succeed later with nothing changed by the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A handle or name that leads nowhere.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// A change of a tensor refused; the tensor is unchanged.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// Not enough memory for a copy.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A tensor's bytes could not be brought back.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// A model file could not be opened, validated or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A background thread (prefetch) could not be started.
    #[error("cannot start a background thread: {source}")]
    Thread {
        /// The error from the system.
        source: std::io::Error,
    },
    /// The store was opened in another process, which forked this one. Its spill file, its
    /// I/O queues and its threads belong to that process: the child may not use them, so
    /// every operation fails (docs/reliability.md, "Fork").
    #[error(
        "this store was opened in process {owner_pid}; a forked child (process {pid}) cannot use it: open a new Store in the child"
    )]
    Forked {
        /// The process that opened the store.
        owner_pid: u32,
        /// This process.
        pid: u32,
    },
}

impl StoreError {
    /// Whether the same call may succeed later with nothing changed by the caller: memory
    /// may be freed meanwhile, a guard dropped, a transient read or device error pass.
    /// `false` for errors of the input (handles, shapes, names), for a tensor whose bytes are
    /// lost, and for a model file that changed or is malformed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Memory(_) | StoreError::Thread { .. } => true,
            StoreError::Update(err) => {
                matches!(err, UpdateError::Pinned { .. } | UpdateError::Spill { .. })
            }
            StoreError::Restore(err) => {
                matches!(
                    err,
                    RestoreError::SpillRead { .. }
                        | RestoreError::Device { .. }
                        | RestoreError::Panicked { .. }
                )
            }
            // A read that failed may pass; a file that changed or is malformed stays so.
            StoreError::Source(err) => matches!(err, SourceError::Io { op: "read", .. }),
            StoreError::Handle(_) | StoreError::Forked { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{HandleError, StoreError};

    #[test]
    fn names_and_paths_are_shown_escaped() {
        let err = StoreError::Handle(HandleError::NoSuchTensor {
            model: PathBuf::from("dir/\u{1b}]0;title\u{7}.safetensors"),
            name: "\u{1b}[2J\r all good".into(),
        });
        let shown = err.to_string();
        assert!(!shown.contains(|c: char| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            r"dir/\u{1b}]0;title\u{7}.safetensors: no tensor named `\u{1b}[2J\u{d} all good`"
        );
    }
}
