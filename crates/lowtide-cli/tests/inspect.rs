//! `lowtide inspect` run as a program: its JSON and table output for good files, and for bad
//! ones exit status 1, one line on stderr naming the file (and tensor), nothing on stdout.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lowtide::{ByteSize, Dtype};
use lowtide_testkit::{TensorSpec, expected, write};
use serde_json::Value;

/// Runs `lowtide` with `args`.
fn lowtide<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .output()
        .expect("run lowtide")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Runs `lowtide inspect <paths> [--json]`, expecting success with nothing on stderr.
fn inspect_ok(paths: &[&Path], json: bool) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec!["inspect".as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    if json {
        args.push("--json".as_ref());
    }
    let out = lowtide(&args);
    assert!(
        out.status.success(),
        "lowtide {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "stderr: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Tensors like a small UNet's: several dtypes, odd sizes, a scalar and an empty tensor.
fn specs(prefix: &str) -> Vec<TensorSpec> {
    lowtide_testkit::unet_specs(prefix)
}

/// Writes a file from raw parts: 8-byte little-endian header length, `header`, `data`.
fn write_raw(path: &Path, header: &[u8], data: &[u8]) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {value}"))
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {value}"))
}

/// What was written: file path -> specs.
type Written<'a> = Vec<(&'a Path, &'a [TensorSpec])>;

/// Checks `inspect --json` output against what was written, reading every tensor's bytes from
/// its file at the reported offset.
fn check_json(stdout: &str, written: &Written<'_>) {
    let report: Value = serde_json::from_str(stdout).expect("stdout is JSON");
    assert_eq!(
        keys(&report),
        BTreeSet::from(["total_bytes", "files", "tensors"]),
        "top-level keys"
    );

    let files = report["files"].as_array().expect("`files` is an array");
    assert_eq!(files.len(), written.len(), "one row per file");
    let mut file_bytes: BTreeMap<String, u64> = BTreeMap::new();
    for (row, (path, specs)) in files.iter().zip(written) {
        let row_keys = keys(row);
        for key in ["path", "bytes", "tensors"] {
            assert!(row_keys.contains(key), "file row lacks `{key}`: {row}");
        }
        // Two further fields are documented in the CLI: the whole file's length and its
        // `__metadata__`. Anything else is not part of the format.
        let extra: BTreeSet<&str> = row_keys
            .difference(&BTreeSet::from(["path", "bytes", "tensors"]))
            .copied()
            .collect();
        assert!(
            extra.is_subset(&BTreeSet::from(["file_len", "metadata"])),
            "unexpected file row keys {extra:?}: {row}"
        );
        assert_eq!(str_of(row, "path"), path.display().to_string());
        let bytes: u64 = specs.iter().map(|s| s.byte_len().unwrap()).sum();
        assert_eq!(u64_of(row, "bytes"), bytes, "{row}");
        assert_eq!(u64_of(row, "tensors"), specs.len() as u64, "{row}");
        if extra.contains("file_len") {
            assert_eq!(u64_of(row, "file_len"), fs::metadata(path).unwrap().len());
        }
        if extra.contains("metadata") {
            assert_eq!(row["metadata"], serde_json::json!({"format": "pt"}));
        }
        file_bytes.insert(path.display().to_string(), bytes);
    }

    let tensors = report["tensors"].as_array().expect("`tensors` is an array");
    let total: usize = written.iter().map(|(_, specs)| specs.len()).sum();
    assert_eq!(tensors.len(), total, "one row per tensor");
    let mut contents: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut sum = 0;
    for row in tensors {
        assert_eq!(
            keys(row),
            BTreeSet::from(["name", "dtype", "shape", "file", "offset", "bytes"]),
            "tensor row keys"
        );
        let name = str_of(row, "name");
        let file = str_of(row, "file");
        assert!(
            seen.insert((file, name)),
            "`{name}` listed twice for {file}"
        );
        let (path, specs) = written
            .iter()
            .find(|(p, _)| p.display().to_string() == file)
            .unwrap_or_else(|| panic!("tensor `{name}` in unknown file {file}"));
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{file} has no tensor `{name}`"));
        assert_eq!(str_of(row, "dtype"), spec.dtype.name(), "`{name}`");
        let shape: Vec<u64> = row["shape"]
            .as_array()
            .expect("`shape` is an array")
            .iter()
            .map(|d| d.as_u64().expect("dimensions are unsigned integers"))
            .collect();
        assert_eq!(shape, spec.shape, "`{name}`");
        let len = u64_of(row, "bytes");
        assert_eq!(len, spec.byte_len().unwrap(), "`{name}`");
        sum += len;
        // The offset is absolute: the file's bytes there are the tensor's.
        let offset = usize::try_from(u64_of(row, "offset")).unwrap();
        let data = contents
            .entry(file)
            .or_insert_with(|| fs::read(path).unwrap());
        let end = offset + usize::try_from(len).unwrap();
        assert!(end <= data.len(), "`{name}` runs past the end of {file}");
        assert!(
            data[offset..end] == expected(name, len),
            "`{name}`: the bytes at offset {offset} of {file} are not the tensor's"
        );
    }
    assert_eq!(
        u64_of(&report, "total_bytes"),
        sum,
        "total_bytes is the sum"
    );
    assert_eq!(sum, file_bytes.values().sum::<u64>());
}

/// "tensor" or "tensors", as a count of `n` needs.
fn tensors_word(n: usize) -> &'static str {
    if n == 1 { "tensor" } else { "tensors" }
}

/// Checks the table: a row per tensor, totals per dtype and per file, and the grand total.
fn check_table(stdout: &str, written: &Written<'_>) {
    let lines: Vec<&str> = stdout.lines().collect();
    let row_of = |name: &str, file: &Path| {
        lines
            .iter()
            .find(|l| {
                l.split_whitespace().next() == Some(name)
                    && (written.len() == 1 || l.ends_with(&file.display().to_string()))
            })
            .unwrap_or_else(|| panic!("no row for `{name}` of {}:\n{stdout}", file.display()))
    };
    let mut by_dtype: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for (path, specs) in written {
        for spec in *specs {
            let row = row_of(&spec.name, path);
            assert!(row.contains(spec.dtype.name()), "{row}");
            let entry = by_dtype.entry(spec.dtype.name()).or_default();
            entry.0 += 1;
            entry.1 += spec.byte_len().unwrap();
        }
    }

    let section = |title: &str| -> Vec<&str> {
        let start = lines
            .iter()
            .position(|l| *l == title)
            .unwrap_or_else(|| panic!("no `{title}` section:\n{stdout}"));
        lines[start + 1..]
            .iter()
            .take_while(|l| l.starts_with("  "))
            .copied()
            .collect()
    };
    let dtype_rows = section("by dtype:");
    assert_eq!(
        dtype_rows.len(),
        by_dtype.len(),
        "one row per dtype:\n{stdout}"
    );
    for (dtype, (count, bytes)) in &by_dtype {
        let row = dtype_rows
            .iter()
            .find(|l| l.split_whitespace().next() == Some(*dtype))
            .unwrap_or_else(|| panic!("no `by dtype` row for {dtype}:\n{stdout}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(words[1], count.to_string(), "{row}");
        assert_eq!(words[2], tensors_word(*count), "{row}");
        assert!(row.ends_with(&ByteSize(*bytes).to_string()), "{row}");
    }

    let file_rows = section("by file:");
    assert_eq!(
        file_rows.len(),
        written.len(),
        "one row per file:\n{stdout}"
    );
    for (path, specs) in written {
        let path = path.display().to_string();
        let bytes: u64 = specs.iter().map(|s| s.byte_len().unwrap()).sum();
        let row = file_rows
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{path} ")))
            .unwrap_or_else(|| panic!("no `by file` row for {path}:\n{stdout}"));
        let count = format!(" {} {} ", specs.len(), tensors_word(specs.len()));
        assert!(row.contains(&count), "{row}");
        assert!(row.ends_with(&ByteSize(bytes).to_string()), "{row}");
    }

    let count: usize = written.iter().map(|(_, s)| s.len()).sum();
    let total: u64 = by_dtype.values().map(|(_, b)| b).sum();
    let last = lines.last().expect("output");
    assert!(
        last.starts_with(&format!("total: {count} {},", tensors_word(count))),
        "{last}"
    );
    assert!(last.contains(&format!("({total} bytes)")), "{last}");
}

#[test]
fn json_lists_every_tensor_with_its_absolute_offset() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs("");
    let path = write(&dir.path().join("unet.safetensors"), &specs);
    let stdout = inspect_ok(&[&path], true);
    check_json(&stdout, &vec![(path.as_path(), specs.as_slice())]);
}

#[test]
fn table_lists_every_tensor_and_totals_by_dtype_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs("");
    let path = write(&dir.path().join("unet.safetensors"), &specs);
    let stdout = inspect_ok(&[&path], false);
    check_table(&stdout, &vec![(path.as_path(), specs.as_slice())]);
}

#[test]
fn several_files_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a_specs, b_specs) = (specs("unet."), specs("vae."));
    let a = write(&dir.path().join("unet.safetensors"), &a_specs);
    let b = write(&dir.path().join("vae.safetensors"), &b_specs);
    let written = vec![
        (a.as_path(), a_specs.as_slice()),
        (b.as_path(), b_specs.as_slice()),
    ];
    check_json(&inspect_ok(&[&a, &b], true), &written);
    check_table(&inspect_ok(&[&a, &b], false), &written);
}

#[test]
fn a_shard_directory_with_and_without_index() {
    let dir = tempfile::tempdir().unwrap();
    let all = specs("model.");
    let (first, second) = all.split_at(4);
    let a = write(&dir.path().join("model-00001-of-00002.safetensors"), first);
    let b = write(&dir.path().join("model-00002-of-00002.safetensors"), second);
    let written = vec![(a.as_path(), first), (b.as_path(), second)];

    // A directory of shards without an index.
    check_json(&inspect_ok(&[dir.path()], true), &written);
    check_table(&inspect_ok(&[dir.path()], false), &written);

    // With an index, through the directory and through the index itself.
    let weight_map: serde_json::Map<String, Value> = first
        .iter()
        .map(|s| (s.name.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(
            second
                .iter()
                .map(|s| (s.name.clone(), "model-00002-of-00002.safetensors".into())),
        )
        .collect();
    let total: u64 = all.iter().map(|s| s.byte_len().unwrap()).sum();
    let index = dir.path().join("model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    fs::write(&index, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    check_json(&inspect_ok(&[dir.path()], true), &written);
    check_json(&inspect_ok(&[&index], true), &written);
    check_table(&inspect_ok(&[&index], false), &written);
}

/// Runs `lowtide inspect <paths>` on bad input: exit status 1, exactly one line on stderr that
/// contains each of `needles`, nothing on stdout.
fn inspect_fails(paths: &[&Path], json: bool, needles: &[&str]) {
    let mut argv: Vec<&std::ffi::OsStr> = vec!["inspect".as_ref()];
    argv.extend(paths.iter().map(|p| p.as_os_str()));
    if json {
        argv.push("--json".as_ref());
    }
    let out = lowtide(&argv);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lowtide {argv:?}: want exit status 1, got {} (stderr: {stderr})",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "lowtide {argv:?}: stdout not empty: {}",
        text(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "lowtide {argv:?}: want one line on stderr, got:\n{stderr}"
    );
    assert!(stderr.ends_with('\n'), "{stderr:?}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "lowtide {argv:?}: stderr does not name `{needle}`: {stderr}"
        );
    }
}

/// `inspect_fails` with and without `--json`.
fn both_fail(paths: &[&Path], needles: &[&str]) {
    inspect_fails(paths, false, needles);
    inspect_fails(paths, true, needles);
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs("");
    let good = write(&dir.path().join("good.safetensors"), &specs);
    let bytes = fs::read(&good).unwrap();
    let header_len = usize::try_from(u64::from_le_bytes(bytes[..8].try_into().unwrap())).unwrap();

    // Cut inside the data: the tensor whose data ends last is named.
    let last = specs.iter().rfind(|s| s.byte_len().unwrap() > 0).unwrap();
    let data = dir.path().join("cut-data.safetensors");
    fs::write(&data, &bytes[..bytes.len() - 3]).unwrap();
    both_fail(&[&data], &[&shown(&data), &format!("`{}`", last.name)]);

    // Cut inside the header, and inside the 8-byte length prefix.
    let header = dir.path().join("cut-header.safetensors");
    fs::write(&header, &bytes[..8 + header_len / 2]).unwrap();
    both_fail(&[&header], &[&shown(&header)]);
    let prefix = dir.path().join("cut-prefix.safetensors");
    fs::write(&prefix, &bytes[..5]).unwrap();
    both_fail(&[&prefix], &[&shown(&prefix)]);
    let empty = dir.path().join("empty.safetensors");
    fs::write(&empty, b"").unwrap();
    both_fail(&[&empty], &[&shown(&empty)]);
}

#[test]
fn offsets_that_disagree_with_the_shape() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"ok":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"conv.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[4,24]}}"#;
    let path = write_raw(&dir.path().join("mismatch.safetensors"), header, &[0; 24]);
    both_fail(&[&path], &[&shown(&path), "`conv.weight`"]);
}

#[test]
fn garbage_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_raw(
        &dir.path().join("garbage.safetensors"),
        b"{\"a\": {\"dtype\": \"F32\", [[[ not json",
        &[0; 16],
    );
    both_fail(&[&path], &[&shown(&path)]);
    let not_utf8 = write_raw(&dir.path().join("binary.safetensors"), &[0xff; 16], &[]);
    both_fail(&[&not_utf8], &[&shown(&not_utf8)]);
    let not_object = write_raw(&dir.path().join("array.safetensors"), b"[1, 2]  ", &[]);
    both_fail(&[&not_object], &[&shown(&not_object)]);
}

#[test]
fn nonexistent_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    both_fail(&[&missing], &[&shown(&missing)]);
    let missing_index = dir.path().join("missing.safetensors.index.json");
    both_fail(&[&missing_index], &[&shown(&missing_index)]);

    // A good file before a missing one: still nothing on stdout.
    let good = write(&dir.path().join("good.safetensors"), &specs(""));
    both_fail(&[&good, &missing], &[&shown(&missing)]);
}

#[test]
fn unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"__metadata__":{"format":"pt"},"proj.weight":{"dtype":"F17","shape":[2,2],"data_offsets":[0,8]}}"#;
    let path = write_raw(&dir.path().join("f17.safetensors"), header, &[0; 8]);
    both_fail(&[&path], &[&shown(&path), "`proj.weight`", "F17"]);
}

#[test]
fn an_index_naming_a_tensor_its_shard_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs("");
    write(&dir.path().join("model-00001-of-00001.safetensors"), &specs);
    let mut weight_map: serde_json::Map<String, Value> = specs
        .iter()
        .map(|s| (s.name.clone(), "model-00001-of-00001.safetensors".into()))
        .collect();
    weight_map.insert(
        "ghost.weight".into(),
        "model-00001-of-00001.safetensors".into(),
    );
    let index = dir.path().join("model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    fs::write(&index, serde_json::to_vec(&json).unwrap()).unwrap();
    both_fail(&[&index], &[&shown(&index), "`ghost.weight`"]);
    both_fail(&[dir.path()], &[&shown(&index), "`ghost.weight`"]);
}

/// `dir/model/` with shard `a.safetensors` (the first four tensors of `specs`) and an index
/// mapping the rest to shard `b`; `b` itself is left to the test.
fn model_with_index(dir: &Path, b: &str) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    fs::create_dir(&model).unwrap();
    let all = specs("");
    write(&model.join("a.safetensors"), &all[..4]);
    let weight_map: serde_json::Map<String, Value> = all
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let shard = if i < 4 { "a.safetensors" } else { b };
            (s.name.clone(), shard.into())
        })
        .collect();
    let index = model.join("model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    fs::write(&index, serde_json::to_vec(&json).unwrap()).unwrap();
    (model, index)
}

#[test]
fn fifos_are_refused_at_once_as_file_shard_or_index() {
    let dir = tempfile::tempdir().unwrap();
    let (model, index) = model_with_index(dir.path(), "pipe.safetensors");
    let pipe = model.join("pipe.safetensors");
    common::mkfifo(&pipe);
    let fifo = "is a FIFO (named pipe), not a regular file";
    for json in [false, true] {
        let flag = if json { "--json" } else { "--" };
        // Named directly, as a shard named by the index, as a shard in a directory listing.
        for path in [&pipe, &index] {
            common::fails_fast(
                &["inspect".as_ref(), path.as_os_str(), flag.as_ref()],
                &[&shown(&pipe), fifo],
            );
        }
        let listing = dir.path().join("listing");
        fs::create_dir_all(&listing).unwrap();
        write(&listing.join("a.safetensors"), &specs("")[..4]);
        let _ = fs::remove_file(listing.join("pipe.safetensors"));
        common::mkfifo(&listing.join("pipe.safetensors"));
        common::fails_fast(
            &["inspect".as_ref(), listing.as_os_str(), flag.as_ref()],
            &[&shown(&listing.join("pipe.safetensors")), fifo],
        );
    }
    // The index itself a FIFO, named directly and found in the directory.
    fs::remove_file(&index).unwrap();
    common::mkfifo(&index);
    for path in [&index, &model] {
        common::fails_fast(
            &["inspect".as_ref(), path.as_os_str()],
            &[&shown(&index), fifo],
        );
    }
}

/// What a password file starts with; bytes 0..8 read as a header length are `root:*:2`.
const SECRET: &[u8] = b"root:*:20000:0:99999:7:::\n";

fn assert_no_secret(line: &str) {
    let as_len = u64::from_le_bytes(SECRET[..8].try_into().unwrap()).to_string();
    assert!(!line.contains("root:") && !line.contains(&as_len), "{line}");
}

#[test]
fn shards_linking_outside_the_model_directory_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let (model, index) = model_with_index(dir.path(), "b.safetensors");
    let secret = dir.path().join("secret");
    fs::write(&secret, SECRET).unwrap();
    let link = model.join("b.safetensors");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    for path in [&index, &model] {
        let error = common::fails_fast(
            &["inspect".as_ref(), path.as_os_str()],
            &["`b.safetensors`", "outside the model's directory"],
        );
        assert_no_secret(&error);
    }
    // A valid safetensors file outside is refused too: the link, not the content, is wrong.
    let outside = write(&dir.path().join("outside.safetensors"), &specs("")[4..]);
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for path in [&index, &model] {
        common::fails_fast(
            &["inspect".as_ref(), path.as_os_str()],
            &["`b.safetensors`", "outside the model's directory"],
        );
    }
    // A link that stays inside the directory is followed.
    fs::rename(&outside, model.join("b-blob.safetensors")).unwrap();
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("b-blob.safetensors", &link).unwrap();
    let stdout = inspect_ok(&[&index], true);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["tensors"].as_array().unwrap().len(), specs("").len());
    // A file the user names may be a link, even one leading elsewhere; the secret, named
    // directly, is read and refused without its bytes in the message.
    inspect_ok(&[&link], false);
    let error = common::fails_fast(
        &["inspect".as_ref(), secret.as_os_str()],
        &[&shown(&secret)],
    );
    assert_no_secret(&error);
}

/// A name that, printed raw, clears the screen and overwrites the line with "all good".
const EVIL: &str = "\u{1b}[2J\r all good";

fn assert_no_controls(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.iter().any(|&b| b == 0x1b || b == b'\r'),
        "{what} holds raw ESC or CR: {:?}",
        String::from_utf8_lossy(bytes)
    );
}

#[test]
fn names_from_files_cannot_drive_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![
        TensorSpec::new(EVIL, Dtype::F32, &[2, 2]),
        TensorSpec::new("plain", Dtype::F16, &[3]),
    ];
    let path = write(&dir.path().join("evil.safetensors"), &specs);
    let out = lowtide(["inspect".as_ref(), path.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_controls("the table", &out.stdout);
    let table = text(&out.stdout);
    assert!(table.contains(r"\u{1b}[2J\u{d} all good"), "{table}");
    // The columns stay aligned: the escaped name is what is padded.
    let dtype_column = |line: &str| line.find("F32").or_else(|| line.find("F16"));
    let rows: Vec<&str> = table.lines().skip(1).take(2).collect();
    assert_eq!(dtype_column(rows[0]), dtype_column(rows[1]), "{table}");
    let out = lowtide(["inspect".as_ref(), path.as_os_str(), "--json".as_ref()]);
    assert_no_controls("--json", &out.stdout);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tensors"][0]["name"], EVIL);

    // Errors naming the tensor: a duplicate name, overlapping extents.
    let name = serde_json::to_string(EVIL).unwrap();
    let entry = |begin: u32, end: u32| {
        format!(
            r#"{{"dtype":"U8","shape":[{}],"data_offsets":[{begin},{end}]}}"#,
            end - begin
        )
    };
    let dup = format!("{{{name}:{},{name}:{}}}", entry(0, 4), entry(4, 8));
    let overlap = format!(r#"{{"a":{},{name}:{}}}"#, entry(0, 4), entry(2, 6));
    for (file, header, data) in [("dup", dup, 8), ("overlap", overlap, 6)] {
        let path = write_raw(
            &dir.path().join(format!("{file}.safetensors")),
            header.as_bytes(),
            &vec![0; data],
        );
        let line = common::fails_fast(
            &["inspect".as_ref(), path.as_os_str()],
            &[r"`\u{1b}[2J\u{d} all good`"],
        );
        assert_no_controls("the error", line.as_bytes());
    }

    // A shard name in an index, and a file name in a directory.
    let model = dir.path().join("model");
    fs::create_dir(&model).unwrap();
    let index = model.join("m.safetensors.index.json");
    let shard = format!("{EVIL}.safetensors");
    let json = serde_json::json!({"weight_map": {"w": shard}});
    fs::write(&index, serde_json::to_vec(&json).unwrap()).unwrap();
    let line = common::fails_fast(&["inspect".as_ref(), index.as_os_str()], &["all good"]);
    assert_no_controls("the error", line.as_bytes());
    fs::remove_file(&index).unwrap();
    write(&model.join(&shard), &specs[..1]);
    let out = lowtide(["inspect".as_ref(), model.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_controls("the table of a directory", &out.stdout);
}

#[test]
fn a_json_file_without_weight_map_is_not_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    fs::write(
        &config,
        br#"{"_class_name": "UNet2DConditionModel", "in_channels": 4}"#,
    )
    .unwrap();
    both_fail(
        &[&config],
        &[&shown(&config), "not a safetensors index", "`weight_map`"],
    );
}

#[test]
fn counts_are_pluralised() {
    let dir = tempfile::tempdir().unwrap();
    let one = write(
        &dir.path().join("one.safetensors"),
        &[TensorSpec::new("w", Dtype::F32, &[2])],
    );
    let table = inspect_ok(&[&one], false);
    assert!(!table.contains("1 tensors"), "{table}");
    assert!(
        table
            .lines()
            .last()
            .unwrap()
            .starts_with("total: 1 tensor,"),
        "{table}"
    );
    let by_dtype = table
        .lines()
        .find(|l| l.trim_start().starts_with("F32"))
        .unwrap();
    assert!(by_dtype.contains(" 1 tensor "), "{by_dtype}");
}

/// Peak resident memory of a running process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn header_memory_stays_near_the_header_size() {
    // 100,000 tensors: a header of about 8 MB, as a model of many small tensors has.
    let dir = tempfile::tempdir().unwrap();
    let n = 100_000u64;
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    for i in 0..n {
        use std::fmt::Write as _;
        write!(
            header,
            r#","model.layers.{i}.mlp.w":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
            i + 1
        )
        .unwrap();
    }
    header.push('}');
    let path = write_raw(
        &dir.path().join("many.safetensors"),
        header.as_bytes(),
        &vec![0; usize::try_from(n).unwrap()],
    );

    // All models are opened before anything is printed, and the JSON (megabytes) does not fit
    // the pipe: once the first byte arrives the parse is done and the child is still alive,
    // blocked on the pipe, so its `VmHWM` is the peak of opening the file.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(["inspect".as_ref(), path.as_os_str(), "--json".as_ref()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("inspect prints");
    let peak = peak_rss(child.id()).expect("the child is alive, blocked on its output");
    std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success());

    let header_len = header.len() as u64;
    let limit = (16 << 20) + 6 * header_len;
    assert!(
        peak < limit,
        "inspect of a {header_len}-byte header peaked at {peak} bytes, over {limit}"
    );
}
