//! Helpers for lowtide's tests, benchmarks and tools, kept out of the library's API.
//!
//! - Safetensors writers ([`write_safetensors`], [`create_safetensors`]) that name a file only
//!   once it is complete.
//! - [`synth`]: the synthetic models, deterministic bytes with realistic shapes.
//! - Fixtures for tests: temporary directories, models written with [`synth::pattern`] bytes
//!   ([`write()`], [`unet()`]) and file systems mounted for a test ([`Mount`]).
//! - The process's own counters in `/proc/self` ([`ProcIo`], [`ProcMemory`]), which the
//!   `lowtide` command reports and tests check.

mod fixture;
mod mount;
mod procfs;
pub mod synth;
mod writer;

pub use fixture::{tempdir, unet, unet_specs, write};
pub use mount::Mount;
pub use procfs::{ProcIo, ProcMemory};
pub use synth::{expected, pattern};
pub use writer::{CreateOutcome, TensorSpec, create_safetensors, write_safetensors};
