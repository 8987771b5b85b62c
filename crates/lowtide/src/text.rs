//! Showing text that came from a file: tensor names, metadata, shard names and paths.
//!
//! A name in a safetensors header is any JSON string, so it can hold ESC or CR: printed raw it
//! could clear the screen or overwrite an error line with something reassuring. Every name
//! from a file that lowtide prints goes through [`Escaped`] (paths through [`EscapedPath`]).

use std::fmt::{self, Write};
use std::path::Path;

/// Shows a string with its control characters escaped as `\u{1b}`: C0 controls (ESC, CR, LF,
/// TAB, ...), DEL, C1 controls, and the Unicode bidirectional overrides and isolates, which
/// reorder what a terminal shows. Other text, including non-ASCII, is shown as it is.
///
/// Honours width and alignment (`{:<20}`), counted in characters of the escaped form.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl Escaped<'_> {
    /// Characters the escaped form has (what `{:<width$}` pads to).
    pub fn char_count(&self) -> usize {
        self.0
            .chars()
            .map(|c| {
                if is_unsafe(c) {
                    c.escape_unicode().len()
                } else {
                    1
                }
            })
            .sum()
    }
}

/// Whether `c` is escaped by [`Escaped`].
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(is_unsafe) {
            return f.pad(self.0);
        }
        let mut shown = String::with_capacity(self.0.len() + 16);
        for c in self.0.chars() {
            if is_unsafe(c) {
                write!(shown, "{}", c.escape_unicode())?;
            } else {
                shown.push(c);
            }
        }
        f.pad(&shown)
    }
}

/// Shows a path like [`Path::display`] (bytes that are not UTF-8 replaced), with control
/// characters escaped as by [`Escaped`].
#[derive(Debug, Clone, Copy)]
pub struct EscapedPath<'a>(pub &'a Path);

impl fmt::Display for EscapedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Escaped(&self.0.to_string_lossy()), f)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Escaped, EscapedPath};

    #[test]
    fn controls_are_escaped_and_other_text_kept() {
        let name = "\u{1b}[2J\r all good\u{7f}\u{9b}\u{202e}";
        let shown = Escaped(name).to_string();
        assert_eq!(shown, r"\u{1b}[2J\u{d} all good\u{7f}\u{9b}\u{202e}");
        assert_eq!(Escaped(name).char_count(), shown.chars().count());
        assert_eq!(Escaped("modèle.重み").to_string(), "modèle.重み");
        assert_eq!(format!("[{:<6}]", Escaped("a\tb")), r"[a\u{9}b]");
        assert_eq!(format!("[{:<6}]", Escaped("ab")), "[ab    ]");
        assert_eq!(
            EscapedPath(Path::new("dir/\u{1b}x.safetensors")).to_string(),
            r"dir/\u{1b}x.safetensors"
        );
    }
}
