//! Helpers for lowtide's tests, benchmarks and tools, kept out of the library's API.
//!
//! - Safetensors writers ([`write_safetensors`], [`create_safetensors`]) that name a file only
//!   once it is complete.
//! - GGUF writers ([`write_gguf`], [`gguf_image`]) for synthetic GGUF files.
//! - [`synth`]: the synthetic models, deterministic bytes with realistic shapes.
//! - Fixtures for tests: temporary directories, models written with [`synth::pattern`] bytes
//!   ([`write()`], [`unet()`]) and file systems mounted for a test ([`Mount`]).
//! - The reference GGUF files ([`gguf_reference_files`]) and a JSON comparison for them.
//! - The process's own counters in `/proc/self` ([`ProcIo`], [`ProcMemory`]), which the
//!   `lowtide` command reports and tests check.

mod fixture;
mod gguf;
mod mount;
mod procfs;
mod reference;
pub mod synth;
mod writer;

pub use fixture::{tempdir, unet, unet_specs, write};
pub use gguf::{GgufLayout, encode_gguf_value, gguf_header, gguf_image, write_gguf};
pub use mount::Mount;
pub use procfs::{ProcIo, ProcMemory};
pub use reference::{gguf_reference_files, run_reference_writer, same_json};
pub use synth::{expected, pattern};
pub use writer::{CreateOutcome, TensorSpec, create_safetensors, write_safetensors};
