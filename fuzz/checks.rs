//! The properties the fuzz targets check, shared with the bounded property test that normal
//! CI runs (`crates/lowtide/tests/fuzz_props.rs`).

/// Any bytes as a whole safetensors file image: accepted with extents inside the image whose
/// lengths match dtype x shape, or rejected with a typed error; never a panic.
pub(crate) fn header(data: &[u8]) {
    if let Ok(tensors) = lowtide::parse::safetensors_image(data) {
        let len = data.len() as u64;
        for t in &tensors {
            assert!(t.offset.checked_add(t.len).is_some_and(|end| end <= len));
            let elements = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            assert_eq!(elements.and_then(|n| t.dtype.bytes_for(n)), Some(t.len));
        }
    }
}

/// Any bytes as a `model.safetensors.index.json`: a weight map whose shards are plain file
/// names in the index's directory, or a typed error; never a panic.
pub(crate) fn index(data: &[u8]) {
    if let Ok(map) = lowtide::parse::parse_index_json(data) {
        for shard in map.values() {
            let path = std::path::Path::new(shard);
            assert!(
                path.file_name().is_some_and(|f| f == path.as_os_str()),
                "{shard}"
            );
            assert!(shard != "." && shard != "..");
        }
    }
}

/// Any bytes as a whole GGUF file image: accepted with a power-of-two alignment, every tensor
/// inside the image at an aligned offset, its length that of its type and shape (whole
/// blocks), no two non-empty tensors overlapping and no name twice; or rejected with a typed
/// error; never a panic.
pub(crate) fn gguf(data: &[u8]) {
    if let Ok((gguf, tensors)) = lowtide::parse::gguf_image(data) {
        let len = data.len() as u64;
        let align = gguf.alignment();
        assert!(align.is_power_of_two());
        assert!(gguf.data_start() >= gguf.header_len());
        assert_eq!(gguf.data_start() % align, 0);
        assert_eq!(tensors.len(), gguf.tensors().len());
        let mut names = std::collections::HashSet::new();
        let mut end = 0;
        for t in &tensors {
            assert!(names.insert(t.name.as_str()), "{} twice", t.name);
            assert!(t.offset.checked_add(t.len).is_some_and(|e| e <= len));
            assert_eq!((t.offset - gguf.data_start()) % align, 0);
            assert_eq!(t.dtype.bytes_for_shape(&t.shape), Some(t.len));
            assert!(t.dtype.ggml_id().is_some());
            if t.len > 0 {
                assert!(t.offset >= end, "{} overlaps", t.name);
                end = t.offset + t.len;
            }
        }
        let mut keys = std::collections::HashSet::new();
        assert!(gguf.metadata().iter().all(|(k, _)| keys.insert(k)));
    }
}
