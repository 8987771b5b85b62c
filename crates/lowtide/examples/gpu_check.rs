//! End-to-end check of the CUDA tier on a real GPU: load a synthetic model onto GPU 0, patch
//! some tensors on the device, unload everything while host RAM is "under the reserve" (so the
//! patched tensors stream to the spill file and the clean ones are simply freed), reload, verify
//! every byte, and print upload and download throughput and the device pointer of a tensor.
//!
//! Run with `scripts/gpu-check.sh` (or `cargo run --release -p lowtide --features cuda --example
//! gpu_check -- [SIZE]`; SIZE defaults to 2GiB). Exits 0 on success, 1 on a mismatch or error,
//! and 2 where no CUDA device can be opened.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use lowtide::{ByteSize, CudaDevice, Device, DeviceId, Dtype, Store, TensorId};
use lowtide_testkit::{TensorSpec, write_safetensors};

/// Tensor shape: 4096 x 4096 BF16, 32 MiB each (a large attention projection).
const SIDE: u64 = 4096;

fn fill(index: usize, seed: u8, buf: &mut [u8]) {
    let mut state = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed);
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn expected(index: usize, seed: u8, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(len).expect("fits")];
    fill(index, seed, &mut buf);
    buf
}

fn gbps(bytes: u64, start: Instant) -> f64 {
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gpu_check: FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `count` 32 MiB BF16 tensors to `dir/model.safetensors`.
fn write_model(dir: &std::path::Path, count: usize) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("model.safetensors");
    let specs: Vec<TensorSpec> = (0..count)
        .map(|i| {
            TensorSpec::new(
                format!("blocks.{i}.attn.to_q.weight"),
                Dtype::BF16,
                &[SIDE, SIDE],
            )
        })
        .collect();
    let start = Instant::now();
    let bytes = write_safetensors(&path, &specs, &BTreeMap::new(), |i, buf| fill(i, 0, buf))?;
    println!(
        "wrote a synthetic model: {count} tensors, {} in {:.1} s",
        ByteSize(bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// The memory itself, for kernels or a `DLPack` export: downcasts the guard's device and prints
/// the address of the tensor's allocation.
fn print_device_pointer(store: &Store, id: TensorId, gpu: DeviceId) -> anyhow::Result<()> {
    let guard = store.acquire_device(id, gpu)?;
    let cuda = guard
        .device()
        .downcast_ref::<CudaDevice>()
        .ok_or_else(|| anyhow::anyhow!("the store's device is not the CudaDevice added"))?;
    let ptr = cuda.device_ptr(guard.alloc())?;
    anyhow::ensure!(ptr != 0, "a non-empty tensor has a device address");
    println!(
        "device pointer: {} at {ptr:#x} on GPU {}, lowtide's stream {:#x}",
        ByteSize(guard.alloc().len()),
        cuda.ordinal(),
        cuda.raw_stream()
    );
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let size: ByteSize = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("2GiB")
        .parse()?;
    let device = match CudaDevice::new(0) {
        Ok(device) => Arc::new(device),
        Err(err) => {
            eprintln!("gpu_check: no CUDA device: {err}");
            std::process::exit(2);
        }
    };
    println!(
        "device: {} ({} total, {} free)",
        device.name(),
        ByteSize(device.capacity()),
        ByteSize(device.free_bytes())
    );

    let dir = tempfile::tempdir()?;
    let tensor_len = SIDE * SIDE * 2;
    let count = usize::try_from((size.0 / tensor_len).max(4))?;
    let path = write_model(dir.path(), count)?;

    let store = Store::builder()
        .spill_dir(dir.path())
        .monitor(false)
        .build()?;
    let gpu = store.add_device(device.clone());
    let model = store.open_model(&path)?;
    let ids = store.tensors(model)?;
    let total = tensor_len * count as u64;

    let start = Instant::now();
    let loaded = store.load(model, gpu, None)?;
    device.synchronize()?;
    println!(
        "load: {} tensors on the device, {} on the host; {:.2} GB/s from the file (page cache warm)",
        loaded.device_tensors,
        loaded.host_tensors,
        gbps(total, start)
    );

    print_device_pointer(&store, ids[0], gpu)?;

    // Patch every fourth tensor on the device.
    let patched: Vec<usize> = (0..count).step_by(4).collect();
    for &i in &patched {
        store.replace_on_device(ids[i], gpu, &expected(i, 1, tensor_len))?;
    }
    device.synchronize()?;

    // Host RAM under the reserve: the patched tensors must stream to the spill file.
    store.set_reserve_ram(u64::MAX / 4);
    let written_before = store.stats().bytes_written;
    let start = Instant::now();
    let outcome = store.unload_all(model)?;
    let unload_s = start.elapsed().as_secs_f64();
    let written = store.stats().bytes_written - written_before;
    let patched_bytes = tensor_len * patched.len() as u64;
    println!(
        "unload: {} clean freed (0 written), {} patched streamed to spill in {unload_s:.2} s ({:.2} GB/s download+write), {} not freed",
        ByteSize(outcome.clean_bytes),
        ByteSize(outcome.to_spill_bytes),
        patched_bytes as f64 / unload_s / 1e9,
        ByteSize(outcome.not_freed_bytes)
    );
    anyhow::ensure!(
        written == patched_bytes && outcome.to_spill_bytes == patched_bytes,
        "wrote {written} bytes, expected exactly the patched {patched_bytes}"
    );
    anyhow::ensure!(outcome.not_freed_bytes == 0, "some device copies stayed");

    store.set_reserve_ram(0);
    let start = Instant::now();
    store.load(model, gpu, None)?;
    device.synchronize()?;
    println!("reload: {:.2} GB/s", gbps(total, start));

    let start = Instant::now();
    for (i, &id) in ids.iter().enumerate() {
        let seed = u8::from(patched.contains(&i));
        let bytes = store.acquire_device(id, gpu)?.download()?;
        anyhow::ensure!(
            bytes == expected(i, seed, tensor_len),
            "tensor {i}: bytes differ after the round trip"
        );
    }
    println!(
        "verify: all {count} tensors byte-identical; download {:.2} GB/s (with compare)",
        gbps(total, start)
    );
    let stats = store.stats();
    println!(
        "stats: uploaded {}, downloaded {}, spilled {}, restored from spill {}",
        ByteSize(stats.bytes_uploaded),
        ByteSize(stats.bytes_downloaded),
        ByteSize(stats.bytes_spilled),
        ByteSize(stats.bytes_restored_spill)
    );
    println!("gpu_check: OK");
    Ok(())
}
