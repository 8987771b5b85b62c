//! Concurrency benchmark: acquire + release of resident tensors on 1, 2 and 4 threads, idle
//! and while another thread spills a large derived tensor and restores it, over and over.
//!
//! Figures, for each thread count:
//! - idle throughput (acquire + release per second, all workers together);
//! - throughput while the spill loop runs, over its whole window and within spill writes only
//!   (operations that started and ended inside one `Store::spill` call, per second of spill
//!   time), and the ratio of each to idle;
//! - the longest single acquire + release, and its 99.9th percentile, among the operations that
//!   overlapped a spill write (and, apart, a restore);
//! - how long each spill and each restore took.
//!
//! Targets: the longest acquire + release during a spill write at most 100 us, and throughput
//! within spill writes at least half of idle. The verdicts are printed, never asserted.
//!
//! Run: `cargo bench -p lowtide --bench concurrency` (a 1 GiB tensor, 2 s per phase), or a
//! quick run with `cargo bench -p lowtide --bench concurrency -- --size 256MiB --secs 1`.
//! Options (or environment variables): `--size` (`LOWTIDE_BENCH_SIZE`), `--secs`
//! (`LOWTIDE_BENCH_SECS`), `--threads 1,2,4` (`LOWTIDE_BENCH_THREADS`), `--dir`
//! (`LOWTIDE_BENCH_DIR`, where the model and spill files go; default: a temp directory under
//! `$TMPDIR` or `/tmp`, which should be on a disk, not tmpfs).
//!
//! Benches link lowtide with the `strict` feature (the dev-dependency turns it on), which
//! checks the invariants after every change of the registry. Acquiring and releasing a tensor
//! that has a RAM copy changes nothing that is checked, so the workers' figures do not include
//! it; spills and restores do, and it is O(number of tensors): 65 here, small next to 1 GiB of
//! I/O. Each worker's operation is timed with two `Instant::now()` calls, which are included in
//! the throughput, idle and during the spill alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lowtide::direct::AlignedBytes;
use lowtide::{ByteSize, Dtype, Store, TensorId};
use lowtide_testkit::{TensorSpec, write_safetensors};

const RESIDENT: usize = 64;
const RESIDENT_LEN: u64 = 64 << 10;
const MAX_LATENCY_TARGET_US: f64 = 100.0;
const RATIO_TARGET: f64 = 0.5;

struct Options {
    size: u64,
    secs: f64,
    threads: Vec<usize>,
    dir: Option<PathBuf>,
    /// A name filter that leaves this bench out (`cargo bench -p lowtide -- restore` passes
    /// `restore` to every bench target of the crate).
    filtered_out: bool,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let env = |name: &str| std::env::var(name).ok();
        let mut size = env("LOWTIDE_BENCH_SIZE").unwrap_or_else(|| "1GiB".into());
        let mut secs = env("LOWTIDE_BENCH_SECS").unwrap_or_else(|| "2".into());
        let mut threads = env("LOWTIDE_BENCH_THREADS").unwrap_or_else(|| "1,2,4".into());
        let mut dir = env("LOWTIDE_BENCH_DIR");
        let mut filters = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let slot = match key.as_str() {
                // cargo passes `--bench` to every bench target.
                "--bench" => continue,
                "--size" => &mut size,
                "--secs" => &mut secs,
                "--threads" => &mut threads,
                "--dir" => dir.get_or_insert_with(String::new),
                _ if !arg.starts_with('-') => {
                    filters.push(arg);
                    continue;
                }
                _ => bail!(
                    "unknown argument `{arg}`; options: --size 1GiB --secs 2 --threads 1,2,4 \
                     --dir PATH"
                ),
            };
            *slot = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .with_context(|| format!("{key} needs a value"))?,
            };
        }
        let size = size
            .parse::<ByteSize>()
            .with_context(|| format!("--size {size}"))?
            .bytes();
        let secs: f64 = secs.parse().with_context(|| format!("--secs {secs}"))?;
        if size == 0 || !secs.is_finite() || secs <= 0.0 {
            bail!("--size and --secs must be positive");
        }
        let threads = threads
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .with_context(|| format!("--threads {n}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if threads.contains(&0) {
            bail!("--threads: each count must be at least 1");
        }
        Ok(Self {
            size,
            secs,
            threads,
            dir: dir.map(PathBuf::from),
            filtered_out: !filters.is_empty()
                && !filters.iter().any(|f| "concurrency".contains(f.as_str())),
        })
    }
}

/// Latencies in nanoseconds, log-linear buckets (32 per power of two, within about 3%), and the
/// exact maximum.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    const SUB: u32 = 5;

    fn new() -> Self {
        Self {
            counts: vec![0; 64 << Self::SUB],
            total: 0,
            max: 0,
        }
    }

    fn bucket(ns: u64) -> usize {
        let linear = 2u64 << Self::SUB;
        if ns < linear {
            return ns as usize;
        }
        let exp = ns.ilog2();
        let sub = (ns >> (exp - Self::SUB)) & ((1 << Self::SUB) - 1);
        (linear + u64::from(exp - Self::SUB - 1) * (1 << Self::SUB) + sub) as usize
    }

    /// The largest value that falls in `bucket`.
    fn upper(bucket: usize) -> u64 {
        let linear = 2usize << Self::SUB;
        if bucket < linear {
            return bucket as u64;
        }
        let step = bucket - linear;
        let exp = (step >> Self::SUB) as u32 + Self::SUB + 1;
        let sub = (step & ((1 << Self::SUB) - 1)) as u64;
        (((1 << Self::SUB) + sub + 1) << (exp - Self::SUB)) - 1
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    fn max_us(&self) -> f64 {
        self.max as f64 / 1e3
    }

    /// The 99.9th percentile (rounded up to its bucket's top, at most the maximum).
    fn p999_us(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = (self.total * 999).div_ceil(1000).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::upper(bucket).min(self.max) as f64 / 1e3;
            }
        }
        self.max_us()
    }
}

/// What the spill loop is doing: each counter is odd while a spill (a restore) is in progress.
#[derive(Default)]
struct Phase {
    spill: AtomicU64,
    restore: AtomicU64,
}

/// One worker's figures.
struct Worker {
    ops: u64,
    /// Operations that overlapped neither a spill nor a restore.
    quiet: Histogram,
    /// Operations that overlapped a spill write.
    spill: Histogram,
    /// Operations that started and ended within one spill write.
    inside_spill: u64,
    /// Operations that overlapped a restore (and no spill).
    restore: Histogram,
    /// Operations that started and ended within one restore.
    inside_restore: u64,
}

fn work(
    store: &Store,
    ids: &[TensorId],
    offset: usize,
    phase: &Phase,
    stop: &AtomicBool,
) -> anyhow::Result<Worker> {
    let mut w = Worker {
        ops: 0,
        quiet: Histogram::new(),
        spill: Histogram::new(),
        inside_spill: 0,
        restore: Histogram::new(),
        inside_restore: 0,
    };
    let mut i = offset;
    while !stop.load(Ordering::Relaxed) {
        let id = ids[i % ids.len()];
        i += 1;
        let (s0, r0) = (
            phase.spill.load(Ordering::Acquire),
            phase.restore.load(Ordering::Acquire),
        );
        let begin = Instant::now();
        drop(store.acquire_ram(id)?);
        let ns = begin.elapsed().as_nanos() as u64;
        let (s1, r1) = (
            phase.spill.load(Ordering::Acquire),
            phase.restore.load(Ordering::Acquire),
        );
        w.ops += 1;
        if s0 % 2 == 1 || s0 != s1 {
            w.spill.record(ns);
            if s0 % 2 == 1 && s0 == s1 {
                w.inside_spill += 1;
            }
        } else if r0 % 2 == 1 || r0 != r1 {
            w.restore.record(ns);
            if r0 % 2 == 1 && r0 == r1 {
                w.inside_restore += 1;
            }
        } else {
            w.quiet.record(ns);
        }
    }
    Ok(w)
}

/// The spill loop's figures: the duration of each spill and each restore.
#[derive(Default)]
struct SpillLoop {
    spills: Vec<Duration>,
    restores: Vec<Duration>,
}

/// Spills `big` and restores it (acquire + release, which reads it back from the spill file),
/// alternately, until `secs` have passed and at least once; ends with the tensor in RAM.
fn spill_loop(store: &Store, big: TensorId, secs: f64, phase: &Phase) -> anyhow::Result<SpillLoop> {
    let mut figures = SpillLoop::default();
    let begin = Instant::now();
    while figures.spills.is_empty() || begin.elapsed().as_secs_f64() < secs {
        phase.spill.fetch_add(1, Ordering::AcqRel);
        let start = Instant::now();
        let freed = store.spill(big);
        figures.spills.push(start.elapsed());
        phase.spill.fetch_add(1, Ordering::AcqRel);
        if freed.context("spill")? == 0 {
            bail!("the derived tensor was not spilled (it had no RAM copy to write)");
        }

        phase.restore.fetch_add(1, Ordering::AcqRel);
        let start = Instant::now();
        let restored = store.acquire_ram(big).map(drop);
        figures.restores.push(start.elapsed());
        phase.restore.fetch_add(1, Ordering::AcqRel);
        restored.context("restore from the spill file")?;
    }
    Ok(figures)
}

/// One phase on `threads` workers: idle (no spill loop) or with the spill loop.
struct Run {
    window: Duration,
    workers: Vec<Worker>,
    spill_loop: Option<SpillLoop>,
}

fn run(
    store: &Store,
    ids: &[TensorId],
    big: TensorId,
    threads: usize,
    secs: f64,
    spilling: bool,
) -> anyhow::Result<Run> {
    let phase = Phase::default();
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (phase, stop, start) = (&phase, &stop, &start);
                scope.spawn(move || {
                    start.wait();
                    work(store, ids, t * 17, phase, stop)
                })
            })
            .collect();
        start.wait();
        let begin = Instant::now();
        let spill_loop = if spilling {
            Some(spill_loop(store, big, secs, &phase))
        } else {
            thread::sleep(Duration::from_secs_f64(secs));
            None
        };
        stop.store(true, Ordering::Relaxed);
        let window = begin.elapsed();
        let workers = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Run {
            window,
            workers,
            spill_loop: spill_loop.transpose()?,
        })
    })
}

/// The figures of one thread count, as printed and as written in the JSON line.
struct Row {
    threads: usize,
    idle_ops_per_s: f64,
    idle_max_us: f64,
    idle_p999_us: f64,
    window_ops_per_s: f64,
    window_ratio: f64,
    in_spill_ops_per_s: f64,
    in_spill_ratio: f64,
    in_restore_ops_per_s: f64,
    spill_ops: u64,
    spill_max_us: f64,
    spill_p999_us: f64,
    restore_max_us: f64,
    restore_p999_us: f64,
    spill_ms: Vec<f64>,
    restore_ms: Vec<f64>,
}

fn merged(workers: &[Worker], pick: impl Fn(&Worker) -> &Histogram) -> Histogram {
    let mut all = Histogram::new();
    for w in workers {
        all.merge(pick(w));
    }
    all
}

fn row(threads: usize, idle: &Run, busy: &Run) -> Row {
    let ops = |r: &Run| r.workers.iter().map(|w| w.ops).sum::<u64>() as f64;
    let idle_ops_per_s = ops(idle) / idle.window.as_secs_f64();
    let window_ops_per_s = ops(busy) / busy.window.as_secs_f64();
    let idle_hist = merged(&idle.workers, |w| &w.quiet);
    let spill_hist = merged(&busy.workers, |w| &w.spill);
    let restore_hist = merged(&busy.workers, |w| &w.restore);
    let spill_loop = busy.spill_loop.as_ref().expect("the busy run spills");
    let spill_secs: f64 = spill_loop.spills.iter().map(Duration::as_secs_f64).sum();
    let inside: u64 = busy.workers.iter().map(|w| w.inside_spill).sum();
    let in_spill_ops_per_s = inside as f64 / spill_secs;
    let restore_secs: f64 = spill_loop.restores.iter().map(Duration::as_secs_f64).sum();
    let inside: u64 = busy.workers.iter().map(|w| w.inside_restore).sum();
    let ms = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    Row {
        threads,
        idle_ops_per_s,
        idle_max_us: idle_hist.max_us(),
        idle_p999_us: idle_hist.p999_us(),
        window_ops_per_s,
        window_ratio: window_ops_per_s / idle_ops_per_s,
        in_spill_ops_per_s,
        in_spill_ratio: in_spill_ops_per_s / idle_ops_per_s,
        in_restore_ops_per_s: inside as f64 / restore_secs,
        spill_ops: spill_hist.total,
        spill_max_us: spill_hist.max_us(),
        spill_p999_us: spill_hist.p999_us(),
        restore_max_us: restore_hist.max_us(),
        restore_p999_us: restore_hist.p999_us(),
        spill_ms: ms(&spill_loop.spills),
        restore_ms: ms(&spill_loop.restores),
    }
}

/// The file system type of the mount holding `dir`, from /proc/mounts (best effort).
fn fs_type(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            dir.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, kind)| kind)
}

fn model(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("concurrency.safetensors");
    let specs: Vec<TensorSpec> = (0..RESIDENT)
        .map(|i| TensorSpec::new(format!("blocks.{i}.weight"), Dtype::BF16, &[128, 256]))
        .collect();
    write_safetensors(&path, &specs, &BTreeMap::new(), |i, buf| buf.fill(i as u8))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// A store holding the resident tensors (each acquired once, so each has a RAM copy) and the
/// derived tensor of `size` bytes.
fn setup(dir: &Path, size: u64) -> anyhow::Result<(Store, Vec<TensorId>, TensorId)> {
    let store = Store::builder()
        // Room for the derived tensor, its restored copy while the spilled one is still being
        // freed, and the resident tensors: nothing is ever evicted for the budget.
        .ram_budget(2 * size + (256 << 20))
        .spill_dir(dir)
        .monitor(false)
        .build()?;
    let m = store.open_model(model(dir)?)?;
    let ids = store.tensors(m)?;
    for &id in &ids {
        drop(store.acquire_ram(id)?);
    }
    let len = usize::try_from(size).context("--size")?;
    let mut bytes = AlignedBytes::zeroed(len).context("allocating the derived tensor")?;
    for (i, page) in bytes.as_mut_slice().chunks_mut(4096).enumerate() {
        page.fill(i as u8 | 1);
    }
    let big = store.derive(m, "derived", Dtype::U8, &[size as usize], bytes)?;
    Ok((store, ids, big))
}

fn print_table(rows: &[Row], size: u64) {
    println!(
        "{:>7} | {:>11} | {:>9} | {:>9} | {:>11} | {:>6} | {:>11} | {:>6} | {:>9} | {:>10} | {:>10} | {:>10}",
        "threads",
        "idle ops/s",
        "idle p999",
        "idle max",
        "window op/s",
        "ratio",
        "in-spill/s",
        "ratio",
        "spill ops",
        "spill p999",
        "spill max",
        "restor max"
    );
    for r in rows {
        println!(
            "{:>7} | {:>11.0} | {:>9.2} | {:>9.1} | {:>11.0} | {:>6.3} | {:>11.0} | {:>6.3} | {:>9} | {:>10.1} | {:>10.1} | {:>10.1}",
            r.threads,
            r.idle_ops_per_s,
            r.idle_p999_us,
            r.idle_max_us,
            r.window_ops_per_s,
            r.window_ratio,
            r.in_spill_ops_per_s,
            r.in_spill_ratio,
            r.spill_ops,
            r.spill_p999_us,
            r.spill_max_us,
            r.restore_max_us
        );
    }
    println!(
        "(latencies in us; window: the whole spill and restore loop; in-spill: operations that \
         started and ended within one spill write, per second of spill writes; spill ops: those \
         that overlapped a spill write)"
    );
    println!();
    for r in rows {
        let list = |v: &[f64]| {
            v.iter()
                .map(|ms| format!("{ms:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{} thread(s): spills (ms) {} (mean {:.0}, {:.2} GB/s); restores (ms) {} (mean {:.0}); \
             within restores {:.0} ops/s (ratio {:.3}), longest {:.1} us",
            r.threads,
            list(&r.spill_ms),
            mean(&r.spill_ms),
            size as f64 / mean(&r.spill_ms) / 1e6,
            list(&r.restore_ms),
            mean(&r.restore_ms),
            r.in_restore_ops_per_s,
            r.in_restore_ops_per_s / r.idle_ops_per_s,
            r.restore_max_us
        );
    }
}

/// The worst figures over all thread counts, against the targets.
struct Verdicts {
    max_us: f64,
    max_ok: bool,
    ratio: f64,
    ratio_ok: bool,
}

fn verdicts(rows: &[Row], cpus: usize) -> Verdicts {
    let max_us = rows.iter().map(|r| r.spill_max_us).fold(0.0, f64::max);
    let ratio = rows
        .iter()
        .map(|r| r.in_spill_ratio)
        .fold(f64::INFINITY, f64::min);
    let v = Verdicts {
        max_us,
        max_ok: max_us <= MAX_LATENCY_TARGET_US,
        ratio,
        ratio_ok: ratio >= RATIO_TARGET,
    };
    let word = |ok| if ok { "PASS" } else { "FAIL" };
    println!(
        "verdict: longest acquire+release during a spill write {max_us:.1} us (target <= \
         {MAX_LATENCY_TARGET_US} us): {}",
        word(v.max_ok)
    );
    println!(
        "verdict: throughput within spill writes / idle, lowest {ratio:.3} (target >= \
         {RATIO_TARGET}): {}",
        word(v.ratio_ok)
    );
    if let Some(r) = rows.iter().find(|r| r.idle_max_us > MAX_LATENCY_TARGET_US) {
        println!(
            "note: idle, with no spill, the longest call on {} thread(s) took {:.1} us already \
             (preemption by the scheduler); compare the p99.9 figures too",
            r.threads, r.idle_max_us
        );
    }
    if rows.iter().any(|r| r.threads >= cpus) {
        println!(
            "note: {cpus} CPUs; with the spill thread, {cpus} or more workers share CPUs, so \
             their ratios also measure CPU contention"
        );
    }
    v
}

fn json_line(opts: &Options, fs: &str, cpus: usize, rows: &[Row], v: &Verdicts) -> String {
    let runs: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "threads": r.threads,
                "idle_ops_per_s": r.idle_ops_per_s,
                "idle_p999_us": r.idle_p999_us,
                "idle_max_us": r.idle_max_us,
                "window_ops_per_s": r.window_ops_per_s,
                "window_ratio": r.window_ratio,
                "in_spill_ops_per_s": r.in_spill_ops_per_s,
                "in_spill_ratio": r.in_spill_ratio,
                "in_restore_ops_per_s": r.in_restore_ops_per_s,
                "spill_overlapping_ops": r.spill_ops,
                "spill_p999_us": r.spill_p999_us,
                "spill_max_us": r.spill_max_us,
                "restore_p999_us": r.restore_p999_us,
                "restore_max_us": r.restore_max_us,
                "spill_ms": r.spill_ms,
                "restore_ms": r.restore_ms,
            })
        })
        .collect();
    serde_json::json!({
        "bench": "concurrency",
        "size_bytes": opts.size,
        "secs": opts.secs,
        "cpus": cpus,
        "resident_tensors": RESIDENT,
        "resident_bytes": RESIDENT_LEN,
        "fs": fs,
        "runs": runs,
        "max_latency_us": v.max_us,
        "max_latency_target_us": MAX_LATENCY_TARGET_US,
        "max_latency_ok": v.max_ok,
        "min_in_spill_ratio": v.ratio,
        "ratio_target": RATIO_TARGET,
        "ratio_ok": v.ratio_ok,
    })
    .to_string()
}

fn main() -> anyhow::Result<()> {
    let opts = Options::parse()?;
    if opts.filtered_out {
        return Ok(());
    }
    let temp;
    let dir = if let Some(dir) = &opts.dir {
        dir.clone()
    } else {
        temp = tempfile::Builder::new()
            .prefix("lowtide-concurrency-")
            .tempdir()
            .context("creating a temp directory")?;
        temp.path().to_owned()
    };
    let fs = fs_type(&dir);
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let (store, ids, big) = setup(&dir, opts.size)?;

    println!(
        "lowtide concurrency bench: {RESIDENT} resident tensors of {}, a derived tensor of {}, \
         {} s per phase, {cpus} CPUs",
        ByteSize(RESIDENT_LEN),
        ByteSize(opts.size),
        opts.secs
    );
    println!("spill dir {} ({fs})", dir.display());
    if fs == "tmpfs" || fs == "ramfs" {
        println!("warning: the spill dir is in memory; pass --dir on a disk for real figures");
    }

    let mut rows = Vec::new();
    for &threads in &opts.threads {
        eprintln!("{threads} thread(s): idle");
        let idle = run(&store, &ids, big, threads, opts.secs, false)?;
        eprintln!("{threads} thread(s): while spilling and restoring");
        let busy = run(&store, &ids, big, threads, opts.secs, true)?;
        store.wait_released();
        rows.push(row(threads, &idle, &busy));
    }

    println!();
    print_table(&rows, opts.size);
    println!();
    let v = verdicts(&rows, cpus);
    println!("{}", json_line(&opts, &fs, cpus, &rows, &v));
    Ok(())
}
