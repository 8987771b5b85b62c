//! `lowtide inspect`: validate model files and list their tensors.
//!
//! Every model is opened (and so validated) before anything is printed, so a bad file leaves
//! stdout empty. The output is written from the opened sources as it goes, without a copy of
//! the tensor list: a header of a million tensors costs its parse, not several copies of it.
//! Names from files are shown with control characters escaped (`--json` escapes them as JSON).
//!
//! GGUF files are listed like safetensors files, with a summary of their metadata under the
//! table; in `--json` their file rows add `format` and `gguf` (version, alignment,
//! architecture, name, key count) and `metadata` holds their typed values as JSON (arrays of
//! more than [`ARRAY_SHOWN`] elements as `{"element_type", "len"}`), their tensor rows add
//! `ggml_type` and `dims` (as written, innermost first). See `docs/gguf.md`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use lowtide::{
    ByteSize, Escaped, EscapedPath, Gguf, GgufTensorInfo, GgufValue, ModelFiles, Source,
};
use serde::Serialize;
use serde::ser::SerializeSeq;

/// Arguments of `lowtide inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// `.safetensors` or `.gguf` files, directories of shards, or `*.safetensors.index.json`
    /// files.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The files to list, each once, with the path to show for it.
struct Listing<'a> {
    files: Vec<(&'a Source, String)>,
    total_bytes: u64,
}

impl<'a> Listing<'a> {
    fn new(models: &'a [ModelFiles]) -> Self {
        let mut seen = HashSet::new();
        let mut files = Vec::new();
        for source in models.iter().flat_map(ModelFiles::sources) {
            // The same file named twice (or a directory and a file in it) is listed once.
            let identity = source.identity();
            if seen.insert((identity.dev, identity.ino)) {
                files.push((&**source, source.path().display().to_string()));
            }
        }
        let total_bytes = files.iter().map(|(source, _)| data_bytes(source)).sum();
        Self { files, total_bytes }
    }

    fn tensor_count(&self) -> usize {
        self.files.iter().map(|(s, _)| s.tensors().len()).sum()
    }
}

/// Bytes of tensor data in a file.
fn data_bytes(source: &Source) -> u64 {
    source.tensors().iter().map(|t| t.len).sum()
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let models = args
        .paths
        .iter()
        .map(ModelFiles::open)
        .collect::<Result<Vec<_>, _>>()?;
    let listing = Listing::new(&models);
    let mut out = BufWriter::new(io::stdout().lock());
    if args.json {
        serde_json::to_writer_pretty(&mut out, &Report(&listing))?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &listing)?;
    }
    out.flush()?;
    Ok(())
}

/// `--json`: `{total_bytes, files: [...], tensors: [...]}`, serialized from the sources.
struct Report<'a>(&'a Listing<'a>);

#[derive(Serialize)]
struct FileRow<'a> {
    path: &'a str,
    /// Bytes of tensor data in the file.
    bytes: u64,
    tensors: usize,
    /// Length of the whole file, header included.
    file_len: u64,
    metadata: Metadata<'a>,
    /// `"gguf"` for GGUF files (absent for safetensors, the format of old reports).
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gguf: Option<GgufSummary<'a>>,
}

/// A file's metadata: safetensors' `__metadata__` strings, or GGUF's typed values.
enum Metadata<'a> {
    Safetensors(&'a BTreeMap<String, String>),
    Gguf(&'a Gguf),
}

/// Arrays of more elements are shown as their element type and length.
pub(crate) const ARRAY_SHOWN: usize = 64;

/// A GGUF value in `--json`: as JSON, long arrays summarised.
struct ValueJson<'a>(&'a GgufValue);

impl Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            GgufValue::Array(array) if array.len() > ARRAY_SHOWN => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("element_type", array.element_type().name())?;
                map.serialize_entry("len", &array.len())?;
                map.end()
            }
            value => value.serialize(serializer),
        }
    }
}

impl Serialize for Metadata<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Metadata::Safetensors(map) => map.serialize(serializer),
            Metadata::Gguf(gguf) => serializer.collect_map(
                gguf.metadata()
                    .iter()
                    .map(|(key, value)| (key, ValueJson(value))),
            ),
        }
    }
}

/// The `gguf` object of a GGUF file's row.
#[derive(Serialize)]
struct GgufSummary<'a> {
    version: u32,
    alignment: u64,
    architecture: Option<&'a str>,
    name: Option<&'a str>,
    keys: usize,
    data_start: u64,
}

impl<'a> GgufSummary<'a> {
    fn of(gguf: &'a Gguf) -> Self {
        Self {
            version: gguf.version(),
            alignment: gguf.alignment(),
            architecture: gguf.architecture(),
            name: gguf.name(),
            keys: gguf.metadata().len(),
            data_start: gguf.data_start(),
        }
    }
}

#[derive(Serialize)]
struct TensorRow<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: &'a [u64],
    file: &'a str,
    offset: u64,
    bytes: u64,
    /// GGUF only: the ggml type id and the dimensions as written (innermost first).
    #[serde(skip_serializing_if = "Option::is_none")]
    ggml_type: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dims: Option<&'a [u64]>,
}

/// The `files` array.
struct Files<'a>(&'a Listing<'a>);

/// The `tensors` array.
struct Tensors<'a>(&'a Listing<'a>);

impl Serialize for Report<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut report = serializer.serialize_struct("Report", 3)?;
        report.serialize_field("total_bytes", &self.0.total_bytes)?;
        report.serialize_field("files", &Files(self.0))?;
        report.serialize_field("tensors", &Tensors(self.0))?;
        report.end()
    }
}

impl Serialize for Files<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.files.len()))?;
        for (source, path) in &self.0.files {
            seq.serialize_element(&FileRow {
                path,
                bytes: data_bytes(source),
                tensors: source.tensors().len(),
                file_len: source.file_len(),
                metadata: source
                    .gguf()
                    .map_or(Metadata::Safetensors(source.metadata()), Metadata::Gguf),
                format: source.gguf().map(|_| "gguf"),
                gguf: source.gguf().map(GgufSummary::of),
            })?;
        }
        seq.end()
    }
}

impl Serialize for Tensors<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.tensor_count()))?;
        for (source, file) in &self.0.files {
            let infos: std::collections::HashMap<&str, &GgufTensorInfo> = source
                .gguf()
                .map(|g| g.tensors().iter().map(|t| (t.name.as_str(), t)).collect())
                .unwrap_or_default();
            for t in source.tensors() {
                let info = infos.get(t.name.as_str());
                seq.serialize_element(&TensorRow {
                    name: &t.name,
                    dtype: t.dtype.name(),
                    shape: &t.shape,
                    file,
                    offset: t.offset,
                    bytes: t.len,
                    ggml_type: info.and_then(|i| i.dtype.ggml_id()),
                    dims: info.map(|i| i.dims.as_slice()),
                })?;
            }
        }
        seq.end()
    }
}

/// `n` and a noun, plural unless `n` is 1: `1 tensor`, `0 tensors`.
struct Count(usize, &'static str);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.0 == 1 { "" } else { "s" };
        write!(f, "{} {}{plural}", self.0, self.1)
    }
}

/// Writes `[1, 2, 3]` into `buf`, replacing what it held.
fn shape_text(buf: &mut String, shape: &[u64]) -> usize {
    use std::fmt::Write as _;
    buf.clear();
    buf.push('[');
    for (i, dim) in shape.iter().enumerate() {
        if i > 0 {
            buf.push_str(", ");
        }
        let _ = write!(buf, "{dim}");
    }
    buf.push(']');
    buf.len()
}

fn print_table(out: &mut impl Write, listing: &Listing<'_>) -> io::Result<()> {
    let tensors = || {
        listing
            .files
            .iter()
            .flat_map(|(source, file)| source.tensors().iter().map(move |t| (t, file)))
    };
    let mut shape = String::new();
    let name_width = tensors()
        .map(|(t, _)| Escaped(&t.name).char_count())
        .max()
        .unwrap_or(4)
        .max(4);
    let shape_width = tensors()
        .map(|(t, _)| shape_text(&mut shape, &t.shape))
        .max()
        .unwrap_or(5)
        .max(5);
    let multi_file = listing.files.len() > 1;
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
    for (t, file) in tensors() {
        shape_text(&mut shape, &t.shape);
        write!(
            out,
            "{:<name_width$}  {:<11}  {shape:<shape_width$}  {:>12}  {:>14}",
            Escaped(&t.name),
            t.dtype.name(),
            ByteSize(t.len).to_string(),
            t.offset,
        )?;
        if multi_file {
            write!(out, "  {}", Escaped(file))?;
        }
        writeln!(out)?;
    }
    let mut by_dtype: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (t, _) in tensors() {
        let entry = by_dtype.entry(t.dtype.name()).or_default();
        entry.0 += 1;
        entry.1 += t.len;
    }
    writeln!(out)?;
    writeln!(out, "by dtype:")?;
    for (dtype, (count, bytes)) in &by_dtype {
        let noun = if *count == 1 { "tensor" } else { "tensors" };
        writeln!(
            out,
            "  {dtype:<11} {count:>7} {noun:<7}  {:>12}",
            ByteSize(*bytes).to_string()
        )?;
    }
    writeln!(out, "by file:")?;
    for (source, _) in &listing.files {
        writeln!(
            out,
            "  {}  {}  {}",
            EscapedPath(source.path()),
            Count(source.tensors().len(), "tensor"),
            ByteSize(data_bytes(source))
        )?;
    }
    let ggufs: Vec<(&Source, &Gguf)> = listing
        .files
        .iter()
        .filter_map(|(source, _)| source.gguf().map(|g| (*source, g)))
        .collect();
    if !ggufs.is_empty() {
        writeln!(out, "gguf metadata:")?;
        for (source, gguf) in ggufs {
            let or_none =
                |s: Option<&str>| s.map_or_else(|| "(none)".to_owned(), |s| Escaped(s).to_string());
            writeln!(
                out,
                "  {}  version {}, architecture {}, name {}, alignment {}, {}",
                EscapedPath(source.path()),
                gguf.version(),
                or_none(gguf.architecture()),
                or_none(gguf.name()),
                gguf.alignment(),
                Count(gguf.metadata().len(), "key"),
            )?;
        }
    }
    writeln!(
        out,
        "total: {}, {} ({} bytes)",
        Count(listing.tensor_count(), "tensor"),
        ByteSize(listing.total_bytes),
        listing.total_bytes
    )
}
