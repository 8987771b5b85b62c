//! The bench's slower device: the same file read by a child process whose reads of the disk
//! are throttled with the block I/O controller (cgroup v1 `blkio.throttle.read_bps_device`),
//! so that the shape its streams choose can be set beside the one chosen at full speed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Where the v1 block I/O controller is mounted.
const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// Passes over the probed bytes at most: the measurement settles within two.
const PASSES: usize = 4;

/// What the probe child measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Probe {
    /// The shape its streams settled on (or were measuring when the passes ran out).
    pub(crate) chunk: usize,
    pub(crate) depth: usize,
    pub(crate) settled: bool,
    /// GB/s of its last pass.
    pub(crate) gbps: f64,
    /// Bytes read per pass.
    pub(crate) bytes: u64,
}

/// Runs in the child (`lowtide bench --shape-probe FILE`): streams the first `bytes` of the
/// file's tensors with `O_DIRECT` until its store settles on a shape, and prints the outcome
/// as JSON.
pub(crate) fn probe(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let store = lowtide::Store::builder()
        .ram_budget(2 << 30)
        .monitor(false)
        .keep_streamed_cached(false)
        .build()?;
    let model = store.open_model(path)?;
    let mut ids = Vec::new();
    let mut total = 0;
    for info in store.list(model)? {
        if total + info.len > bytes && !ids.is_empty() {
            break;
        }
        total += info.len;
        ids.push(info.id);
    }
    let mut gbps = 0.0;
    for _ in 0..PASSES {
        crate::bench::make_cold(path)?;
        gbps = crate::bench::stream_through(&store, ids.clone(), total)?;
        store.release_model(model)?;
        if store.read_shapes().first().is_some_and(|d| d.settled) {
            break;
        }
    }
    let shape = store
        .read_shapes()
        .first()
        .copied()
        .context("no stream read from the disk with O_DIRECT")?;
    let probe = Probe {
        chunk: shape.shape.chunk,
        depth: shape.shape.depth,
        settled: shape.settled,
        gbps,
        bytes: total,
    };
    println!("{}", serde_json::to_string(&probe)?);
    Ok(())
}

/// Measures the shape chosen for the disk under `path` throttled to `bytes_per_second`, in a
/// child process placed in a block I/O cgroup of its own; `Err` says why it could not be
/// measured here (no v1 controller, not root, the file's disk not found).
pub(crate) fn throttled(path: &Path, bytes: u64, bytes_per_second: u64) -> Result<Probe, String> {
    let device = whole_disk(path)?;
    let cgroup = PathBuf::from(BLKIO).join(format!("lowtide-bench-{}", std::process::id()));
    if !Path::new(BLKIO)
        .join("blkio.throttle.read_bps_device")
        .exists()
    {
        return Err(format!("no v1 block I/O controller at {BLKIO}"));
    }
    std::fs::create_dir(&cgroup).map_err(|err| {
        format!(
            "cannot create the cgroup {}: {err} (root is needed)",
            cgroup.display()
        )
    })?;
    let outcome = (|| {
        std::fs::write(
            cgroup.join("blkio.throttle.read_bps_device"),
            format!("{device} {bytes_per_second}"),
        )
        .map_err(|err| format!("cannot throttle {device}: {err}"))?;
        let exe = std::env::current_exe().map_err(|err| format!("cannot find lowtide: {err}"))?;
        // The shell joins the cgroup, then becomes the probe: every read of it is throttled.
        let procs = cgroup.join("cgroup.procs");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&procs)
            .arg(&exe)
            .args(["bench", "--shape-probe"])
            .arg(path)
            .args(["--size", &bytes.to_string()])
            .output()
            .map_err(|err| format!("cannot run the probe: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "the probe failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        serde_json::from_slice::<Probe>(&output.stdout)
            .map_err(|err| format!("cannot read the probe's answer: {err}"))
    })();
    // The cgroup is empty once the child exited.
    let _ = std::fs::remove_dir(&cgroup);
    outcome
}

/// `MAJ:MIN` of the whole disk holding `path` (the throttle applies to disks, not
/// partitions).
fn whole_disk(path: &Path) -> Result<String, String> {
    let stat = rustix::fs::stat(path).map_err(|err| format!("cannot stat: {err}"))?;
    let (major, minor) = (
        rustix::fs::major(stat.st_dev),
        rustix::fs::minor(stat.st_dev),
    );
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return Err(format!(
            "{major}:{minor} is not a block device (a network or virtual file system)"
        ));
    }
    if sys.join("partition").exists() {
        let parent = sys
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(|p| p.join("dev")))
            .and_then(|dev| std::fs::read_to_string(dev).ok())
            .ok_or_else(|| format!("cannot find the disk of partition {major}:{minor}"))?;
        return Ok(parent.trim().to_owned());
    }
    Ok(format!("{major}:{minor}"))
}
