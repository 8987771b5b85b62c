//! Human-readable byte sizes at the edges ("8GiB", "512MB"); inside, bytes as `u64`.

use std::fmt;
use std::str::FromStr;

/// A number of bytes parsed from or shown as a human string.
///
/// Accepted forms: a plain number of bytes (`"4096"`), decimal units `KB MB GB TB`
/// (powers of 1000), binary units `KiB MiB GiB TiB` (powers of 1024), and the single letters
/// `K M G T`, which are binary as in cgroup and container tools. Units are case-insensitive,
/// fractions are allowed (`"1.5GiB"`) and a space may separate number and unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// A byte count in messages: the human size with the exact count beside it
/// (`44.71 MiB (46881792 bytes)`), or just the count under 1 KiB (`512 bytes`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bytes(pub(crate) u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1024 {
            write!(f, "{} bytes", self.0)
        } else {
            write!(f, "{} ({} bytes)", ByteSize(self.0), self.0)
        }
    }
}

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseSizeError {
    /// Nothing but spaces.
    #[error("empty size")]
    Empty,
    /// The number part is not a non-negative number.
    #[error("`{input}` does not start with a non-negative number")]
    Number {
        /// The whole input.
        input: String,
    },
    /// The unit is not one of the accepted ones.
    #[error("unknown unit `{unit}` in `{input}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")]
    Unit {
        /// The unit as written.
        unit: String,
        /// The whole input.
        input: String,
    },
    /// The value does not fit in 64 bits.
    #[error("`{input}` is too large")]
    Overflow {
        /// The whole input.
        input: String,
    },
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim();
        let number_err = || ParseSizeError::Number {
            input: input.to_owned(),
        };
        if number.is_empty() || number.starts_with('.') {
            return Err(number_err());
        }
        let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "mb" => 1000_u64.pow(2),
            "gb" => 1000_u64.pow(3),
            "tb" => 1000_u64.pow(4),
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            _ => {
                return Err(ParseSizeError::Unit {
                    unit: unit.to_owned(),
                    input: input.to_owned(),
                });
            }
        };
        let overflow = || ParseSizeError::Overflow {
            input: input.to_owned(),
        };
        if let Ok(whole) = number.parse::<u64>() {
            return whole
                .checked_mul(multiplier)
                .map(ByteSize)
                .ok_or_else(overflow);
        }
        let value: f64 = number.parse().map_err(|_| number_err())?;
        let bytes = (value * multiplier as f64).round();
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(overflow());
        }
        #[allow(clippy::cast_sign_loss)] // `value` is non-negative: no sign in the grammar
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    /// Binary units with up to two decimals: `1.50 GiB`, `512 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.2} {}", UNITS[unit])
        }
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        Self(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::{ByteSize, ParseSizeError};

    fn parse(s: &str) -> Result<u64, ParseSizeError> {
        s.parse::<ByteSize>().map(ByteSize::bytes)
    }

    #[test]
    fn units() {
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse("512MB").unwrap(), 512_000_000);
        assert_eq!(parse("512 mib").unwrap(), 512 << 20);
        assert_eq!(parse("2G").unwrap(), 2 << 30);
        assert_eq!(parse("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse(" 7 B ").unwrap(), 7);
    }

    #[test]
    fn byte_counts_in_messages() {
        assert_eq!(super::Bytes(512).to_string(), "512 bytes");
        assert_eq!(
            super::Bytes(46_881_792).to_string(),
            "44.71 MiB (46881792 bytes)"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse(""), Err(ParseSizeError::Empty));
        assert!(matches!(parse("GiB"), Err(ParseSizeError::Number { .. })));
        assert!(matches!(parse("-1GiB"), Err(ParseSizeError::Number { .. })));
        assert!(matches!(
            parse("3 parsecs"),
            Err(ParseSizeError::Unit { .. })
        ));
        assert!(matches!(
            parse("99999999999TiB"),
            Err(ParseSizeError::Overflow { .. })
        ));
        assert!(matches!(
            parse("1.2.3GB"),
            Err(ParseSizeError::Number { .. })
        ));
    }

    #[test]
    fn display() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.50 GiB");
    }
}
