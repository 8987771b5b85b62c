//! How the spill file splits a tensor's read or write into requests: chosen for the device
//! under the spill directory, or given with `StoreBuilder::spill_io_shape`.
//!
//! The spill file moves one tensor at a time, so the shape is all the queue depth it gets.
//! The default fills the device's queue with requests it takes whole: a chunk as large as
//! the block layer passes on without splitting (`queue/max_sectors_kb` in sysfs, a power of
//! two within 1-16 MiB), and as many of them as make [`IN_FLIGHT`] bytes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sys::direct::{BLOCK, IoShape};

/// Bytes in flight of a default shape: what 4 MiB x 8, the shape restores use, keeps in
/// flight.
const IN_FLIGHT: usize = 32 << 20;

/// The smallest and largest chunk of a default shape.
const MIN_CHUNK: usize = 1 << 20;
const MAX_CHUNK: usize = 16 << 20;

/// The largest chunk and depth a given shape keeps (an io_uring ring of the direct I/O
/// engine holds at most 64 entries).
const CHUNK_LIMIT: usize = 64 << 20;
const DEPTH_LIMIT: usize = 64;

/// The default shape for a spill file in `dir`: see the module documentation. Where sysfs
/// does not describe the device (tmpfs, overlay, network file systems), 4 MiB x 8.
pub(crate) fn for_dir(dir: &Path) -> IoShape {
    largest_request(dir).map_or(IoShape::DEFAULT, for_largest_request)
}

/// The default shape for a device whose queue takes requests of up to `max` bytes whole.
fn for_largest_request(max: u64) -> IoShape {
    let chunk = usize::try_from(max)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CHUNK, MAX_CHUNK);
    // A power of two: the largest one not above the device's limit.
    let chunk = 1 << chunk.ilog2();
    IoShape {
        chunk,
        depth: (IN_FLIGHT / chunk).max(2),
    }
}

/// The largest request the block device holding `dir` takes whole, from sysfs
/// (`/sys/dev/block/MAJOR:MINOR/queue/max_sectors_kb`; a partition's queue is its disk's).
fn largest_request(dir: &Path) -> Option<u64> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let node = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    ));
    let kib = ["queue/max_sectors_kb", "../queue/max_sectors_kb"]
        .iter()
        .find_map(|queue| std::fs::read_to_string(node.join(queue)).ok())?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&kib| kib > 0)?;
    kib.checked_mul(1024)
}

/// `shape` made usable: the chunk rounded up to whole blocks, within one block and 64 MiB;
/// the depth within 1 and 64.
pub(crate) fn normalized(shape: IoShape) -> IoShape {
    let block = BLOCK as usize;
    IoShape {
        chunk: shape.chunk.clamp(block, CHUNK_LIMIT).div_ceil(block) * block,
        depth: shape.depth.clamp(1, DEPTH_LIMIT),
    }
}

#[cfg(test)]
mod tests {
    use super::{IoShape, for_dir, for_largest_request, normalized};

    fn shape(chunk: usize, depth: usize) -> IoShape {
        IoShape { chunk, depth }
    }

    #[test]
    fn the_default_fills_the_queue_with_requests_the_device_takes_whole() {
        // virtio-blk and many SATA disks: 4 MiB; NVMe: often 128-512 KiB; some arrays more.
        assert_eq!(for_largest_request(4 << 20), IoShape::DEFAULT);
        assert_eq!(for_largest_request(1280 << 10), shape(1 << 20, 32));
        assert_eq!(for_largest_request(128 << 10), shape(1 << 20, 32));
        assert_eq!(for_largest_request(8 << 20), shape(8 << 20, 4));
        assert_eq!(for_largest_request(32 << 30), shape(16 << 20, 2));
        assert_eq!(for_largest_request(u64::MAX), shape(16 << 20, 2));
    }

    #[test]
    fn a_directory_without_a_block_device_gets_the_restore_shape() {
        assert_eq!(for_dir("/proc".as_ref()), IoShape::DEFAULT);
        assert_eq!(for_dir("/nonexistent/spill".as_ref()), IoShape::DEFAULT);
        // Whatever the machine's disk says, the shape is one the default rule can give.
        let dir = tempfile::tempdir().unwrap();
        let here = for_dir(dir.path());
        assert!(here.chunk.is_power_of_two() && (1 << 20..=16 << 20).contains(&here.chunk));
        assert_eq!(here.chunk * here.depth, 32 << 20);
    }

    #[test]
    fn a_given_shape_is_made_usable() {
        assert_eq!(normalized(IoShape::DEFAULT), IoShape::DEFAULT);
        assert_eq!(normalized(shape(0, 0)), shape(4096, 1));
        assert_eq!(normalized(shape(5000, 3)), shape(8192, 3));
        assert_eq!(normalized(shape(1 << 30, 1000)), shape(64 << 20, 64));
    }
}
