//! lowtide keeps the weights of machine-learning models in the fastest memory that fits, and
//! when host RAM runs low lets them ebb back to disk without writing what the disk already holds.
//!
//! The flow:
//!
//! ```no_run
//! use lowtide::{Store, ByteSize};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::builder().ram_budget("8GiB".parse::<ByteSize>()?.bytes()).build()?;
//! let model = store.open_model("unet.safetensors")?;       // validated, mapped, nothing read
//! let weight = store.tensor(model, "conv_in.weight")?;
//! {
//!     let bytes = store.acquire_ram(weight)?;               // an owned copy, pinned
//!     println!("{} bytes", bytes.len());
//! }                                                          // guard dropped: evictable again
//! store.drop_clean(weight)?;                                 // frees it, writes nothing
//! # Ok(()) }
//! ```
//!
//! A tensor's bytes live in one or more *copies*: an owned RAM buffer (counted against the RAM
//! budget) or the model file's own mapped pages (which the kernel reclaims without writing).
//! A tensor is *clean* while its bytes equal its extent in the file and *dirty* once derived or
//! patched; only dirty bytes ever need to be written anywhere.

#![deny(unsafe_op_in_unsafe_fn)]

mod aligned;
mod device;
pub mod direct;
mod dtype;
mod element;
mod governor;
mod ids;
pub mod policy;
mod size;
mod source;
mod spill;
mod stats;
mod store;
mod sys;
mod text;

pub use aligned::AlignedBytes;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
pub use device::{Device, DeviceAlloc, DeviceError, SimDevice};
pub use dtype::{Block, Dtype, UnknownDtype};
pub use element::Element;
pub use governor::{CgroupMemory, CgroupVersion, EvictReason, MemoryReading, PressureTrigger};
pub use half::{bf16, f16};
pub use policy::{DefaultPolicy, Evicting, EvictionPolicy, Fate, Priority};
pub use size::{ByteSize, ParseSizeError};
pub use source::{
    Change, FileIdentity, FileIo, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, GgufArray, GgufError,
    GgufString, GgufTensorInfo, GgufValue, GgufValueType, HeaderError, IndexError,
    MAX_GGUF_ARRAY_DEPTH, MAX_GGUF_ARRAY_LEN, MAX_GGUF_DIMS, MAX_GGUF_HEADER_LEN, MAX_GGUF_KEYS,
    MAX_GGUF_STRING_LEN, MAX_GGUF_TENSORS, MAX_HEADER_LEN, ModelFiles, Source, SourceError,
    SourceFormat, SourceIo, SourceTensor, TensorLocation,
};
pub use spill::{DiskStorage, STORAGE_BLOCK, SpillError, Storage, StorageFile};
pub use stats::StatsSnapshot;
pub use store::{
    ConfigError, DeviceGuard, DeviceId, DeviceShape, DeviceStream, DropOutcome, FreeOutcome,
    HandleError, LoadOutcome, MemoryError, ModelId, Prefetch, PrefetchCancel, PrefetchOutcome,
    RamStream, Recipe, RestoreError, Store, StoreBuilder, StoreError, StreamStats, TensorBytes,
    TensorGuard, TensorId, TensorInfo, Tier, UnloadOutcome, UpdateError, ViewError, scratch_bytes,
};
pub use sys::open::{FileKind, NotRegularFile, open_regular_file};
pub use text::{Escaped, EscapedPath};

/// Parsers exposed for fuzzing and property tests.
pub mod parse {
    pub use crate::source::parse_index_json;

    /// Validates a whole safetensors file image held in memory, as [`crate::Source::open`]
    /// validates a file. Never panics.
    pub fn safetensors_image(bytes: &[u8]) -> Result<Vec<crate::SourceTensor>, crate::HeaderError> {
        crate::source::parse_image(bytes)
    }

    /// Validates a whole GGUF file image held in memory, as [`crate::Source::open`] validates
    /// a GGUF file: the header and the tensors in the order of their data. Never panics.
    pub fn gguf_image(
        bytes: &[u8],
    ) -> Result<(crate::Gguf, Vec<crate::SourceTensor>), crate::GgufError> {
        crate::source::parse_gguf_image(bytes)
    }
}
