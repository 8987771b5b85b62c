//! The library's `log` messages on stderr, in the style of the command's own errors:
//! `lowtide: warning: ...`. Warnings and errors by default; `RUST_LOG` changes that with a
//! level (`RUST_LOG=info`, `off`) or comma-separated `target=level` directives
//! (`RUST_LOG=warn,lowtide::spill=debug`), the longest matching target winning.

use std::io::Write as _;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Installs the logger; `RUST_LOG` is read once, here.
pub(crate) fn init() {
    let (filter, ignored) = Filter::parse(std::env::var("RUST_LOG").ok().as_deref());
    log::set_max_level(filter.max());
    let logger: &'static Stderr = Box::leak(Box::new(Stderr { filter }));
    if log::set_logger(logger).is_err() {
        return;
    }
    for directive in ignored {
        log::warn!("RUST_LOG: ignoring `{directive}` (use a level or target=level)");
    }
}

/// Which records are shown: a default level and levels for targets (module paths).
#[derive(Debug, PartialEq)]
struct Filter {
    default: LevelFilter,
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// The filter `spec` describes, and the directives it did not understand.
    fn parse(spec: Option<&str>) -> (Self, Vec<String>) {
        let mut filter = Self {
            default: LevelFilter::Warn,
            targets: Vec::new(),
        };
        let mut ignored = Vec::new();
        for directive in spec.unwrap_or_default().split(',').map(str::trim) {
            if directive.is_empty() {
                continue;
            }
            match directive.split_once('=') {
                None => match directive.parse::<LevelFilter>() {
                    Ok(level) => filter.default = level,
                    // A bare target, as env_logger reads it: everything from it.
                    Err(_) if is_target(directive) => {
                        filter
                            .targets
                            .push((directive.to_owned(), LevelFilter::Trace));
                    }
                    Err(_) => ignored.push(directive.to_owned()),
                },
                Some((target, level)) => match level.trim().parse::<LevelFilter>() {
                    Ok(level) if is_target(target.trim()) => {
                        filter.targets.push((target.trim().to_owned(), level));
                    }
                    _ => ignored.push(directive.to_owned()),
                },
            }
        }
        // Longest first: the most specific directive decides.
        filter
            .targets
            .sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        (filter, ignored)
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(prefix, _)| {
                target
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
            .map_or(self.default, |&(_, level)| level)
    }

    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|&(_, level)| level)
            .fold(self.default, Ord::max)
    }
}

fn is_target(s: &str) -> bool {
    !s.is_empty()
        && s.split("::")
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

struct Stderr {
    filter: Filter,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line, so that lines of several threads do not interleave; a closed
        // stderr is not worth dying for.
        let _ = writeln!(std::io::stderr().lock(), "{}", line(record));
    }

    fn flush(&self) {}
}

/// The line a record prints. Messages quote names from model files: control characters are
/// escaped, as in error lines.
fn line(record: &Record<'_>) -> String {
    let line = match record.level() {
        Level::Error => format!("lowtide: error: {}", record.args()),
        Level::Warn => format!("lowtide: warning: {}", record.args()),
        Level::Info => format!("lowtide: info: {}", record.args()),
        level => format!(
            "lowtide: {}: {}: {}",
            level.as_str().to_ascii_lowercase(),
            record.target(),
            record.args()
        ),
    };
    crate::terminal_safe(&line)
}

#[cfg(test)]
mod tests {
    use log::LevelFilter;

    use super::Filter;

    #[test]
    fn lines_escape_control_characters() {
        let record = log::Record::builder()
            .level(log::Level::Warn)
            .args(format_args!("cannot spill tensor `\x1b[2K\r all good`"))
            .build();
        let line = super::line(&record);
        assert!(!line.contains(['\x1b', '\r']), "{line}");
        assert!(
            line.starts_with("lowtide: warning: cannot spill tensor"),
            "{line}"
        );
    }

    #[test]
    fn directives_set_the_default_and_targets() {
        let (filter, ignored) = Filter::parse(None);
        assert_eq!(filter.level_for("lowtide::spill"), LevelFilter::Warn);
        assert!(ignored.is_empty());

        let (filter, ignored) = Filter::parse(Some(
            "info, lowtide::spill=debug,lowtide=error,x=loud,=3,a b",
        ));
        assert_eq!(filter.level_for("lowtide::spill"), LevelFilter::Debug);
        assert_eq!(
            filter.level_for("lowtide::spill::allocator"),
            LevelFilter::Debug
        );
        assert_eq!(filter.level_for("lowtide::spiller"), LevelFilter::Error);
        assert_eq!(filter.level_for("lowtide"), LevelFilter::Error);
        assert_eq!(filter.level_for("indicatif"), LevelFilter::Info);
        assert_eq!(filter.max(), LevelFilter::Debug);
        assert_eq!(ignored, ["x=loud", "=3", "a b"]);

        let (filter, _) = Filter::parse(Some("off"));
        assert_eq!(filter.max(), LevelFilter::Off);
        let (filter, _) = Filter::parse(Some("lowtide_cli"));
        assert_eq!(filter.level_for("lowtide_cli::run"), LevelFilter::Trace);
        assert_eq!(filter.level_for("lowtide"), LevelFilter::Warn);
    }
}
