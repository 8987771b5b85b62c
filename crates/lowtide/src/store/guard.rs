//! Guards: a pinned view of a tensor's bytes. While a guard lives, its copy is never evicted.

use std::ops::Deref;
use std::sync::Arc;

use super::{Shared, TensorId, Tier};
use crate::source::Source;
use crate::store::state::RamBuf;

pub(super) enum View {
    Ram(Arc<RamBuf>),
    Mapped {
        source: Arc<Source>,
        offset: usize,
        len: usize,
    },
}

/// A pinned view of one tensor's bytes, from a RAM copy or the mapped source.
///
/// Dropping the guard unpins the copy. The bytes stay valid for the guard's whole life.
pub struct TensorGuard {
    pub(super) shared: Arc<Shared>,
    pub(super) id: TensorId,
    pub(super) view: View,
}

impl TensorGuard {
    /// The tensor this guard pins.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// The copy the bytes come from.
    pub fn tier(&self) -> Tier {
        match self.view {
            View::Ram(_) => Tier::Ram,
            View::Mapped { .. } => Tier::Mapped,
        }
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.view {
            View::Ram(buf) => buf.as_slice(),
            View::Mapped {
                source,
                offset,
                len,
            } => source.mapped_bytes(*offset, *len),
        }
    }
}

impl Deref for TensorGuard {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl AsRef<[u8]> for TensorGuard {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for TensorGuard {
    fn drop(&mut self) {
        self.shared.unpin(self.id);
    }
}

impl std::fmt::Debug for TensorGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorGuard")
            .field("id", &self.id)
            .field("tier", &self.tier())
            .field("len", &self.bytes().len())
            .finish_non_exhaustive()
    }
}
