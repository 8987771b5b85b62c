//! `lowtide inspect` on GGUF files: on files the reference implementation wrote (the `gguf`
//! package's `GGUFWriter`, `crates/lowtide/tests/reference/write_gguf_reference.py`) its JSON
//! agrees with what the reference `GGUFReader` reads; malformed files exit 1 with one line
//! naming the check and the byte offset.
//!
//! Needs Python with `pip install gguf numpy`: `target/python-venv` (made by `scripts/test`)
//! when it exists, else `python3`. Without them the reference test fails when `CI` is set and
//! is skipped with a message otherwise.

mod common;

use std::path::Path;

use common::{json_of, lowtide, text};
use lowtide::{Dtype, GgufValue};
use lowtide_testkit::{TensorSpec, gguf_reference_files, same_json, write_gguf};
use serde_json::Value;

/// The reference files and their manifest, or `None` when Python or its packages are missing
/// and `CI` is not set.
fn reference(test: &str) -> Option<(tempfile::TempDir, Value)> {
    gguf_reference_files(test, Path::new(env!("CARGO_TARGET_TMPDIR")))
}

#[test]
fn inspect_json_agrees_with_the_reference_reader() {
    let Some((dir, manifest)) = reference("inspect_json_agrees_with_the_reference_reader") else {
        return;
    };
    for file in manifest["files"].as_array().unwrap() {
        let rel = file["file"].as_str().unwrap();
        let path = dir.path().join(rel);
        let report = json_of(&lowtide(&["inspect", "--json", path.to_str().unwrap()]));
        let row = &report["files"][0];
        assert_eq!(row["format"], "gguf", "{rel}");
        let gguf = &row["gguf"];
        assert_eq!(gguf["version"], file["version"], "{rel}");
        assert_eq!(gguf["alignment"], file["alignment"], "{rel}");
        assert_eq!(gguf["data_start"], file["data_start"], "{rel}");
        let metadata = file["metadata"].as_array().unwrap();
        assert_eq!(gguf["keys"], metadata.len(), "{rel}");
        assert_eq!(gguf["architecture"], "lowtide-test", "{rel}");
        let name = metadata
            .iter()
            .find(|m| m["key"] == "general.name")
            .unwrap();
        assert_eq!(gguf["name"], name["value"], "{rel}");

        // Every key, in the reader's order, with the reader's value (long arrays summarised).
        let ours = row["metadata"].as_object().unwrap();
        let keys: Vec<&str> = ours.keys().map(String::as_str).collect();
        let want: Vec<&str> = metadata
            .iter()
            .map(|m| m["key"].as_str().unwrap())
            .collect();
        let mut sorted = want.clone();
        sorted.sort_unstable();
        assert!(keys == want || keys == sorted, "{rel}: keys {keys:?}");
        for m in metadata {
            let key = m["key"].as_str().unwrap();
            let value = &ours[key];
            let f32 = m["type"] == "FLOAT32" || m["element_type"] == "FLOAT32";
            if let Some(len) = m["len"].as_u64().filter(|&n| n > 64) {
                assert_eq!(value["len"], len, "{rel}: {key}");
                assert_eq!(value["element_type"], m["element_type"], "{rel}: {key}");
            } else {
                assert!(
                    same_json(value, &m["value"], f32),
                    "{rel}: {key}: {value} != {}",
                    m["value"]
                );
            }
        }

        // Tensors: name, type, shape (outermost first), dims as written, offset, size.
        let tensors = report["tensors"].as_array().unwrap();
        let want = file["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), want.len(), "{rel}");
        for m in want {
            let t = tensors.iter().find(|t| t["name"] == m["name"]).unwrap();
            let what = format!("{rel}: {}", m["name"]);
            assert_eq!(t["dtype"], m["type"], "{what}");
            assert_eq!(t["ggml_type"], m["type_id"], "{what}");
            assert_eq!(t["shape"], m["shape"], "{what}");
            assert_eq!(t["dims"], m["dims"], "{what}");
            assert_eq!(t["offset"], m["offset"], "{what}");
            assert_eq!(t["bytes"], m["bytes"], "{what}");
        }

        // The table shows the same tensors and the metadata summary, names escaped.
        let out = lowtide(&["inspect", path.to_str().unwrap()]);
        assert!(out.status.success());
        let table = text(&out.stdout);
        assert!(!table.contains('\u{1b}'), "{table}");
        assert!(table.contains("gguf metadata:"), "{table}");
        assert!(
            table.contains(&format!("alignment {}", file["alignment"])),
            "{table}"
        );
        for m in want {
            assert!(table.contains(m["type"].as_str().unwrap()), "{table}");
        }
    }
}

#[test]
fn malformed_gguf_files_exit_1_with_the_check_and_the_byte_offset() {
    let dir = lowtide_testkit::tempdir();
    let path = dir.path().join("m.gguf");
    let specs = [TensorSpec::new("\u{1b}[2Jw", Dtype::Q4_0, &[2, 64])];
    let meta = [(
        "general.architecture".to_owned(),
        GgufValue::String("llama".into()),
    )];
    let layout = write_gguf(&path, &specs, &meta, |_, b| b.fill(1)).unwrap();
    let good = std::fs::read(&path).unwrap();
    let run = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        lowtide(&["inspect", "--json", path.to_str().unwrap()])
    };
    // Truncated in the header; the tensor type unknown; its data cut short.
    let type_at = layout.header_len as usize - 12;
    let mut unknown = good.clone();
    unknown[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let cases: [(Vec<u8>, &str); 3] = [
        (good[..30].to_vec(), "past the end"),
        (unknown, "unknown tensor type 77"),
        (
            good[..layout.offsets[0] as usize + 71].to_vec(),
            "runs past the end",
        ),
    ];
    for (bytes, says) in cases {
        let out = run(&bytes);
        assert_eq!(out.status.code(), Some(1), "{says}");
        assert!(out.stdout.is_empty(), "{says}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("invalid GGUF file") && err.contains(says),
            "{err}"
        );
        assert!(err.contains("byte offset"), "{err}");
        assert!(!err.contains('\u{1b}'), "{err:?}");
    }
}
