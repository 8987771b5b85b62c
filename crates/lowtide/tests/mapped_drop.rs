//! Dropping clean mapped tensors takes their pages out of this process and out of the page
//! cache: checked page by page (`/proc/self/pagemap`, `cachestat`/`mincore`) and in the
//! process's resident file pages. A binary of its own: it reads the process's resident memory.

mod common;

use lowtide::direct::cached_bytes;
use lowtide::{Dtype, Store};
use lowtide_testkit::TensorSpec;

const PAGE: u64 = 4096;

/// How many of the pages at `[addr, addr + len)` are mapped in this process (bit 63 of each
/// `/proc/self/pagemap` entry; unprivileged readers get it too), or `None` where unreadable.
fn mapped_pages(addr: usize, len: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt as _;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let pages = usize::try_from(len / PAGE).unwrap();
    let mut entries = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut entries, addr as u64 / PAGE * 8)
        .ok()?;
    Some(
        entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count() as u64,
    )
}

/// `RssFile` of `/proc/self/status`, in bytes.
fn rss_file() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssFile:"))?;
    let kib: u64 = line["RssFile:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[test]
fn dropped_mapped_tensors_leave_the_process_and_the_page_cache() {
    let dir = common::tempdir();
    // Tensors of several MiB (each holds aligned 2 MiB blocks and unaligned edges) between
    // tiny ones, back to back, so that every boundary falls inside a page.
    let specs: Vec<TensorSpec> = (0..7u64)
        .map(|i| {
            let shape: &[u64] = match i % 2 {
                0 => &[3, 250 + i],
                _ => &[2600 + 7 * i, 1300],
            };
            TensorSpec::new(format!("blocks.{i}.w"), Dtype::BF16, shape)
        })
        .collect();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let Some((file, _, _)) = common::cold(&path) else {
        return;
    };
    let source = lowtide::Source::open(&path).unwrap();
    // Each tensor's own pages (shared with no neighbour): what a drop may release.
    let own = |i: usize| {
        let t = source.tensor(&specs[i].name).unwrap();
        let start = t.offset.div_ceil(PAGE) * PAGE;
        let end = (t.offset + t.len) / PAGE * PAGE;
        (t.offset, start, end.saturating_sub(start))
    };
    let store = Store::builder().monitor(false).build().unwrap();
    let model = store.open_model(&path).unwrap();
    let ids = store.tensors(model).unwrap();
    let rss_before = rss_file();

    let large = [1usize, 3, 5];
    let mut views = Vec::new();
    for &i in &large {
        let guard = common::mapped(&store, ids[i]).unwrap();
        assert_eq!(
            &guard[..],
            &common::expected(&specs[i].name, guard.len() as u64)[..]
        );
        // The address of the tensor's first own page in the mapping.
        let (offset, start, len) = own(i);
        let addr = guard.as_ptr() as usize + usize::try_from(start - offset).unwrap();
        drop(guard);
        assert_eq!(
            cached_bytes(&file, start, len).unwrap(),
            len,
            "tensor {i} is in the page cache"
        );
        if let Some(mapped) = mapped_pages(addr, len) {
            assert_eq!(mapped, len / PAGE, "tensor {i} is mapped in this process");
        }
        views.push((i, addr, start, len));
    }
    for i in (0..specs.len()).filter(|i| !large.contains(i)) {
        let (_, start, len) = own(i);
        assert_eq!(
            cached_bytes(&file, start, len).unwrap(),
            0,
            "tensor {i} was never acquired, yet cached"
        );
    }
    let rss_faulted = rss_file();

    let outcome = store.release_model(model).unwrap();
    let released: u64 = views.iter().map(|v| v.3).sum();
    assert_eq!(outcome.mapped_bytes, released);
    for &(i, addr, start, len) in &views {
        assert_eq!(
            cached_bytes(&file, start, len).unwrap(),
            0,
            "tensor {i}: its pages are still in the page cache after the drop"
        );
        if let Some(mapped) = mapped_pages(addr, len) {
            assert_eq!(mapped, 0, "tensor {i}: pages still mapped after the drop");
        }
    }
    if let (Some(before), Some(faulted), Some(after)) = (rss_before, rss_faulted, rss_file()) {
        assert!(
            faulted >= before + released - (1 << 20),
            "resident file pages {before} -> {faulted} after faulting {released} bytes in"
        );
        assert!(
            after + released - (1 << 20) <= faulted,
            "resident file pages {faulted} -> {after} after dropping {released} bytes"
        );
    }
}
