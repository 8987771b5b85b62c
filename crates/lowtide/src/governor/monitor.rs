//! The monitor thread: a PSI trigger plus periodic sampling of available memory.
//!
//! PSI ("pressure stall information") reports time lost waiting for memory. A trigger such as
//! `some 150000 2000000` (150 ms stalled within any 2 s window) is written to the pressure file;
//! `poll` then reports `POLLPRI` when it fires. Unprivileged triggers need a window that is a
//! multiple of 2 s. Where PSI is missing the thread only samples, and says so once in the log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, poll};

use crate::sys::fork::Owner;

/// A PSI trigger: stalled time within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PressureTrigger {
    /// Fire when some task stalled at least this long...
    pub stall: Duration,
    /// ...within this window (a multiple of 2 s without privileges).
    pub window: Duration,
}

impl Default for PressureTrigger {
    /// 150 ms of stall per 2 s window.
    fn default() -> Self {
        Self {
            stall: Duration::from_millis(150),
            window: Duration::from_secs(2),
        }
    }
}

impl PressureTrigger {
    /// The text written to the pressure file, NUL-terminated as the kernel expects.
    pub fn to_trigger_string(self) -> String {
        format!(
            "some {} {}\0",
            self.stall.as_micros(),
            self.window.as_micros()
        )
    }
}

/// A registered trigger: the open pressure file to poll.
#[derive(Debug)]
pub(crate) struct Registered {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

/// Registers `trigger` on `path`.
pub(crate) fn register(path: &Path, trigger: PressureTrigger) -> std::io::Result<Registered> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
        .open(path)?;
    file.write_all(trigger.to_trigger_string().as_bytes())?;
    Ok(Registered {
        file,
        path: path.to_path_buf(),
    })
}

/// What the monitor calls on every tick.
pub(crate) trait Relieve: Send + Sync + 'static {
    /// `pressure` is true when the PSI trigger fired since the last call.
    fn tick(&self, pressure: bool);
}

/// The running monitor thread; stops and is joined on drop (except in a forked child, which
/// has a copy of this handle but not the thread).
#[derive(Debug)]
pub(crate) struct Monitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    thread: ThreadId,
    /// The process the thread runs in.
    owner: Owner,
    /// The pressure file watched, if PSI was available.
    pub(crate) pressure_file: Option<PathBuf>,
}

impl Monitor {
    /// Starts the thread. `target` is held weakly: when it is gone the thread ends.
    pub(crate) fn spawn<R: Relieve>(
        target: std::sync::Weak<R>,
        pressure_files: &[PathBuf],
        trigger: PressureTrigger,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let mut registered = None;
        for path in pressure_files {
            match register(path, trigger) {
                Ok(r) => {
                    registered = Some(r);
                    break;
                }
                Err(err) => log::debug!("PSI trigger on {} failed: {err}", path.display()),
            }
        }
        if registered.is_none() {
            log::info!(
                "memory pressure (PSI) is not available here; sampling available memory every {interval:?} instead"
            );
        }
        let pressure_file = registered.as_ref().map(|r| r.path.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("lowtide-monitor".into())
            .spawn(move || {
                run(&target, registered.as_ref(), &thread_stop, interval);
            })?;
        let thread = handle.thread().id();
        Ok(Self {
            stop,
            handle: Some(handle),
            thread,
            owner: Owner::current(),
            pressure_file,
        })
    }
}

fn run<R: Relieve>(
    target: &std::sync::Weak<R>,
    registered: Option<&Registered>,
    stop: &AtomicBool,
    interval: Duration,
) {
    // Poll in short slices so that a stop request is seen quickly.
    let slice = interval.min(Duration::from_millis(100));
    let timeout = rustix::event::Timespec {
        tv_sec: i64::try_from(slice.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(slice.subsec_nanos()),
    };
    let mut since_sample = Duration::ZERO;
    while !stop.load(Ordering::Acquire) {
        let fired = if let Some(r) = registered {
            let mut fds = [PollFd::new(&r.file, PollFlags::PRI)];
            poll(&mut fds, Some(&timeout))
                .is_ok_and(|_| fds[0].revents().intersects(PollFlags::PRI | PollFlags::ERR))
        } else {
            thread::sleep(slice);
            false
        };
        since_sample += slice;
        if !fired && since_sample < interval {
            continue;
        }
        since_sample = Duration::ZERO;
        let Some(target) = target.upgrade() else {
            break;
        };
        target.tick(fired);
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The store may be dropped by the monitor thread itself (its temporary strong
        // reference was the last): never join oneself.
        if thread::current().id() == self.thread {
            return;
        }
        if !self.owner.is_current() {
            // A forked child: the thread is its parent's, and joining a thread the child
            // does not have would never return (or abort). The handle is forgotten.
            std::mem::forget(self.handle.take());
            return;
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PressureTrigger, register};
    use std::path::Path;

    #[test]
    fn trigger_text() {
        assert_eq!(
            PressureTrigger::default().to_trigger_string(),
            "some 150000 2000000\0"
        );
    }

    #[test]
    fn a_psi_trigger_registers_where_proc_pressure_exists() {
        let path = Path::new("/proc/pressure/memory");
        if !path.exists() {
            eprintln!("skipped: {} does not exist on this kernel", path.display());
            return;
        }
        let registered = register(path, PressureTrigger::default());
        assert!(
            registered.is_ok(),
            "PSI trigger on {}: {registered:?}",
            path.display()
        );
    }
}
