//! Spill directories where spilling cannot work, on real file systems: under `/proc` (no
//! `O_TMPFILE`, no files), a read-only tmpfs, and ramfs (no `fallocate`). The store is built
//! all the same, says so once at build with a warning naming the directory, serves its
//! tensors, and a spill is a typed error. The mounts need root; elsewhere those tests say why
//! they are skipped.

mod common;

use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};

use lowtide::{Dtype, SpillError, Store, StoreError};
use lowtide_testkit::Mount;

/// Every warning logged by this test binary.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::default())));
        log::set_logger(capture).expect("the only logger of this binary");
        log::set_max_level(log::LevelFilter::Warn);
        capture
    })
}

/// The warnings so far that name `dir`.
fn warnings_about(dir: &Path) -> Vec<String> {
    let needle = format!("spill file in {}:", dir.display());
    capture()
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|w| w.contains(&needle))
        .cloned()
        .collect()
}

/// Builds a store spilling to `dir`, checks the one warning, serves a derived tensor and
/// refuses to spill it; returns the spill error.
fn unusable(dir: &Path, why: &str) -> SpillError {
    capture();
    let models = common::tempdir();
    let path = common::unet(&models);
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir)
        .build()
        .expect("an unusable spill directory does not fail the build");
    let warnings = warnings_about(dir);
    assert_eq!(warnings.len(), 1, "one warning at build: {warnings:?}");
    assert!(warnings[0].contains(why), "{}", warnings[0]);
    assert!(
        warnings[0].contains("spilling will fail"),
        "{}",
        warnings[0]
    );

    let model = store.open_model(&path).unwrap();
    let clean = store.tensors(model).unwrap()[0];
    assert!(!store.acquire_ram(clean).unwrap().is_empty());
    let derived = store
        .derive(model, "patched", Dtype::U8, &[8192], vec![7u8; 8192])
        .unwrap();
    let err = store.spill(derived).unwrap_err();
    assert!(
        store.info(derived).unwrap().in_ram,
        "the tensor keeps its bytes"
    );
    assert!(store.acquire_ram(derived).unwrap().iter().all(|&b| b == 7));
    match err {
        StoreError::Update(lowtide::UpdateError::Spill { source, .. }) => source,
        other => panic!("expected a spill error, got {other}"),
    }
}

#[test]
fn a_spill_dir_under_proc_warns_at_build() {
    let dir = Path::new("/proc/self");
    let err = unusable(dir, "cannot create");
    assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
}

#[test]
fn a_read_only_spill_dir_warns_at_build() {
    // Root ignores permission bits: a file system mounted read-only refuses root too.
    let fs = match Mount::new("tmpfs", "size=1m,ro") {
        Ok(fs) => fs,
        Err(why) => return eprintln!("skipped: read-only spill directory: {why}"),
    };
    let err = unusable(&fs.path(), "Read-only file system");
    assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
}

#[test]
fn a_spill_dir_without_fallocate_warns_at_build() {
    // ramfs has O_TMPFILE but no fallocate: the file is created, its space cannot be reserved.
    let fs = match Mount::new("ramfs", "mode=0700") {
        Ok(fs) => fs,
        Err(why) => return eprintln!("skipped: spill directory without fallocate: {why}"),
    };
    let err = unusable(&fs.path(), "cannot reserve space in");
    assert!(
        matches!(
            err,
            SpillError::Io {
                op: "reserve space in",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(fs.path()).unwrap().count(),
        0,
        "nothing named is left"
    );
}

#[test]
fn a_working_spill_dir_builds_without_a_warning() {
    capture();
    let dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    assert!(warnings_about(dir.path()).is_empty());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    drop(store);
}
