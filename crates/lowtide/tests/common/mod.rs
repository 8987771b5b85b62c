//! Test helpers: the shared fixtures of `lowtide-testkit` (temp dirs, synthetic safetensors
//! files with realistic shapes) and the tests' own contract for mapped guards.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub use lowtide_testkit::{
    Mount, TensorSpec, expected, pattern as fill, tempdir, unet, unet_specs, write,
};

/// A view of the tensor's mapped file pages (`Store::acquire_mapped`).
pub fn mapped(
    store: &lowtide::Store,
    id: lowtide::TensorId,
) -> Result<lowtide::TensorGuard, lowtide::StoreError> {
    // SAFETY: the tests write their model files themselves and change one only while no
    // mapped guard over it lives (the reliability tests change it between guards, and check
    // that the next acquire refuses it).
    unsafe { store.acquire_mapped(id) }
}

/// Opens `path` and empties its page cache: the file, its length and the bytes still cached,
/// or `None` (with a message saying why the test is skipped) where the kernel kept them.
pub fn cold(path: &std::path::Path) -> Option<(std::fs::File, u64, u64)> {
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    lowtide::direct::drop_cached(&file).unwrap();
    let cached = lowtide::direct::cached_bytes(&file, 0, len).unwrap();
    if cached > len / 4 {
        println!("skipped: the page cache kept {cached} of {len} bytes after POSIX_FADV_DONTNEED");
        return None;
    }
    Some((file, len, cached))
}

/// A store with a RAM budget of `budget` bytes and no monitor thread.
pub fn store(budget: u64) -> lowtide::Store {
    lowtide::Store::builder()
        .ram_budget(budget)
        .monitor(false)
        .build()
        .unwrap()
}

/// Writes `dir/file`: `n` F32 tensors `blocks.{i}.w` of `mib` MiB each, after one small
/// odd-sized tensor (`odd`, written first so that the others do not start on block
/// boundaries; last in name order). Returns its path.
pub fn odd_start_model(
    dir: &std::path::Path,
    file: &str,
    n: usize,
    mib: u64,
) -> std::path::PathBuf {
    let mut specs = vec![TensorSpec::new("odd", lowtide::Dtype::F32, &[3, 5])];
    specs.extend((0..n).map(|i| {
        TensorSpec::new(
            format!("blocks.{i}.w"),
            lowtide::Dtype::F32,
            &[mib * 256, 1024],
        )
    }));
    write(&dir.join(file), &specs)
}

/// Empties the file's page cache; `false` (with a message saying why the test is skipped)
/// where the kernel kept any of it: the tests that count queued reads need all of it cold.
pub fn all_cold(path: &std::path::Path) -> bool {
    match cold(path) {
        Some((_, _, 0)) => true,
        Some((_, len, cached)) => {
            println!("skipped: the page cache kept {cached} of {len} bytes");
            false
        }
        None => false,
    }
}

/// The names of those of `ids` that a guard pins now.
pub fn pinned(store: &lowtide::Store, ids: &[lowtide::TensorId]) -> Vec<String> {
    ids.iter()
        .map(|&id| store.info(id).unwrap())
        .filter(|info| info.pins > 0)
        .map(|info| info.name)
        .collect()
}
