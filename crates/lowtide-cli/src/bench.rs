//! `lowtide bench`: lowtide's restore, drop and spill paths against raw baselines measured in
//! the same run on the same file.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use lowtide::direct::{IoShape, cached_bytes, drop_cached};
use lowtide::{AlignedBytes, ByteSize, Dtype, MemoryReading, Store};
use lowtide_testkit::{ProcIo, TensorSpec, write_gguf, write_safetensors};
use serde::Serialize;

/// Arguments of `lowtide bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Directory for the test files (default: the system temp directory). Put it on the disk
    /// you want to measure.
    dir: Option<PathBuf>,
    /// Size of the test file.
    #[arg(long, default_value = "2GiB")]
    size: ByteSize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Format of the test file: the same tensors (64 MiB each) in a safetensors or a GGUF
    /// file (F16 tensors in GGUF: restores read bytes, whatever their type).
    #[arg(long, value_enum, default_value_t = Format::Safetensors)]
    format: Format,
    /// Internal: the slower-device probe the bench runs in a throttled child process
    /// (streams the first `--size` bytes of this file's tensors and prints the shape chosen).
    #[arg(long, hide = true)]
    shape_probe: Option<PathBuf>,
}

/// The test file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// `lowtide-bench-<n>x64MiB.safetensors`, BF16 tensors.
    Safetensors,
    /// `lowtide-bench-<n>x64MiB.gguf`, F16 tensors.
    Gguf,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
        }
    }
}

/// Each tensor of the test file: 64 MiB, a large projection weight.
const TENSOR: u64 = 64 << 20;

/// Passes of the steady warm restore and of memcpy into touched memory: the best of each
/// counts (this machine's noise is larger than either's variation).
const PASSES: usize = 3;

/// Rounds of spill writes and reads, each paired with raw writes and reads.
const SPILL_ROUNDS: usize = 3;

/// The figures, as `--json` prints them.
#[derive(Debug, Default, Serialize)]
struct Figures {
    raw_read_gbps: f64,
    restore_cold_gbps: f64,
    /// Raw `O_DIRECT` read at the best shape into fresh 64 MiB allocations, as a restore
    /// must: the disk and the cost of new memory together.
    raw_read_fresh_gbps: f64,
    /// Cold restore of the whole file under `steady_budget`: every restore evicts an older
    /// copy and reuses its buffer (the steady state of a workflow), all of it with `O_DIRECT`
    /// (`keep_streamed_cached(false)`, as when memory is short).
    restore_cold_steady_gbps: f64,
    /// The same with memory free: a model larger than its budget is read through the page
    /// cache and left there, so that its next pass reads nothing from the disk.
    restore_cold_steady_kept_gbps: f64,
    /// Buffered `pread` of the cold file in 4 MiB steps into a touched buffer: what any read
    /// that leaves the file in the page cache pays.
    raw_read_buffered_gbps: f64,
    /// The shape the store's streams chose for the disk, from their own reads (`None`: still
    /// measuring when the run ended).
    stream_chunk: Option<usize>,
    stream_depth: Option<usize>,
    /// The same disk throttled to `slow_device_bps` for a child process: the shape its
    /// streams chose and the rate they reached (`None`: see `slow_device_note`).
    slow_device: Option<crate::bench_shape::Probe>,
    slow_device_bps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_device_note: Option<String>,
    /// Warm restore under `steady_budget` (buffers reused), against memcpy into touched
    /// memory.
    restore_warm_steady_gbps: f64,
    /// The same with the file cached by 128 KiB reads (small folios), as another program may
    /// leave it.
    restore_warm_small_folios_gbps: f64,
    /// `pread` of that cached file into touched 64 MiB buffers, each split over every CPU:
    /// the kernel's own copy from small folios, the row above's ceiling.
    pread_small_folios_gbps: f64,
    /// Cold fault-in of every tensor through a mapped acquire: exactly each tensor's pages.
    mmap_cold_gbps: f64,
    /// The same with `mapped_readahead(true)`: the kernel's readahead, as a plain `mmap` of
    /// the file does (neighbours enter the page cache too).
    mmap_cold_readahead_gbps: f64,
    restore_warm_gbps: f64,
    memcpy_gbps: f64,
    /// Raw `O_DIRECT` write at the best shape (`raw_write_chunk` x `raw_write_depth`) in
    /// calls of 256 MiB.
    raw_write_gbps: f64,
    /// `Store::spill` of derived 64 MiB tensors held in `AlignedBytes` (written directly).
    spill_write_gbps: f64,
    /// Spill writes of tensors derived from `Vec<u8>` (copied through a bounce buffer).
    spill_write_vec_gbps: f64,
    /// Raw `O_DIRECT` write in one call per 64 MiB tensor at the spill file's shape
    /// (`spill_chunk` x `spill_depth`), each from a buffer of its own as spilled tensors are,
    /// space reserved first: what a spill pays for the device alone, queue drains between
    /// tensors included. The spill writes' baseline.
    raw_write_per_tensor_gbps: f64,
    /// Restores of the spilled tensors into RAM (`Store::acquire_ram`; each gets a new RAM
    /// copy in new memory), right after they were spilled.
    spill_read_gbps: f64,
    /// Spilled tensors streamed back under a budget a quarter of their size, second pass:
    /// each restore evicts an older copy and reads into its buffer (a loop of patched weights
    /// larger than the budget). The spill reads' target.
    spill_read_steady_gbps: f64,
    /// Raw `O_DIRECT` read of the file the raw per-tensor write just wrote, one call per
    /// 64 MiB tensor at the spill file's shape, into one reused, touched buffer: the device
    /// alone. The spill reads' baseline.
    raw_read_per_tensor_gbps: f64,
    /// The same read (done first) into a new 64 MiB allocation per tensor, all kept, as
    /// restores keep their copies: the device and the cost of new memory together.
    raw_read_per_tensor_new_gbps: f64,
    /// The spill file's shape: requests of `spill_chunk` bytes, `spill_depth` in flight
    /// (`DiskStorage::shape_for` the bench's directory, as the store chooses by default).
    spill_chunk: usize,
    spill_depth: usize,
    /// Time `release_model` takes to return (large buffers are unmapped in the background).
    clean_drop_ms_per_gib: f64,
    /// Time until the dropped copies' memory is back with the system
    /// (`release_model` + `wait_released`).
    clean_drop_freed_ms_per_gib: f64,
    clean_drop_bytes_written: u64,
    acquire_release_ns: f64,
    // Context.
    /// Format of the test file (`safetensors` or `gguf`).
    format: &'static str,
    bytes: u64,
    /// The RAM budget of the steady-state figures: a quarter of the file, between two
    /// tensors and 512 MiB, so that each pass must evict.
    steady_budget: u64,
    raw_read_chunk: usize,
    raw_read_depth: usize,
    raw_write_chunk: usize,
    raw_write_depth: usize,
    /// memcpy into memory that is already touched (no page faults), from one 64 MiB buffer
    /// (partly in the CPU's caches), for reference.
    memcpy_hot_gbps: f64,
    /// memcpy of the file's bytes from its mapped, cached pages into one touched 64 MiB
    /// buffer, tensor by tensor (best of `PASSES`): what a warm restore copies, without the
    /// system calls. The warm steady target's baseline.
    memcpy_file_hot_gbps: f64,
    /// Time `release_model` takes to drop the mapped pages of every tensor, just faulted in
    /// (`MADV_DONTNEED` + `POSIX_FADV_DONTNEED` per tensor): when it returns, the pages are out
    /// of the process and out of the page cache, as the two figures below check.
    mapped_drop_ms_per_gib: f64,
    /// Bytes of the tensor data still in the page cache after that drop: pages that two
    /// tensors share stay (a drop releases only a tensor's own pages), at most one per tensor.
    mapped_drop_cached_after: u64,
    /// Resident file pages of the process (`RssFile`) after the drop beyond those before the
    /// fault-in.
    mapped_drop_resident_after: u64,
    /// Whether the page cache could be emptied before the cold figures.
    cold: bool,
    /// Each target of docs/performance.md against the figure it is about.
    targets: Vec<Verdict>,
}

/// One target and whether this run met it.
#[derive(Debug, Serialize)]
struct Verdict {
    figure: &'static str,
    /// The ratio or the figure the target is about.
    value: f64,
    /// The target, e.g. `>= 0.90 x raw read`.
    target: String,
    /// Whether the figure meets the target; `null` where this run cannot tell (see `note`).
    met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'static str>,
}

impl Verdict {
    fn at_least(figure: &'static str, ratio: f64, target: f64, baseline: &str) -> Self {
        Self {
            figure,
            value: ratio,
            target: format!(">= {target:.2} x {baseline}"),
            met: Some(ratio >= target),
            note: None,
        }
    }

    fn at_most(figure: &'static str, value: f64, target: f64, unit: &str) -> Self {
        Self {
            figure,
            value,
            target: format!("<= {target} {unit}"),
            met: Some(value <= target),
            note: None,
        }
    }

    /// Not judged in this run, for the reason `note`.
    fn unless(mut self, cannot_tell: bool, note: &'static str) -> Self {
        if cannot_tell {
            self.met = None;
            self.note = Some(note);
        }
        self
    }
}

/// The targets docs/performance.md states, checked against this run's figures.
fn verdicts(f: &Figures) -> Vec<Verdict> {
    const WARM: &str = "the page cache could not be emptied: the cold figure may be warm";
    const SMALL: &str =
        "the budget holds the whole file, so nothing is evicted: use a --size of 192 MiB or more";
    let small = f.steady_budget >= f.bytes;
    vec![
        Verdict::at_least(
            "cold restore into RAM",
            f.restore_cold_gbps / f.raw_read_gbps,
            0.9,
            "raw read",
        )
        .unless(!f.cold, WARM),
        Verdict::at_least(
            "cold restore, steady budget",
            f.restore_cold_steady_gbps / f.raw_read_gbps,
            0.95,
            "raw read",
        )
        .unless(!f.cold, WARM)
        .unless(small, SMALL),
        Verdict::at_least(
            "cold restore, steady budget, kept cached",
            f.restore_cold_steady_kept_gbps / f.raw_read_buffered_gbps,
            0.9,
            "buffered read",
        )
        .unless(!f.cold, WARM)
        .unless(small, SMALL),
        Verdict::at_least(
            "warm restore, steady budget",
            f.restore_warm_steady_gbps / f.memcpy_file_hot_gbps,
            0.8,
            "memcpy of the file",
        )
        .unless(small, SMALL),
        Verdict::at_least(
            "spill write",
            f.spill_write_gbps / f.raw_write_per_tensor_gbps,
            0.9,
            "raw same shape",
        ),
        Verdict::at_least(
            "spill read",
            f.spill_read_steady_gbps / f.raw_read_per_tensor_gbps,
            0.9,
            "raw same shape",
        )
        .unless(small, SMALL),
        Verdict::at_most(
            "drop clean RAM copies (returns)",
            f.clean_drop_ms_per_gib,
            1.0,
            "ms/GiB",
        ),
        Verdict::at_most(
            "bytes written by the drop",
            f.clean_drop_bytes_written as f64,
            0.0,
            "bytes",
        ),
        Verdict::at_most(
            "drop clean mapped pages",
            f.mapped_drop_ms_per_gib,
            MAPPED_DROP_TARGET,
            "ms/GiB",
        ),
        Verdict::at_most(
            "acquire + release, resident",
            f.acquire_release_ns,
            1000.0,
            "ns",
        ),
    ]
}

/// Dropping mapped pages, in ms/GiB. The kernel's work is per folio: the tensors' inner
/// 2 MiB blocks are huge folios (about 2.5 ms/GiB), the pages at each tensor's edges single
/// ones (about 150 ms per GiB of them, a 32nd of a 64 MiB tensor here); see `sys/mapping.rs`.
const MAPPED_DROP_TARGET: f64 = 10.0;

/// Resident file pages of this process (`RssFile` in `/proc/self/status`), in bytes; 0 where
/// unreadable.
fn rss_file() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssFile:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

fn fill(index: usize, buf: &mut [u8]) {
    let mut state = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Space the spill file may reserve ahead of its extents (the library reserves 256 MiB
/// ahead of a growing file).
const SPILL_AHEAD: u64 = 256 << 20;

/// What a run of `--size` needs, checked before anything is written or allocated.
#[derive(Debug)]
struct Plan {
    path: PathBuf,
    format: Format,
    count: u64,
    /// Bytes of tensor data in the test file.
    total: u64,
    /// Whether a test file of this size is there already (and is reused).
    reused: bool,
}

impl Plan {
    /// Refuses a size whose files do not fit in `dir` or whose copies do not fit in memory,
    /// naming the size and what is free.
    fn new(dir: &Path, size: u64, format: Format) -> anyhow::Result<Self> {
        let count = size.div_ceil(TENSOR).max(1);
        let total = count.saturating_mul(TENSOR);
        let path = dir.join(format!("lowtide-bench-{count}x64MiB.{}", format.name()));
        let reused = lowtide::ModelFiles::open(&path).is_ok_and(|m| m.total_bytes() == total);
        // The test file (its header is under a MiB), then the spill rounds and the raw
        // writes, one after the other: the spill file's extents and what it reserved ahead,
        // or one raw write file.
        let file = if reused {
            0
        } else {
            total.saturating_add(1 << 20)
        };
        let writes = total.min(1 << 30).saturating_add(SPILL_AHEAD);
        let disk = file.saturating_add(writes);
        let stat = rustix::fs::statvfs(dir)
            .with_context(|| format!("cannot read the free space of {}", dir.display()))?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if disk > free {
            anyhow::bail!(
                "--size {}: the bench needs {} in {} ({}{} of spill and raw writes), and {} is free",
                ByteSize(size),
                ByteSize(disk),
                dir.display(),
                if reused {
                    String::new()
                } else {
                    format!("a {} test file and ", ByteSize(total))
                },
                ByteSize(writes),
                ByteSize(free)
            );
        }
        // At its peak the bench holds the file's tensors twice: the store's copies of the
        // first cold restore and the raw read into fresh memory.
        let memory = total.saturating_mul(2).saturating_add(256 << 20);
        let available = MemoryReading::now().available;
        if memory > available {
            anyhow::bail!(
                "--size {}: the bench holds about {} in memory (the test file twice), and {} is available",
                ByteSize(size),
                ByteSize(memory),
                ByteSize(available)
            );
        }
        Ok(Self {
            path,
            format,
            count,
            total,
            reused,
        })
    }
}

/// The test model: 64 MiB BF16 tensors, reused when already there.
fn test_file(plan: &Plan) -> anyhow::Result<()> {
    if plan.reused {
        return Ok(());
    }
    let mut specs: Vec<TensorSpec> = Vec::new();
    usize::try_from(plan.count)
        .ok()
        .and_then(|count| specs.try_reserve_exact(count).ok())
        .with_context(|| format!("cannot allocate the specs of {} tensors", plan.count))?;
    let dtype = match plan.format {
        Format::Safetensors => Dtype::BF16,
        Format::Gguf => Dtype::F16,
    };
    specs.extend(
        (0..plan.count)
            .map(|i| TensorSpec::new(format!("blocks.{i}.weight"), dtype, &[4096, 8192])),
    );
    eprintln!(
        "writing the test file {} ({})",
        plan.path.display(),
        ByteSize(plan.total)
    );
    let cannot = || format!("cannot write {}", plan.path.display());
    match plan.format {
        Format::Safetensors => {
            write_safetensors(&plan.path, &specs, &BTreeMap::new(), fill).with_context(cannot)?;
        }
        Format::Gguf => {
            // 64 MiB tensors are multiples of the alignment: the data is one contiguous run.
            let meta = [(
                "general.architecture".to_owned(),
                lowtide::GgufValue::String("lowtide-bench".into()),
            )];
            write_gguf(&plan.path, &specs, &meta, fill).with_context(cannot)?;
        }
    }
    Ok(())
}

/// Empties the page cache of `path`; says whether it worked.
pub(crate) fn make_cold(path: &Path) -> anyhow::Result<bool> {
    let file = std::fs::File::open(path)?;
    drop_cached(&file)?;
    let len = file.metadata()?.len();
    Ok(cached_bytes(&file, 0, len)? <= len / 100)
}

/// Raw `O_DIRECT` sequential read of the file's data: into one reused, touched 256 MiB buffer,
/// or with `fresh`, into a new 64 MiB allocation per read, all kept (what a restore into new
/// RAM copies pays).
fn raw_read(path: &Path, start: u64, len: u64, shape: IoShape, fresh: bool) -> anyhow::Result<f64> {
    let file = lowtide::direct::open(path, false).context("O_DIRECT open")?;
    let span = if fresh {
        TENSOR
    } else {
        (256u64 << 20).min(len)
    } as usize;
    let mut reused = AlignedBytes::zeroed(span).context("memory")?;
    reused.as_mut_slice().fill(1);
    let mut kept = Vec::new();
    let begin = Instant::now();
    let mut at = start / 4096 * 4096;
    while at < start + len {
        let n = if fresh {
            let mut buf = AlignedBytes::zeroed(span).context("memory")?;
            let (n, _) = lowtide::direct::read(&file, at, &mut buf, shape)?;
            kept.push(buf);
            n
        } else {
            lowtide::direct::read(&file, at, &mut reused, shape)?.0
        };
        if n == 0 {
            break;
        }
        at += n as u64;
    }
    Ok(gbps(len, begin.elapsed().as_secs_f64()))
}

/// Raw `O_DIRECT` write of `len` bytes to a new file, space reserved first (as the spill file
/// does), in calls of 256 MiB.
fn raw_write(dir: &Path, len: u64, shape: IoShape) -> anyhow::Result<f64> {
    raw_write_in(dir, len, shape, 256 << 20, false).map(|(rate, _)| rate)
}

/// [`raw_write`] in calls of `span` bytes, each waiting for its requests: the device's queue
/// runs down at the end of every call. With `distinct`, each call writes a buffer of its own
/// (as spills write each tensor's own memory), else one buffer again and again. Returns GB/s
/// and the file, open with `O_DIRECT` (it has no name: it goes when dropped).
fn raw_write_in(
    dir: &Path,
    len: u64,
    shape: IoShape,
    span: u64,
    distinct: bool,
) -> anyhow::Result<(f64, std::fs::File)> {
    // An unnamed file (`O_TMPFILE` where the file system has it): a killed bench leaves
    // nothing. Opened again with `O_DIRECT` through its descriptor.
    let plain = tempfile::tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", plain.as_raw_fd()));
    let file = lowtide::direct::open(&by_fd, true).context("O_DIRECT open")?;
    let span = span.min(len) as usize;
    let count = if distinct {
        len.div_ceil(span as u64) as usize
    } else {
        1
    };
    let mut bufs = Vec::new();
    for i in 0..count {
        let mut buf = AlignedBytes::zeroed(span).context("memory")?;
        fill(7 + i, buf.as_mut_slice());
        bufs.push(buf);
    }
    let begin = Instant::now();
    rustix::fs::fallocate(&plain, rustix::fs::FallocateFlags::empty(), 0, len)?;
    let mut at = 0u64;
    for buf in bufs.iter().cycle() {
        if at >= len {
            break;
        }
        let n = span.min((len - at) as usize);
        lowtide::direct::write(&file, at, buf, n, shape)?;
        at += n as u64;
    }
    Ok((gbps(len, begin.elapsed().as_secs_f64()), file))
}

/// What the spill file asks of the device, without the spill file: `len` bytes written at
/// `shape` in one call per tensor, each from its own buffer, to a new file (space reserved
/// first), then read back in one
/// call per tensor at `shape` into a new 64 MiB allocation each (all kept, as restores keep
/// their copies), then again into one reused, touched buffer. Returns GB/s of each.
fn raw_per_tensor(dir: &Path, len: u64, shape: IoShape) -> anyhow::Result<(f64, f64, f64)> {
    let (write, file) = raw_write_in(dir, len, shape, TENSOR, true)?;
    let mut kept = Vec::new();
    let begin = Instant::now();
    for at in (0..len).step_by(TENSOR as usize) {
        let mut buf = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
        lowtide::direct::read(&file, at, &mut buf, shape)?;
        kept.push(buf);
    }
    let new_memory = gbps(len, begin.elapsed().as_secs_f64());
    drop(kept);
    let mut reused = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
    reused.as_mut_slice().fill(1);
    let begin = Instant::now();
    for at in (0..len).step_by(TENSOR as usize) {
        lowtide::direct::read(&file, at, &mut reused, shape)?;
    }
    Ok((write, new_memory, gbps(len, begin.elapsed().as_secs_f64())))
}

/// The best raw read over chunk sizes 1-16 MiB and queue depths 1-32, sampled on the first
/// 512 MiB of data, then measured on all of it.
fn best_raw_read(path: &Path, start: u64, len: u64) -> anyhow::Result<(f64, IoShape)> {
    let sample = (512u64 << 20).min(len);
    let mut best = (0.0, IoShape::DEFAULT);
    for chunk in [1usize << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20] {
        for depth in [1, 2, 4, 8, 16, 32] {
            let shape = IoShape { chunk, depth };
            let rate = raw_read(path, start, sample, shape, false)?;
            if rate > best.0 {
                best = (rate, shape);
            }
        }
    }
    // The full file at the best shape, twice; the better run counts.
    let full =
        raw_read(path, start, len, best.1, false)?.max(raw_read(path, start, len, best.1, false)?);
    Ok((full, best.1))
}

fn best_raw_write(dir: &Path, len: u64) -> anyhow::Result<(f64, IoShape)> {
    let sample = (256u64 << 20).min(len);
    let mut best = (0.0, IoShape::DEFAULT);
    for chunk in [1usize << 20, 4 << 20, 16 << 20] {
        for depth in [1, 8, 32] {
            let shape = IoShape { chunk, depth };
            let rate = raw_write(dir, sample, shape)?;
            if rate > best.0 {
                best = (rate, shape);
            }
        }
    }
    let full = raw_write(dir, len, best.1)?;
    Ok((full, best.1))
}

fn new_store(spill_dir: &Path, budget: u64) -> anyhow::Result<Store> {
    Ok(Store::builder()
        .ram_budget(budget)
        .spill_dir(spill_dir)
        .monitor(false)
        .build()?)
}

/// Restores every tensor into RAM as one stream, letting each go once it is there (as a
/// model larger than its budget is used); returns GB/s.
fn restore_all(store: &Store, model: lowtide::ModelId, total: u64) -> anyhow::Result<f64> {
    stream_through(store, store.tensors(model)?, total)
}

/// Restores `ids` (`total` bytes) into RAM as one stream, letting each go once it is there;
/// returns GB/s.
pub(crate) fn stream_through(
    store: &Store,
    ids: Vec<lowtide::TensorId>,
    total: u64,
) -> anyhow::Result<f64> {
    let begin = Instant::now();
    for guard in store.stream_ram(ids) {
        drop(guard?);
    }
    Ok(gbps(total, begin.elapsed().as_secs_f64()))
}

/// Buffered sequential read of the file's data in `step`-byte `pread`s into one touched
/// buffer; returns GB/s. The pages stay cached.
fn raw_buffered_read(path: &Path, start: u64, len: u64, step: usize) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(path)?;
    let mut buf = vec![1u8; step];
    let begin = Instant::now();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], start + at)?;
        at += n as u64;
    }
    Ok(gbps(len, begin.elapsed().as_secs_f64()))
}

/// `pread` of the file's data (cached) in 64 MiB pieces into one touched buffer, each piece
/// split over every CPU; returns GB/s.
fn parallel_pread(path: &Path, start: u64, len: u64) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::open(path)?;
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut buf = vec![1u8; TENSOR as usize];
    let share = buf.len().div_ceil(threads);
    let begin = Instant::now();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(TENSOR) as usize;
        std::thread::scope(|scope| -> std::io::Result<()> {
            let reads: Vec<_> = buf[..n]
                .chunks_mut(share)
                .enumerate()
                .map(|(i, part)| {
                    let file = &file;
                    let offset = start + at + (i * share) as u64;
                    scope.spawn(move || file.read_exact_at(part, offset))
                })
                .collect();
            reads
                .into_iter()
                .try_for_each(|read| read.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })?;
        at += n as u64;
    }
    Ok(gbps(len, begin.elapsed().as_secs_f64()))
}

/// Spills `bytes` of new derived tensors — in [`AlignedBytes`], or in `Vec<u8>` (written
/// through a bounce buffer) — and returns GB/s; for aligned tensors, then restores them into
/// RAM from the spill file and returns that GB/s too. The model is closed afterwards, which
/// frees the copies and the spill extents.
fn spill_round(
    store: &Store,
    path: &Path,
    bytes: u64,
    round: usize,
    aligned: bool,
) -> anyhow::Result<(f64, Option<f64>)> {
    let model = store.open_model(path)?;
    let mut derived = Vec::new();
    for i in 0..bytes / TENSOR {
        let name = format!("patched.{round}.{aligned}.{i}");
        let seed = 100 + i as usize;
        let id = if aligned {
            let mut buf = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
            fill(seed, buf.as_mut_slice());
            store.derive(model, &name, Dtype::U8, &[TENSOR as usize], buf)?
        } else {
            let mut buf = Vec::new();
            buf.try_reserve_exact(TENSOR as usize)
                .context("cannot allocate a tensor")?;
            buf.resize(TENSOR as usize, 0);
            fill(seed, &mut buf);
            store.derive(model, &name, Dtype::U8, &[TENSOR as usize], buf)?
        };
        derived.push(id);
    }
    let begin = Instant::now();
    for &id in &derived {
        store.spill(id)?;
    }
    let write = gbps(bytes, begin.elapsed().as_secs_f64());
    let read = if aligned {
        // The copies the spills gave back must be gone first, as the raw read's memory is.
        store.wait_released();
        let before = store.stats().bytes_restored_spill;
        let begin = Instant::now();
        for &id in &derived {
            drop(store.acquire_ram(id)?);
        }
        let rate = gbps(bytes, begin.elapsed().as_secs_f64());
        let restored = store.stats().bytes_restored_spill - before;
        anyhow::ensure!(
            restored == bytes,
            "the spill read restored {} from the spill file, not {}",
            ByteSize(restored),
            ByteSize(bytes)
        );
        Some(rate)
    } else {
        None
    };
    store.close_model(model)?;
    store.wait_released();
    Ok((write, read))
}

/// Spills `bytes` of derived 64 MiB tensors one by one through a store whose budget holds a
/// quarter of them, then streams them back twice; returns GB/s read from the spill file in
/// the second pass, in which every restore evicts an older copy (already spilled: dropped)
/// and reads into its buffer.
fn spill_steady_read(dir: &Path, path: &Path, bytes: u64, round: usize) -> anyhow::Result<f64> {
    let store = new_store(dir, (bytes / 4).max(2 * TENSOR))?;
    let model = store.open_model(path)?;
    let mut ids = Vec::new();
    for i in 0..bytes / TENSOR {
        let mut buf = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
        fill(200 + i as usize, buf.as_mut_slice());
        let name = format!("steady.{round}.{i}");
        let id = store.derive(model, &name, Dtype::U8, &[TENSOR as usize], buf)?;
        store.spill(id)?;
        ids.push(id);
    }
    store.wait_released();
    stream_through(&store, ids.clone(), bytes)?;
    // The copies the budget kept from the first pass are not read again (the policy keeps a
    // budget's worth of a loop): the rate counts the bytes read from the spill file.
    let before = store.stats().bytes_restored_spill;
    let rate = stream_through(&store, ids, bytes)?;
    // Nothing read: the budget held all of it (a small run, which the verdict says).
    let restored = store.stats().bytes_restored_spill - before;
    Ok(rate * restored as f64 / bytes as f64)
}

/// memcpy of every tensor of `model` from its mapped pages (the file warm) into one touched
/// buffer, best of `PASSES`; returns GB/s.
fn memcpy_mapped(store: &Store, model: lowtide::ModelId, total: u64) -> anyhow::Result<f64> {
    let ids = store.tensors(model)?;
    let mut dst = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
    dst.as_mut_slice().fill(1);
    let mut best = 0.0f64;
    for pass in 0..=PASSES {
        let begin = Instant::now();
        for &id in &ids {
            // SAFETY: the bench's own test file, which nothing changes while it runs.
            let guard = unsafe { store.acquire_mapped(id) }?;
            let n = guard.len().min(dst.as_slice().len());
            dst.as_mut_slice()[..n].copy_from_slice(&guard[..n]);
            std::hint::black_box(&dst);
        }
        // The first pass faults the mapping in.
        if pass > 0 {
            best = best.max(gbps(total, begin.elapsed().as_secs_f64()));
        }
    }
    Ok(best)
}

/// memcpy of `total` bytes in tensor-sized pieces: into fresh allocations (what a restore
/// must also pay for), and into one already-touched buffer (best of `PASSES`).
fn memcpy(total: u64) -> anyhow::Result<(f64, f64)> {
    let mut src = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
    fill(3, src.as_mut_slice());
    let count = total / TENSOR;
    let begin = Instant::now();
    let mut keep = Vec::new();
    for _ in 0..count {
        let mut dst = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
        dst.as_mut_slice().copy_from_slice(src.as_slice());
        keep.push(dst);
    }
    let fresh = gbps(total, begin.elapsed().as_secs_f64());
    drop(keep);
    let mut dst = AlignedBytes::zeroed(TENSOR as usize).context("memory")?;
    dst.as_mut_slice().fill(1);
    let mut hot = 0.0f64;
    for _ in 0..PASSES {
        let begin = Instant::now();
        for _ in 0..count {
            dst.as_mut_slice().copy_from_slice(src.as_slice());
            std::hint::black_box(&dst);
        }
        hot = hot.max(gbps(total, begin.elapsed().as_secs_f64()));
    }
    Ok((fresh, hot))
}

#[allow(clippy::too_many_lines)]
fn measure(dir: &Path, plan: &Plan) -> anyhow::Result<Figures> {
    test_file(plan)?;
    let (path, total) = (plan.path.clone(), plan.total);
    let start = lowtide::Source::open(&path)?.data_start();
    let gib = total as f64 / f64::from(1u32 << 30);
    let mut f = Figures {
        format: plan.format.name(),
        bytes: total,
        ..Figures::default()
    };

    eprintln!("raw O_DIRECT read: sweeping chunk sizes and queue depths");
    let (raw, shape) = best_raw_read(&path, start, total)?;
    (f.raw_read_gbps, f.raw_read_chunk, f.raw_read_depth) = (raw, shape.chunk, shape.depth);

    // The first restore comes before any other large allocation of this run, so that its
    // memory is as fresh as a new process's (no pages this run freed just before).
    eprintln!("cold restore into RAM");
    f.cold = make_cold(&path)?;
    let store = new_store(dir, total * 2 + (1 << 30))?;
    let model = store.open_model(&path)?;
    f.restore_cold_gbps = restore_all(&store, model, total)?;
    let stats = store.stats();
    // The first tensor shares a page with the header, which opening read from the cache.
    if stats.bytes_read_cold + (64 << 10) < total {
        f.cold = false;
    }
    // While the store holds its copies: new memory again.
    f.raw_read_fresh_gbps = raw_read(&path, start, total, shape, true)?;

    f.steady_budget = (total / 4).clamp(2 * TENSOR, 512 << 20);
    eprintln!(
        "cold restore under a {} budget (buffers reused)",
        ByteSize(f.steady_budget)
    );
    {
        let steady = Store::builder()
            .ram_budget(f.steady_budget)
            .spill_dir(dir)
            .monitor(false)
            .keep_streamed_cached(false)
            .build()?;
        let model = steady.open_model(&path)?;
        // A first pass fills the budget and the pool, and lets the streams choose their
        // shape for this disk; the second is measured.
        f.cold &= make_cold(&path)?;
        restore_all(&steady, model, total)?;
        f.cold &= make_cold(&path)?;
        f.restore_cold_steady_gbps = restore_all(&steady, model, total)?;
        if let Some(chosen) = steady.read_shapes().first().filter(|d| d.settled) {
            (f.stream_chunk, f.stream_depth) = (Some(chosen.shape.chunk), Some(chosen.shape.depth));
        }
    }
    // A quarter of the file (at most 768 MiB) at a sixteenth of the raw speed: a few seconds.
    #[allow(clippy::cast_sign_loss)] // clamped to non-negative
    {
        f.slow_device_bps = (f.raw_read_gbps.max(0.0) * 1e9 / 16.0) as u64;
    }
    eprintln!(
        "the same disk throttled to {} MB/s for a child process (block I/O cgroup)",
        f.slow_device_bps / 1_000_000
    );
    match crate::bench_shape::throttled(&path, (total / 4).min(768 << 20), f.slow_device_bps) {
        Ok(probe) => f.slow_device = Some(probe),
        Err(note) => f.slow_device_note = Some(note),
    }

    eprintln!("the same with memory free (read through the page cache, kept there)");
    {
        let steady = new_store(dir, f.steady_budget)?;
        let model = steady.open_model(&path)?;
        f.cold &= make_cold(&path)?;
        f.restore_cold_steady_kept_gbps = restore_all(&steady, model, total)?;
        f.cold &= make_cold(&path)?;
        f.raw_read_buffered_gbps = raw_buffered_read(&path, start, total, 4 << 20)?;
        make_cold(&path)?;
    }

    eprintln!("dropping clean RAM copies");
    let (io_before, written_before) = (ProcIo::read(), store.stats().bytes_written);
    let begin = Instant::now();
    store.release_model(model)?;
    f.clean_drop_ms_per_gib = begin.elapsed().as_secs_f64() * 1e3 / gib;
    store.wait_released();
    f.clean_drop_freed_ms_per_gib = begin.elapsed().as_secs_f64() * 1e3 / gib;
    let io_after = ProcIo::read();
    f.clean_drop_bytes_written = store.stats().bytes_written - written_before
        + match (io_before, io_after) {
            (Some(a), Some(b)) => b.write_bytes.saturating_sub(a.write_bytes),
            _ => 0,
        };

    eprintln!("cold restore by mmap fault-in");
    f.cold &= make_cold(&path)?;
    let ids = store.tensors(model)?;
    let resident_before = rss_file();
    let begin = Instant::now();
    for &id in &ids {
        store.fault_in(id)?;
    }
    f.mmap_cold_gbps = gbps(total, begin.elapsed().as_secs_f64());

    eprintln!("releasing mapped pages");
    let begin = Instant::now();
    let dropped = store.release_model(model)?;
    f.mapped_drop_ms_per_gib = begin.elapsed().as_secs_f64() * 1e3 / gib;
    anyhow::ensure!(
        dropped.mapped_bytes + (ids.len() as u64 + 1) * 4096 >= total,
        "release_model released {} mapped bytes of {total}",
        dropped.mapped_bytes
    );
    f.mapped_drop_cached_after = cached_bytes(&std::fs::File::open(&path)?, start, total)?;
    f.mapped_drop_resident_after = rss_file().saturating_sub(resident_before);

    eprintln!("cold restore by mmap fault-in, kernel readahead");
    f.cold &= make_cold(&path)?;
    let readahead = Store::builder()
        .ram_budget(1 << 30)
        .spill_dir(dir)
        .monitor(false)
        .mapped_readahead(true)
        .build()?;
    let mapped = readahead.open_model(&path)?;
    let begin = Instant::now();
    for id in readahead.tensors(mapped)? {
        readahead.fault_in(id)?;
    }
    f.mmap_cold_readahead_gbps = gbps(total, begin.elapsed().as_secs_f64());
    drop(readahead);

    eprintln!("warm restore (from the page cache) and memcpy");
    // Warm the cache again (releasing mapped pages dropped them) as a store's streams leave
    // a file they keep cached: read in 4 MiB steps.
    make_cold(&path)?;
    raw_buffered_read(&path, start, total, 4 << 20)?;
    (f.memcpy_gbps, f.memcpy_hot_gbps) = memcpy(total)?;
    f.restore_warm_gbps = restore_all(&store, model, total)?;
    {
        let steady = new_store(dir, f.steady_budget)?;
        let model = steady.open_model(&path)?;
        restore_all(&steady, model, total)?;
        for _ in 0..PASSES {
            let rate = restore_all(&steady, model, total)?;
            f.restore_warm_steady_gbps = f.restore_warm_steady_gbps.max(rate);
        }
    }
    // After the restores: the mapping shares the cache's pages, and letting it go later
    // drops them.
    f.memcpy_file_hot_gbps = memcpy_mapped(&store, model, total)?;
    store.release_model(model)?;

    eprintln!("warm restore, the file cached by 128 KiB reads");
    // As another program's small reads leave a file, which the kernel copies from more slowly
    // (docs/performance.md), whoever asks: the row's baseline is the kernel's own `pread`.
    make_cold(&path)?;
    raw_buffered_read(&path, start, total, 128 << 10)?;
    {
        let steady = new_store(dir, f.steady_budget)?;
        let model = steady.open_model(&path)?;
        restore_all(&steady, model, total)?;
        for _ in 0..PASSES {
            let rate = restore_all(&steady, model, total)?;
            f.restore_warm_small_folios_gbps = f.restore_warm_small_folios_gbps.max(rate);
        }
    }
    f.pread_small_folios_gbps = (0..PASSES)
        .map(|_| parallel_pread(&path, start, total))
        .try_fold(0.0f64, |best, rate| rate.map(|rate| best.max(rate)))?;

    eprintln!("acquire + release of a resident tensor");
    let id = ids[0];
    drop(store.acquire_ram(id)?);
    let rounds = 1_000_000u32;
    let begin = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(store.acquire_ram(id)?);
    }
    f.acquire_release_ns = begin.elapsed().as_secs_f64() * 1e9 / f64::from(rounds);
    store.release_model(model)?;
    drop(store);

    eprintln!("spill writes and reads against raw O_DIRECT writes and reads");
    let spill_bytes = total.min(1 << 30);
    let spill_shape = lowtide::DiskStorage::shape_for(dir);
    (f.spill_chunk, f.spill_depth) = (spill_shape.chunk, spill_shape.depth);
    let (best_write, wshape) = best_raw_write(dir, spill_bytes)?;
    (f.raw_write_gbps, f.raw_write_chunk, f.raw_write_depth) =
        (best_write, wshape.chunk, wshape.depth);
    let store = new_store(dir, spill_bytes * 2)?;
    // Three rounds, each followed by the raw writes and reads again: the best of each counts
    // (the disk's speed drifts, and the first spill also creates the file and its buffers).
    for round in 0..SPILL_ROUNDS {
        let (write, read) = spill_round(&store, &path, spill_bytes, round, true)?;
        f.spill_write_gbps = f.spill_write_gbps.max(write);
        f.spill_read_gbps = f.spill_read_gbps.max(read.unwrap_or(0.0));
        f.spill_read_steady_gbps =
            f.spill_read_steady_gbps
                .max(spill_steady_read(dir, &path, spill_bytes, round)?);
        let (write_vec, _) = spill_round(&store, &path, spill_bytes, round, false)?;
        f.spill_write_vec_gbps = f.spill_write_vec_gbps.max(write_vec);
        f.raw_write_gbps = f.raw_write_gbps.max(raw_write(dir, spill_bytes, wshape)?);
        let (write, read_new, read) = raw_per_tensor(dir, spill_bytes, spill_shape)?;
        f.raw_write_per_tensor_gbps = f.raw_write_per_tensor_gbps.max(write);
        f.raw_read_per_tensor_new_gbps = f.raw_read_per_tensor_new_gbps.max(read_new);
        f.raw_read_per_tensor_gbps = f.raw_read_per_tensor_gbps.max(read);
    }

    // The disk's speed drifts within a run (and a virtual disk may be cached by its host):
    // the raw read is measured again at the end, and the better figure is the baseline.
    eprintln!("raw O_DIRECT read again");
    let again = raw_read(&path, start, total, shape, false)?;
    f.raw_read_gbps = f.raw_read_gbps.max(again);
    f.targets = verdicts(&f);
    Ok(f)
}

/// One row: figure, value, baseline, ratio, and the target with its verdict.
fn row(name: &str, value: &str, baseline: Option<(&str, f64, f64)>, verdict: Option<&Verdict>) {
    let (base, ratio) = baseline.map_or((String::new(), String::new()), |(b, v, base)| {
        (format!("{b} {base:.2}"), format!("{:.2}", v / base))
    });
    let (target, met) = verdict.map_or((String::new(), ""), |v| {
        let met = match v.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not judged (see below)",
        };
        (v.target.clone(), met)
    });
    println!("{name:<34} {value:>12} {base:>22} {ratio:>6}  {target:<24} {met}");
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(path) = &args.shape_probe {
        return crate::bench_shape::probe(path, args.size.bytes());
    }
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let plan = Plan::new(&dir, args.size.bytes(), args.format)?;
    let f = measure(&dir, &plan)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        print_table(&f, &dir);
    }
    Ok(())
}

fn print_table(f: &Figures, dir: &Path) {
    println!(
        "lowtide bench: {} {} in {}; page cache {}",
        ByteSize(f.bytes),
        f.format,
        dir.display(),
        if f.cold {
            "emptied before each cold figure"
        } else {
            "could NOT be emptied: the cold figures may be warm"
        }
    );
    println!(
        "{:<34} {:>12} {:>22} {:>6}  {:<24} verdict",
        "figure", "value", "baseline", "ratio", "target"
    );
    print_read_rows(f);
    print_write_rows(f);
    let count = |met| f.targets.iter().filter(|v| v.met == Some(met)).count();
    println!(
        "targets: {} met, {} not met, of {}",
        count(true),
        count(false),
        f.targets.len()
    );
    for v in &f.targets {
        if let Some(note) = v.note {
            println!("not judged: {}: {note}", v.figure);
        }
    }
}

/// The rows of reads: raw, restores, fault-ins, memcpy.
fn print_read_rows(f: &Figures) {
    let target = |figure: &str| f.targets.iter().find(|v| v.figure == figure);
    let gb = |v: f64| format!("{v:.2} GB/s");
    row(
        &format!(
            "raw O_DIRECT read ({} MiB x {})",
            f.raw_read_chunk >> 20,
            f.raw_read_depth
        ),
        &gb(f.raw_read_gbps),
        None,
        None,
    );
    row(
        "cold restore into RAM",
        &gb(f.restore_cold_gbps),
        Some(("raw read", f.restore_cold_gbps, f.raw_read_gbps)),
        target("cold restore into RAM"),
    );
    row(
        &format!("cold restore, {} budget", ByteSize(f.steady_budget)),
        &gb(f.restore_cold_steady_gbps),
        Some(("raw read", f.restore_cold_steady_gbps, f.raw_read_gbps)),
        target("cold restore, steady budget"),
    );
    if let (Some(chunk), Some(depth)) = (f.stream_chunk, f.stream_depth) {
        row(
            &format!("  shape its streams chose: {} MiB x {depth}", chunk >> 20),
            "",
            None,
            None,
        );
    }
    print_slow_device_rows(f);
    row(
        "raw buffered read (4 MiB preads)",
        &gb(f.raw_read_buffered_gbps),
        None,
        None,
    );
    row(
        "  kept cached (memory free)",
        &gb(f.restore_cold_steady_kept_gbps),
        Some((
            "buffered read",
            f.restore_cold_steady_kept_gbps,
            f.raw_read_buffered_gbps,
        )),
        target("cold restore, steady budget, kept cached"),
    );
    row(
        "raw read into fresh memory",
        &gb(f.raw_read_fresh_gbps),
        Some(("raw read", f.raw_read_fresh_gbps, f.raw_read_gbps)),
        None,
    );
    row(
        "cold restore by mmap fault-in",
        &gb(f.mmap_cold_gbps),
        Some(("raw read", f.mmap_cold_gbps, f.raw_read_gbps)),
        None,
    );
    row(
        "mmap fault-in, kernel readahead",
        &gb(f.mmap_cold_readahead_gbps),
        Some(("raw read", f.mmap_cold_readahead_gbps, f.raw_read_gbps)),
        None,
    );
    print_warm_rows(f);
}

/// The warm restores and their memcpy baselines.
fn print_warm_rows(f: &Figures) {
    let target = |figure: &str| f.targets.iter().find(|v| v.figure == figure);
    let gb = |v: f64| format!("{v:.2} GB/s");
    row(
        "warm restore (page cache)",
        &gb(f.restore_warm_gbps),
        Some(("memcpy", f.restore_warm_gbps, f.memcpy_gbps)),
        None,
    );
    row(
        &format!("warm restore, {} budget", ByteSize(f.steady_budget)),
        &gb(f.restore_warm_steady_gbps),
        Some((
            "memcpy of the file",
            f.restore_warm_steady_gbps,
            f.memcpy_file_hot_gbps,
        )),
        target("warm restore, steady budget"),
    );
    row(
        "  file cached by 128 KiB reads",
        &gb(f.restore_warm_small_folios_gbps),
        Some((
            "pread ceiling",
            f.restore_warm_small_folios_gbps,
            f.pread_small_folios_gbps,
        )),
        None,
    );
    row(
        "  pread of it, all CPUs (ceiling)",
        &gb(f.pread_small_folios_gbps),
        Some((
            "memcpy of the file",
            f.pread_small_folios_gbps,
            f.memcpy_file_hot_gbps,
        )),
        None,
    );
    row(
        "memcpy of the file (mapped, warm)",
        &gb(f.memcpy_file_hot_gbps),
        None,
        None,
    );
    row("memcpy into fresh memory", &gb(f.memcpy_gbps), None, None);
    row(
        "memcpy into touched memory",
        &gb(f.memcpy_hot_gbps),
        None,
        None,
    );
}

/// The rows of the throttled disk.
fn print_slow_device_rows(f: &Figures) {
    match (&f.slow_device, &f.slow_device_note) {
        (Some(slow), _) => {
            row(
                &format!("throttled to {} MB/s", f.slow_device_bps / 1_000_000),
                &format!("{:.2} GB/s", slow.gbps),
                None,
                None,
            );
            row(
                &format!(
                    "  shape its streams chose: {} MiB x {}{}",
                    slow.chunk >> 20,
                    slow.depth,
                    if slow.settled { "" } else { " (measuring)" }
                ),
                "",
                None,
                None,
            );
        }
        (None, Some(note)) => println!("throttled disk not measured: {note}"),
        (None, None) => {}
    }
}

/// The rows of writes, drops and acquires.
fn print_write_rows(f: &Figures) {
    let target = |figure: &str| f.targets.iter().find(|v| v.figure == figure);
    let gb = |v: f64| format!("{v:.2} GB/s");
    row(
        &format!(
            "raw O_DIRECT write ({} MiB x {})",
            f.raw_write_chunk >> 20,
            f.raw_write_depth
        ),
        &gb(f.raw_write_gbps),
        None,
        None,
    );
    let shape = format!("{} MiB x {}", f.spill_chunk >> 20, f.spill_depth);
    row(
        &format!("raw write, {shape}, per tensor"),
        &gb(f.raw_write_per_tensor_gbps),
        Some(("raw write", f.raw_write_per_tensor_gbps, f.raw_write_gbps)),
        None,
    );
    row(
        &format!("spill write ({shape})"),
        &gb(f.spill_write_gbps),
        Some((
            "raw same shape",
            f.spill_write_gbps,
            f.raw_write_per_tensor_gbps,
        )),
        target("spill write"),
    );
    row(
        "spill write from Vec<u8> (bounce)",
        &gb(f.spill_write_vec_gbps),
        Some((
            "raw same shape",
            f.spill_write_vec_gbps,
            f.raw_write_per_tensor_gbps,
        )),
        None,
    );
    row(
        &format!("raw read, {shape}, per tensor"),
        &gb(f.raw_read_per_tensor_gbps),
        None,
        None,
    );
    row(
        "  into new memory",
        &gb(f.raw_read_per_tensor_new_gbps),
        Some((
            "raw read",
            f.raw_read_per_tensor_new_gbps,
            f.raw_read_per_tensor_gbps,
        )),
        None,
    );
    row(
        &format!("spill read, steady ({shape})"),
        &gb(f.spill_read_steady_gbps),
        Some((
            "raw same shape",
            f.spill_read_steady_gbps,
            f.raw_read_per_tensor_gbps,
        )),
        target("spill read"),
    );
    row(
        "  into new memory",
        &gb(f.spill_read_gbps),
        Some((
            "raw, new memory",
            f.spill_read_gbps,
            f.raw_read_per_tensor_new_gbps,
        )),
        None,
    );
    print_drop_rows(f);
}

/// The rows of drops and acquires.
fn print_drop_rows(f: &Figures) {
    let target = |figure: &str| f.targets.iter().find(|v| v.figure == figure);
    row(
        "drop clean RAM copies (returns)",
        &format!("{:.2} ms/GiB", f.clean_drop_ms_per_gib),
        None,
        target("drop clean RAM copies (returns)"),
    );
    row(
        "  until the memory is back",
        &format!("{:.2} ms/GiB", f.clean_drop_freed_ms_per_gib),
        None,
        None,
    );
    row(
        "  bytes written by the drop",
        &f.clean_drop_bytes_written.to_string(),
        None,
        target("bytes written by the drop"),
    );
    row(
        "drop clean mapped pages",
        &format!("{:.2} ms/GiB", f.mapped_drop_ms_per_gib),
        None,
        target("drop clean mapped pages"),
    );
    row(
        "  tensor bytes still cached",
        &f.mapped_drop_cached_after.to_string(),
        None,
        None,
    );
    row(
        "  file pages still resident",
        &f.mapped_drop_resident_after.to_string(),
        None,
        None,
    );
    row(
        "acquire + release, resident",
        &format!("{:.0} ns", f.acquire_release_ns),
        None,
        target("acquire + release, resident"),
    );
}
