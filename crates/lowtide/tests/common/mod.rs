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
