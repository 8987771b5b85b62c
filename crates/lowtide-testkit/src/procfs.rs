//! Readings of the process's own counters in `/proc/self`: what it read and wrote, its memory.

use std::fs;

/// The process's I/O counters from `/proc/self/io`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcIo {
    /// Bytes passed to write-like system calls.
    pub wchar: u64,
    /// Bytes this process caused to be sent to the storage layer.
    pub write_bytes: u64,
    /// Bytes this process caused to be fetched from the storage layer.
    pub read_bytes: u64,
}

impl ProcIo {
    /// Reads `/proc/self/io`; `None` where it is missing or unreadable.
    pub fn read() -> Option<Self> {
        let text = fs::read_to_string("/proc/self/io").ok()?;
        let mut io = Self::default();
        for line in text.lines() {
            let (key, value) = line.split_once(':')?;
            let value: u64 = value.trim().parse().ok()?;
            match key {
                "wchar" => io.wchar = value,
                "write_bytes" => io.write_bytes = value,
                "read_bytes" => io.read_bytes = value,
                _ => {}
            }
        }
        Some(io)
    }
}

/// The process's own memory figures from `/proc/self/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcMemory {
    /// Anonymous resident memory now (`RssAnon`).
    pub rss_anon: u64,
    /// Peak resident memory (`VmHWM`).
    pub vm_hwm: u64,
}

impl ProcMemory {
    /// Reads `/proc/self/status`; `None` where it is missing or unreadable.
    pub fn read() -> Option<Self> {
        let text = fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| -> Option<u64> {
            let line = text.lines().find(|line| line.starts_with(key))?;
            let value = line[key.len()..].trim().trim_end_matches("kB").trim();
            value.parse::<u64>().ok().map(|v| v * 1024)
        };
        Some(Self {
            rss_anon: kib("RssAnon:")?,
            vm_hwm: kib("VmHWM:")?,
        })
    }
}
