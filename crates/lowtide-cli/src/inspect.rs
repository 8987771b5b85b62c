//! `lowtide inspect`: validate model files and list their tensors.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

use lowtide::{ByteSize, ModelFiles};
use serde::Serialize;

/// Arguments of `lowtide inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// `.safetensors` files, directories of shards, or `*.safetensors.index.json` files.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    total_bytes: u64,
    files: Vec<FileRow>,
    tensors: Vec<TensorRow>,
}

#[derive(Serialize)]
struct FileRow {
    path: String,
    /// Bytes of tensor data in the file.
    bytes: u64,
    tensors: usize,
    /// Length of the whole file, header included.
    file_len: u64,
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    file: String,
    offset: u64,
    bytes: u64,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let mut report = Report {
        total_bytes: 0,
        files: Vec::new(),
        tensors: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for path in &args.paths {
        let model = ModelFiles::open(path)?;
        for source in &model.sources {
            // The same file named twice (or a directory and a file in it) is listed once.
            let identity = source.identity();
            if !seen.insert((identity.dev, identity.ino)) {
                continue;
            }
            let file = source.path().display().to_string();
            let bytes: u64 = source.tensors().iter().map(|t| t.len).sum();
            report.total_bytes += bytes;
            report.files.push(FileRow {
                path: file.clone(),
                bytes,
                tensors: source.tensors().len(),
                file_len: source.file_len(),
                metadata: source.metadata().clone(),
            });
            report
                .tensors
                .extend(source.tensors().iter().map(|t| TensorRow {
                    name: t.name.clone(),
                    dtype: t.dtype.name().to_owned(),
                    shape: t.shape.clone(),
                    file: file.clone(),
                    offset: t.offset,
                    bytes: t.len,
                }));
        }
    }
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &report)?;
    }
    Ok(())
}

fn print_table(out: &mut impl Write, report: &Report) -> io::Result<()> {
    let shape = |s: &[u64]| {
        let dims: Vec<String> = s.iter().map(u64::to_string).collect();
        format!("[{}]", dims.join(", "))
    };
    let name_width = report
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let shape_width = report
        .tensors
        .iter()
        .map(|t| shape(&t.shape).len())
        .max()
        .unwrap_or(5)
        .max(5);
    let multi_file = report.files.len() > 1;
    writeln!(
        out,
        "{:<name_width$}  {:<11}  {:<shape_width$}  {:>12}  {:>14}{}",
        "NAME",
        "DTYPE",
        "SHAPE",
        "SIZE",
        "OFFSET",
        if multi_file { "  FILE" } else { "" }
    )?;
    for t in &report.tensors {
        let file = if multi_file {
            format!("  {}", t.file)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:<name_width$}  {:<11}  {:<shape_width$}  {:>12}  {:>14}{file}",
            t.name,
            t.dtype,
            shape(&t.shape),
            ByteSize(t.bytes).to_string(),
            t.offset,
        )?;
    }
    let mut by_dtype: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in &report.tensors {
        let entry = by_dtype.entry(&t.dtype).or_default();
        entry.0 += 1;
        entry.1 += t.bytes;
    }
    writeln!(out)?;
    writeln!(out, "by dtype:")?;
    for (dtype, (count, bytes)) in &by_dtype {
        writeln!(
            out,
            "  {dtype:<11} {count:>7} tensors  {:>12}",
            ByteSize(*bytes).to_string()
        )?;
    }
    writeln!(out, "by file:")?;
    for file in &report.files {
        writeln!(
            out,
            "  {}  {} tensors  {}",
            file.path,
            file.tensors,
            ByteSize(file.bytes)
        )?;
    }
    writeln!(
        out,
        "total: {} tensors, {} ({} bytes)",
        report.tensors.len(),
        ByteSize(report.total_bytes),
        report.total_bytes
    )
}
