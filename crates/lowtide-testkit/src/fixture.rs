//! Models and directories for tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{TensorSpec, synth, write_safetensors};

/// A new temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// The small UNet-like set the tests use: [`synth::small_unet`].
pub fn unet_specs(prefix: &str) -> Vec<TensorSpec> {
    synth::small_unet(prefix)
}

/// Writes `specs` to `path` (metadata `format: pt`), each tensor's bytes its
/// [`synth::pattern`]; returns `path`.
pub fn write(path: &Path, specs: &[TensorSpec]) -> PathBuf {
    let metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    write_safetensors(path, specs, &metadata, |i, buf| {
        synth::pattern(&specs[i].name, buf);
    })
    .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    path.to_path_buf()
}

/// Writes the [`unet_specs`] model as `unet.safetensors` in `dir`.
pub fn unet(dir: &tempfile::TempDir) -> PathBuf {
    write(&dir.path().join("unet.safetensors"), &unet_specs(""))
}
