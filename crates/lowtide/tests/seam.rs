//! The spill file's storage seam with a fault-injecting storage: a write that blocks (no lock
//! is held across it), a full disk at byte N, `EIO`, short reads and flipped bits — each
//! caused deterministically, each leaving every tensor where it was.

mod common;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use lowtide::{Dtype, Recipe, Storage, StorageFile, Store, StoreError, Tier};

/// Faults a [`FaultyStorage`] causes, switched on and off by the test.
#[derive(Debug, Default)]
struct Faults {
    /// `allocate` fails with `ENOSPC` for any range reaching past this byte.
    full_at: AtomicU64,
    /// Writes fail with `EIO`.
    write_eio: AtomicBool,
    /// Reads fail with `EIO`.
    read_eio: AtomicBool,
    /// Reads return half of what was asked.
    short_reads: AtomicBool,
    /// Reads flip one bit of what they return.
    flip_bits: AtomicBool,
    /// The next write waits on this barrier twice: once on arrival (the test knows the write
    /// has started), once before it writes (the test lets it go).
    block_next_write: Mutex<Option<Arc<Barrier>>>,
}

#[derive(Debug)]
struct FaultyStorage(Arc<Faults>);

impl Storage for FaultyStorage {
    fn create(&self, _dir: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(MemFile {
            faults: Arc::clone(&self.0),
            bytes: Mutex::default(),
        }))
    }
}

/// A spill file in memory.
#[derive(Debug)]
struct MemFile {
    faults: Arc<Faults>,
    bytes: Mutex<Vec<u8>>,
}

impl StorageFile for MemFile {
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let full_at = self.faults.full_at.load(Ordering::SeqCst);
        if full_at > 0 && offset + len > full_at {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut bytes = self.bytes.lock().unwrap();
        let end = (offset + len) as usize;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        let end = ((offset + len) as usize).min(bytes.len());
        if (offset as usize) < end {
            bytes[offset as usize..end].fill(0);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, src: &[u8]) -> io::Result<()> {
        let barrier = self.faults.block_next_write.lock().unwrap().take();
        if let Some(barrier) = barrier {
            barrier.wait();
            barrier.wait();
        }
        if self.faults.write_eio.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        assert_eq!(offset % lowtide::STORAGE_BLOCK, 0, "unaligned write offset");
        assert_eq!(
            src.len() as u64 % lowtide::STORAGE_BLOCK,
            0,
            "unaligned write length"
        );
        let mut bytes = self.bytes.lock().unwrap();
        let end = offset as usize + src.len();
        assert!(end <= bytes.len(), "write past the allocated space");
        bytes[offset as usize..end].copy_from_slice(src);
        Ok(())
    }

    fn read_at(&self, offset: u64, dst: &mut [u8]) -> io::Result<usize> {
        if self.faults.read_eio.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let bytes = self.bytes.lock().unwrap();
        let start = (offset as usize).min(bytes.len());
        let mut n = (bytes.len() - start).min(dst.len());
        if self.faults.short_reads.load(Ordering::SeqCst) {
            n /= 2;
        }
        dst[..n].copy_from_slice(&bytes[start..start + n]);
        if self.faults.flip_bits.load(Ordering::SeqCst) && n > 0 {
            dst[n / 2] ^= 0x10;
        }
        Ok(n)
    }
}

struct Fixture {
    store: Store,
    faults: Arc<Faults>,
    model: lowtide::ModelId,
    _dir: tempfile::TempDir,
}

fn fixture(budget: u64) -> Fixture {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let faults = Arc::new(Faults::default());
    let store = Store::builder()
        .ram_budget(budget)
        .spill_storage(Arc::new(FaultyStorage(Arc::clone(&faults))))
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    Fixture {
        store,
        faults,
        model,
        _dir: dir,
    }
}

fn derived(f: &Fixture, name: &str, len: usize) -> (lowtide::TensorId, Vec<u8>) {
    let bytes = common::expected(name, len as u64);
    let id = f
        .store
        .derive(f.model, name, Dtype::U8, &[len], bytes.clone())
        .unwrap();
    (id, bytes)
}

/// Runs `f` on another thread and fails the test (instead of hanging) if it does not finish.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!("{what} did not complete: a lock is held across the blocked write")
        })
}

#[test]
fn a_blocked_spill_write_stalls_no_other_operation() {
    let f = fixture(64 << 20);
    let store = f.store.clone();
    // Resident tensors with RAM copies, and a derived tensor already in the spill file.
    let resident = store.tensors(f.model).unwrap();
    for &id in &resident {
        drop(store.acquire_ram(id).unwrap());
    }
    let (spilled, spilled_bytes) = derived(&f, "already.spilled", 3 << 20);
    assert!(store.spill(spilled).unwrap() > 0);
    let (blocked, blocked_bytes) = derived(&f, "being.spilled", 5 << 20);

    let barrier = Arc::new(Barrier::new(2));
    *f.faults.block_next_write.lock().unwrap() = Some(Arc::clone(&barrier));
    let spill_thread = {
        let store = store.clone();
        std::thread::spawn(move || store.spill(blocked))
    };
    // The spill's write has started and is now blocked.
    barrier.wait();

    let done = within(
        "guards, a spill restore and stats during a blocked spill",
        {
            let store = store.clone();
            let resident = resident.clone();
            move || {
                for _ in 0..100 {
                    for &id in &resident {
                        let guard = store.acquire_ram(id).unwrap();
                        assert_eq!(guard.tier(), Tier::Ram);
                        drop(guard);
                    }
                }
                // Another tensor comes back from the spill file meanwhile.
                let restored = store.acquire_ram(spilled).unwrap();
                let bytes = restored.to_vec();
                drop(restored);
                let info = store.info(blocked).unwrap();
                (bytes, store.stats(), info)
            }
        },
    );
    let (bytes, stats, info) = done;
    assert_eq!(bytes, spilled_bytes, "restored bytes");
    assert!(stats.acquires > 0);
    assert!(
        info.in_ram && !info.spilled,
        "the blocked spill has not committed"
    );
    // A guard of the tensor being spilled can be taken too: its RAM copy is still there.
    let during = within("a guard of the tensor being spilled", {
        let store = store.clone();
        move || store.acquire_ram(blocked).map(|g| g.to_vec())
    });
    assert_eq!(during.unwrap(), blocked_bytes);

    barrier.wait();
    let freed = spill_thread.join().unwrap().unwrap();
    assert_eq!(freed, blocked_bytes.len() as u64, "the spill committed");
    let info = store.info(blocked).unwrap();
    assert!(info.spilled && !info.in_ram);
    assert_eq!(store.acquire_ram(blocked).unwrap().to_vec(), blocked_bytes);
}

#[test]
fn a_full_disk_at_byte_n_leaves_the_tensor_in_ram() {
    let f = fixture(64 << 20);
    let (small, _) = derived(&f, "fits", 100 << 10);
    let (large, bytes) = derived(&f, "does.not.fit", 4 << 20);
    f.faults.full_at.store(1 << 20, Ordering::SeqCst);
    assert!(f.store.spill(small).unwrap() > 0, "below byte N: spilled");
    let err = f.store.spill(large).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Update(lowtide::UpdateError::Spill {
                source: lowtide::SpillError::NoSpace { .. },
                ..
            })
        ),
        "{err}"
    );
    let info = f.store.info(large).unwrap();
    assert!(info.in_ram && !info.spilled);
    // An eviction that cannot spill keeps the copy and says so.
    let outcome = f.store.free_memory(u64::MAX);
    assert!(outcome.spill_failures >= 1, "{outcome:?}");
    assert_eq!(f.store.acquire_ram(large).unwrap().to_vec(), bytes);
    assert_eq!(f.store.stats().bytes_written, 100 << 10);
    // Room again: the same spill works.
    f.faults.full_at.store(0, Ordering::SeqCst);
    assert!(f.store.spill(large).unwrap() > 0);
    assert_eq!(f.store.acquire_ram(large).unwrap().to_vec(), bytes);
}

#[test]
fn a_failed_write_keeps_the_copy_and_frees_its_space() {
    let f = fixture(64 << 20);
    let (id, bytes) = derived(&f, "eio.on.write", 1 << 20);
    f.faults.write_eio.store(true, Ordering::SeqCst);
    let err = f.store.spill(id).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Update(lowtide::UpdateError::Spill {
                source: lowtide::SpillError::Io { .. },
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(f.store.spill_used(), 0, "the reservation is given back");
    f.faults.write_eio.store(false, Ordering::SeqCst);
    assert_eq!(f.store.acquire_ram(id).unwrap().to_vec(), bytes);
}

#[test]
fn read_errors_are_retryable_and_keep_the_extent() {
    let f = fixture(64 << 20);
    let (id, bytes) = derived(&f, "read.faults", 2 << 20);
    f.store.spill(id).unwrap();
    for fault in [&f.faults.read_eio, &f.faults.short_reads] {
        fault.store(true, Ordering::SeqCst);
        let err = f.store.acquire_ram(id).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Restore(lowtide::RestoreError::SpillRead { .. })
            ),
            "{err}"
        );
        let info = f.store.info(id).unwrap();
        assert!(info.spilled && !info.in_ram && info.pins == 0, "{info:?}");
        fault.store(false, Ordering::SeqCst);
    }
    assert_eq!(
        f.store.acquire_ram(id).unwrap().to_vec(),
        bytes,
        "the retry succeeds"
    );
}

#[test]
fn flipped_bits_are_lost_without_a_recipe_and_recomputed_with_one() {
    let f = fixture(64 << 20);
    let (plain, _) = derived(&f, "no.recipe", 1 << 20);
    let expected = common::expected("with.recipe", 1 << 20);
    let again = expected.clone();
    let with_recipe = f
        .store
        .derive_with_recipe(
            f.model,
            "with.recipe",
            Dtype::U8,
            &[1 << 20],
            expected.clone(),
            // Dearer than a spill, so it is spilled rather than dropped.
            Recipe::new(10.0, move || again.clone()),
        )
        .unwrap();
    f.store.spill(plain).unwrap();
    f.store.spill(with_recipe).unwrap();
    f.faults.flip_bits.store(true, Ordering::SeqCst);
    let err = f.store.acquire_ram(plain).unwrap_err();
    assert!(
        matches!(err, StoreError::Restore(lowtide::RestoreError::Lost { .. })),
        "{err}"
    );
    assert_eq!(f.store.acquire_ram(with_recipe).unwrap().to_vec(), expected);
    let stats = f.store.stats();
    assert_eq!(stats.checksum_failures, 2);
    assert_eq!(stats.recomputes, 1);
}

/// Model-file reads through a fault-injecting [`lowtide::SourceIo`].
#[derive(Debug, Default)]
struct FaultySource {
    eio: AtomicBool,
    short: AtomicBool,
    reads: AtomicU64,
    direct_reads: AtomicU64,
}

impl lowtide::SourceIo for FaultySource {
    fn read_direct(&self, file: &std::fs::File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.direct_reads.fetch_add(1, Ordering::SeqCst);
        if self.eio.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let n = lowtide::FileIo.read_direct(file, offset, buf)?;
        Ok(if self.short.load(Ordering::SeqCst) {
            n / 2
        } else {
            n
        })
    }

    fn read_cached(&self, file: &std::fs::File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.eio.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.short.load(Ordering::SeqCst) {
            let half = buf.len() / 2;
            lowtide::FileIo.read_cached(file, offset, &mut buf[..half])?;
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        lowtide::FileIo.read_cached(file, offset, buf)
    }
}

#[test]
fn model_file_read_faults_are_errors_and_leave_nothing_behind() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let faults = Arc::new(FaultySource::default());
    let store = Store::builder()
        .ram_budget(64 << 20)
        .source_io(faults.clone())
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    let name = "mid_block.resnets.0.conv1.weight";
    let id = store.tensor(model, name).unwrap();
    let len = store.info(id).unwrap().len;
    for (fault, cold) in [
        (&faults.eio, false),
        (&faults.eio, true),
        (&faults.short, false),
        (&faults.short, true),
    ] {
        if cold {
            // Cold: the bytes come with O_DIRECT.
            lowtide::direct::drop_cached(&std::fs::File::open(&path).unwrap()).unwrap();
        }
        fault.store(true, Ordering::SeqCst);
        let err = store.acquire_ram(id).unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Source(lowtide::SourceError::Io { op: "read", .. })
            ),
            "{err}"
        );
        assert!(err.is_retryable(), "{err}");
        let info = store.info(id).unwrap();
        assert!(!info.in_ram && info.pins == 0 && info.clean, "{info:?}");
        assert_eq!(
            store.stats().anon_bytes,
            0,
            "nothing held after a failed read"
        );
        fault.store(false, Ordering::SeqCst);
    }
    assert!(faults.reads.load(Ordering::SeqCst) >= 4);
    assert!(
        faults.direct_reads.load(Ordering::SeqCst) >= 2,
        "the cold cases read with O_DIRECT"
    );
    let guard = store.acquire_ram(id).unwrap();
    assert_eq!(
        guard.to_vec(),
        common::expected(name, len),
        "the retry reads the right bytes"
    );
}

/// Model-file reads that wait on a barrier the first time: the test knows a restore is under
/// way, and lets it go.
#[derive(Debug)]
struct BlockingSource {
    barrier: Arc<Barrier>,
    blocked: AtomicBool,
}

impl BlockingSource {
    fn block_once(&self) {
        if !self.blocked.swap(true, Ordering::SeqCst) {
            self.barrier.wait();
            self.barrier.wait();
        }
    }
}

impl lowtide::SourceIo for BlockingSource {
    fn read_direct(&self, file: &std::fs::File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.block_once();
        lowtide::FileIo.read_direct(file, offset, buf)
    }

    fn read_cached(&self, file: &std::fs::File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.block_once();
        lowtide::FileIo.read_cached(file, offset, buf)
    }
}

#[test]
fn a_prefetch_is_cancelled_while_another_thread_waits_for_it() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let barrier = Arc::new(Barrier::new(2));
    let store = Store::builder()
        .ram_budget(64 << 20)
        .source_io(Arc::new(BlockingSource {
            barrier: Arc::clone(&barrier),
            blocked: AtomicBool::new(false),
        }))
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    let count = store.tensors(model).unwrap().len();
    let prefetch = store.prefetch(model).unwrap();
    let cancel = prefetch.canceller();
    let waiter = std::thread::spawn(move || prefetch.wait());
    // The first tensor's read has started and waits.
    barrier.wait();
    cancel.cancel();
    barrier.wait();
    let outcome = waiter.join().unwrap().unwrap();
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(
        outcome.tensors >= 1 && (outcome.tensors as usize) < count,
        "{outcome:?}"
    );
}
