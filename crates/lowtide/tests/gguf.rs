//! GGUF sources: malformed headers rejected with the check and the byte offset, shapes in
//! the documented order, and a GGUF model served through every tier of the store (mapped
//! views, RAM copies, cold `O_DIRECT` restores, a `SimDevice`, the spill file).

mod common;

use std::sync::Arc;

use common::TensorSpec;
use lowtide::parse::gguf_image;
use lowtide::{Dtype, GgufError, GgufValue, SimDevice, Source, SourceError, Store, Tier};
use lowtide_testkit::{gguf_image as image_of, write_gguf};

/// A header written field by field, for malformed files.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, tensors: u64, keys: u64) -> Self {
        let mut raw = Raw(b"GGUF".to_vec());
        raw.u32(version).u64(tensors).u64(keys);
        raw
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A key with a `u32` value.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    /// A tensor info (dims innermost first).
    fn tensor(&mut self, name: &str, dims: &[u64], ggml: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ggml).u64(offset)
    }
    /// Pads to `align` and appends `data` bytes of zeros.
    fn data(&mut self, align: usize, data: usize) -> Vec<u8> {
        let mut out = self.0.clone();
        out.resize(out.len().next_multiple_of(align) + data, 0);
        out
    }
}

fn err(bytes: &[u8]) -> GgufError {
    match gguf_image(bytes) {
        Ok(_) => panic!("accepted"),
        Err(err) => err,
    }
}

#[test]
fn a_valid_raw_file_is_accepted() {
    let bytes = Raw::new(3, 2, 1)
        .kv_u32("general.alignment", 64)
        .tensor("a", &[32, 2], Dtype::Q4_0.ggml_id().unwrap(), 0)
        .tensor("b", &[3], 0, 64)
        .data(64, 76);
    let (gguf, tensors) = gguf_image(&bytes).unwrap();
    assert_eq!(gguf.alignment(), 64);
    assert_eq!(gguf.version(), 3);
    assert_eq!(tensors[0].shape, [2, 32], "outermost first");
    assert_eq!(gguf.tensors()[0].dims, [32, 2], "as written");
    assert_eq!(tensors[0].len, 36);
    assert_eq!(tensors[1].offset, gguf.data_start() + 64);
    // Version 2 has the same layout.
    let v2 = Raw::new(2, 0, 0).data(32, 0);
    assert_eq!(gguf_image(&v2).unwrap().0.version(), 2);
}

#[test]
fn truncated_headers_name_the_field_and_its_offset() {
    let bytes = Raw::new(3, 1, 1)
        .kv_u32("general.name.len", 7)
        .tensor("w", &[4], 0, 0)
        .data(32, 16);
    let (gguf, _) = gguf_image(&bytes).unwrap();
    for cut in 0..gguf.header_len() as usize {
        match err(&bytes[..cut]) {
            GgufError::Truncated {
                offset, file_len, ..
            } => {
                assert!(offset <= cut as u64 && file_len == cut as u64, "cut {cut}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    // Past the header, the tensor's data is missing.
    let cut = &bytes[..bytes.len() - 1];
    assert!(matches!(err(cut), GgufError::OutOfBounds { ref name, .. } if name == "w"));
}

#[test]
fn counts_and_lengths_over_their_caps() {
    let e = err(&Raw::new(3, 1 << 40, 0).data(32, 0));
    assert!(
        matches!(e, GgufError::Count { count, offset: 8, .. } if count == 1 << 40),
        "{e:?}"
    );
    assert!(e.to_string().contains("byte offset 8"), "{e}");
    let e = err(&Raw::new(3, 0, 1 << 40).data(32, 0));
    assert!(matches!(e, GgufError::Count { offset: 16, .. }), "{e:?}");
    // A key of length u64::MAX.
    let e = err(&Raw::new(3, 0, 1).u64(u64::MAX).data(32, 0));
    assert!(
        matches!(
            e,
            GgufError::Count {
                count: u64::MAX,
                offset: 24,
                ..
            }
        ),
        "{e:?}"
    );
    // A string value of length u64::MAX.
    let e = err(&Raw::new(3, 0, 1).str("k").u32(8).u64(u64::MAX).data(32, 0));
    assert!(
        matches!(
            e,
            GgufError::Count {
                count: u64::MAX,
                offset: 37,
                ..
            }
        ),
        "{e:?}"
    );
    // An array of 2^40 elements, and one of a million that the file cannot hold.
    let e = err(&Raw::new(3, 0, 1)
        .str("k")
        .u32(9)
        .u32(0)
        .u64(1 << 40)
        .data(32, 0));
    assert!(matches!(e, GgufError::Count { .. }), "{e:?}");
    let e = err(&Raw::new(3, 0, 1)
        .str("k")
        .u32(9)
        .u32(10)
        .u64(1 << 20)
        .data(32, 0));
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    // A tensor name of length u64::MAX.
    let e = err(&Raw::new(3, 1, 0).u64(u64::MAX).data(32, 0));
    assert!(
        matches!(
            e,
            GgufError::Count {
                count: u64::MAX,
                offset: 24,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_types_and_bad_values() {
    let e = err(&Raw::new(3, 0, 1).str("k").u32(13).data(32, 0));
    assert!(
        matches!(e, GgufError::UnknownValueType { value_type: 13, offset: 33, ref key } if key == "k"),
        "{e:?}"
    );
    let e = err(&Raw::new(3, 0, 1).str("k").u32(9).u32(99).u64(0).data(32, 0));
    assert!(
        matches!(
            e,
            GgufError::UnknownValueType {
                value_type: 99,
                offset: 37,
                ..
            }
        ),
        "{e:?}"
    );
    for ggml in [4, 5, 31, 32, 33, 36, 37, 38, 42, u32::MAX] {
        let e = err(&Raw::new(3, 1, 0)
            .tensor("w", &[256], ggml, 0)
            .data(32, 4096));
        assert!(
            matches!(e, GgufError::UnknownTensorType { type_id, .. } if type_id == ggml),
            "{e:?}"
        );
    }
    let mut bad_bool = Raw::new(3, 0, 1);
    bad_bool.str("k").u32(7);
    bad_bool.0.push(2);
    assert!(matches!(
        err(&bad_bool.data(32, 0)),
        GgufError::Bool {
            byte: 2,
            offset: 37,
            ..
        }
    ));
    // Arrays nested five deep.
    let mut deep = Raw::new(3, 0, 1);
    deep.str("k").u32(9);
    for _ in 0..5 {
        deep.u32(9).u64(1);
    }
    deep.u32(0).u64(0);
    assert!(matches!(
        err(&deep.data(32, 0)),
        GgufError::ArrayDepth { .. }
    ));
    let e = err(&Raw::new(1, 0, 0).data(32, 0));
    assert!(matches!(e, GgufError::Version { version: 1 }), "{e:?}");
    assert!(matches!(err(b"GGUG\x03\0\0\0"), GgufError::Magic));
    let mut utf8 = Raw::new(3, 0, 1);
    utf8.u64(2);
    utf8.0.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        err(&utf8.u32(0).data(32, 1)),
        GgufError::NotUtf8 { offset: 24, .. }
    ));
}

#[test]
fn alignment_must_be_a_u32_power_of_two() {
    for bad in [0, 3, 48, 1000] {
        let e = err(&Raw::new(3, 0, 1)
            .kv_u32("general.alignment", bad)
            .data(32, 0));
        assert!(
            matches!(e, GgufError::Alignment { alignment, offset: 53 } if alignment == u64::from(bad)),
            "{e:?}"
        );
    }
    let e = err(&Raw::new(3, 0, 1)
        .str("general.alignment")
        .u32(10)
        .u64(32)
        .data(32, 0));
    assert!(
        matches!(e, GgufError::AlignmentType { offset: 49, .. }),
        "{e:?}"
    );
    let ok = Raw::new(3, 1, 1)
        .kv_u32("general.alignment", 1)
        .tensor("w", &[3], 24, 0)
        .data(1, 3);
    assert_eq!(gguf_image(&ok).unwrap().0.alignment(), 1);
}

#[test]
fn offsets_shapes_and_names() {
    let f32 = 0;
    // Misaligned (default alignment 32).
    let e = err(&Raw::new(3, 1, 0).tensor("w", &[4], f32, 16).data(32, 64));
    assert!(
        matches!(
            e,
            GgufError::Misaligned {
                data_offset: 16,
                alignment: 32,
                ..
            }
        ),
        "{e:?}"
    );
    // Overlapping: b starts inside a.
    let e = err(&Raw::new(3, 2, 0)
        .tensor("a", &[16], f32, 0)
        .tensor("b", &[4], f32, 32)
        .data(32, 128));
    assert!(
        matches!(e, GgufError::Overlap { ref name, ref other, .. } if name == "b" && other == "a"),
        "{e:?}"
    );
    // Products that overflow u64 or ggml's int64, and a dimension over int64 beside a zero.
    for dims in [
        &[1 << 32, 1 << 32, 4][..],
        &[1 << 62, 4],
        &[0, u64::MAX],
        &[u64::MAX],
    ] {
        let e = err(&Raw::new(3, 1, 0).tensor("w", dims, f32, 0).data(32, 64));
        assert!(
            matches!(e, GgufError::ShapeOverflow { .. }),
            "{dims:?}: {e:?}"
        );
    }
    // A zero dimension makes the product zero whatever the others (each under int64).
    let zero = Raw::new(3, 1, 0)
        .tensor("w", &[0, 1 << 40, 1 << 40], f32, 0)
        .data(32, 0);
    assert_eq!(gguf_image(&zero).unwrap().1[0].len, 0);
    // Elements fit int64 but the bytes of F64 do not fit u64: also an overflow.
    let e = err(&Raw::new(3, 1, 0)
        .tensor("w", &[1 << 62], 28, 0)
        .data(32, 64));
    assert!(matches!(e, GgufError::ShapeOverflow { .. }), "{e:?}");
    // The innermost (first) dimension is not whole blocks; the outer one may be anything.
    let q4 = Dtype::Q4_0.ggml_id().unwrap();
    let e = err(&Raw::new(3, 1, 0)
        .tensor("w", &[33, 32], q4, 0)
        .data(32, 4096));
    assert!(
        matches!(
            e,
            GgufError::PartialBlock {
                innermost: 33,
                block: 32,
                offset: 37,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        gguf_image(
            &Raw::new(3, 1, 0)
                .tensor("w", &[32, 33], q4, 0)
                .data(32, 33 * 18)
        )
        .is_ok()
    );
    // Too many dimensions, duplicate names and keys, data past the end.
    let e = err(&Raw::new(3, 1, 0)
        .tensor("w", &[1, 1, 1, 1, 1], f32, 0)
        .data(32, 4));
    assert!(matches!(e, GgufError::Dims { n_dims: 5, .. }), "{e:?}");
    let e = err(&Raw::new(3, 2, 0)
        .tensor("w", &[1], f32, 0)
        .tensor("w", &[1], f32, 32)
        .data(32, 36));
    assert!(matches!(e, GgufError::DuplicateName { .. }), "{e:?}");
    let e = err(&Raw::new(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2).data(32, 0));
    assert!(
        matches!(e, GgufError::DuplicateKey { offset: 41, .. }),
        "{e:?}"
    );
    let e = err(&Raw::new(3, 1, 0)
        .tensor("w", &[4], f32, u64::MAX - 31)
        .data(32, 16));
    assert!(
        matches!(
            e,
            GgufError::OutOfBounds {
                start: u64::MAX,
                ..
            }
        ),
        "{e:?}"
    );
    // Empty tensors overlap nothing.
    let empties = Raw::new(3, 2, 0)
        .tensor("a", &[0], f32, 0)
        .tensor("b", &[4], f32, 0)
        .data(32, 16);
    assert!(gguf_image(&empties).is_ok());
}

#[test]
fn messages_escape_names_from_the_file() {
    let e = err(&Raw::new(3, 1, 0)
        .tensor("\u{1b}[2J\r ok", &[4], 77, 0)
        .data(32, 16));
    let shown = e.to_string();
    assert!(!shown.contains(['\u{1b}', '\r']), "{shown:?}");
    assert!(shown.contains("byte offset"), "{shown}");
}

#[test]
fn source_open_recognises_gguf_by_its_magic_and_reports_errors_with_the_path() {
    let dir = common::tempdir();
    let specs = [TensorSpec::new("w", Dtype::Q8_0, &[2, 64])];
    // No `.gguf` extension: the magic decides.
    let path = dir.path().join("model.bin");
    write_gguf(&path, &specs, &[], |_, b| b.fill(3)).unwrap();
    let source = Source::open(&path).unwrap();
    assert_eq!(source.format(), lowtide::SourceFormat::Gguf);
    assert_eq!(source.tensors()[0].dtype, Dtype::Q8_0);
    assert!(source.metadata().is_empty());
    // Truncated on disk: a typed error naming the file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..40]).unwrap();
    match Source::open(&path) {
        Err(SourceError::Gguf {
            path: p,
            source: GgufError::Truncated { .. },
        }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
}

/// A GGUF model of quantized and float tensors, some large enough for direct reads.
fn gguf_specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("blk.0.attn_q.weight", Dtype::Q4_K, &[1024, 2048]),
        TensorSpec::new("blk.0.attn_norm.weight", Dtype::F32, &[1023]),
        TensorSpec::new("blk.0.ffn_up.weight", Dtype::Q8_0, &[777, 1024]),
        TensorSpec::new("blk.0.ffn_down.weight", Dtype::IQ2_XXS, &[300, 512]),
        TensorSpec::new("token_embd.weight", Dtype::F16, &[513, 333]),
        TensorSpec::new("output.weight", Dtype::BF16, &[17, 33, 3]),
    ]
}

#[test]
fn a_gguf_model_is_served_through_every_tier() {
    let dir = common::tempdir();
    let path = dir.path().join("model.gguf");
    let specs = gguf_specs();
    let meta = vec![(
        "general.architecture".to_owned(),
        GgufValue::String("llama".into()),
    )];
    write_gguf(&path, &specs, &meta, |i, b| common::fill(&specs[i].name, b)).unwrap();
    let want = |name: &str, len: u64| common::expected(name, len);

    // Cold: nothing of the data in the page cache, so RAM copies are read with O_DIRECT.
    let file = std::fs::File::open(&path).unwrap();
    lowtide::direct::drop_cached(&file).unwrap();
    let cold =
        lowtide::direct::cached_bytes(&file, 0, file.metadata().unwrap().len()).unwrap() == 0;

    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .monitor(false)
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 64 << 20)));
    let model = store.open_model(&path).unwrap();
    assert_eq!(store.tensors(model).unwrap().len(), specs.len());
    for spec in &specs {
        let id = store.tensor(model, &spec.name).unwrap();
        let info = store.info(id).unwrap();
        assert_eq!(info.dtype, spec.dtype);
        assert!(
            info.shape
                .iter()
                .map(|&d| d as u64)
                .eq(spec.shape.iter().copied()),
            "{info:?}"
        );
        assert_eq!(info.len, spec.byte_len().unwrap());
        let expected = want(&spec.name, info.len);
        let ram = store.acquire_ram(id).unwrap();
        assert_eq!(ram.tier(), Tier::Ram);
        assert!(ram[..] == expected[..], "{}: RAM bytes", spec.name);
        drop(ram);
        store.drop_clean(id).unwrap();
        let mapped = common::mapped(&store, id).unwrap();
        assert_eq!(mapped.tier(), Tier::Mapped);
        assert!(
            mapped.bytes() == &expected[..],
            "{}: mapped bytes",
            spec.name
        );
        drop(mapped);
        let device = store.acquire_device(id, gpu).unwrap();
        assert!(
            device.download().unwrap() == expected,
            "{}: device bytes",
            spec.name
        );
    }
    let stats = store.stats();
    if cold {
        assert!(stats.bytes_read_cold > 0, "{stats:?}");
    }
    assert_eq!(stats.bytes_written, 0, "clean copies write nothing");

    // A derived tensor of a ggml type: spilled, then read back from the spill file.
    let q = store.tensor(model, "blk.0.ffn_up.weight").unwrap();
    let patched: Vec<u8> = store
        .acquire_ram(q)
        .unwrap()
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    let derived = store
        .derive(
            model,
            "blk.0.ffn_up.weight.patched",
            Dtype::Q8_0,
            &[777, 1024],
            patched.clone(),
        )
        .unwrap();
    // Shapes whose innermost dimension is not whole blocks are refused.
    assert!(
        store
            .derive(model, "bad", Dtype::Q8_0, &[1024, 777], patched.clone())
            .is_err()
    );
    assert!(store.spill(derived).unwrap() > 0);
    let info = store.info(derived).unwrap();
    assert!(info.spilled && !info.in_ram, "{info:?}");
    assert!(
        store.acquire_ram(derived).unwrap()[..] == patched[..],
        "spilled bytes"
    );
    assert!(store.stats().bytes_spilled >= patched.len() as u64);
}

#[test]
fn testkit_images_round_trip_every_ggml_type() {
    let specs: Vec<TensorSpec> = lowtide::Dtype::ALL
        .iter()
        .filter(|d| d.ggml_id().is_some())
        .enumerate()
        .map(|(i, &d)| TensorSpec::new(format!("t{i}"), d, &[3, d.block().elements * 2]))
        .collect();
    let (image, layout) = image_of(&specs, &[], |i, b| b.fill(i as u8)).unwrap();
    let (gguf, tensors) = gguf_image(&image).unwrap();
    assert_eq!(gguf.tensors().len(), specs.len());
    for (spec, offset) in specs.iter().zip(&layout.offsets) {
        let t = tensors.iter().find(|t| t.name == spec.name).unwrap();
        assert_eq!(
            (t.dtype, &t.shape, t.offset),
            (spec.dtype, &spec.shape, *offset)
        );
        assert_eq!(t.len, spec.dtype.block().bytes * 6);
    }
}
