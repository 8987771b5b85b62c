//! Guards: a pinned view of a tensor's bytes. While a guard lives, its copy is never evicted.

use std::ops::Deref;
use std::sync::Arc;

use super::{Shared, TensorId, Tier};
use crate::dtype::Dtype;
use crate::element::Element;
use crate::source::Source;
use crate::store::ram::RamBuf;

pub(super) enum View {
    Ram(Arc<RamBuf>),
    Mapped {
        source: Arc<Source>,
        offset: usize,
        len: usize,
    },
    /// Only while the guard is dropped: its share of the copy is given up before the pin, so
    /// whoever frees the copy next holds the last reference.
    Released,
}

/// A pinned view of one tensor's bytes, from a RAM copy or the mapped source.
///
/// Dropping the guard unpins the copy. The bytes stay valid for the guard's whole life.
pub struct TensorGuard {
    pub(super) shared: Arc<Shared>,
    pub(super) id: TensorId,
    pub(super) dtype: Dtype,
    pub(super) shape: Arc<[usize]>,
    pub(super) view: View,
}

/// A typed view refused by [`TensorGuard::as_slice`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The tensor's dtype is not the element type asked for.
    #[error("the tensor is {have}, not {want}")]
    Dtype {
        /// The tensor's dtype.
        have: Dtype,
        /// The dtype of the element type asked for.
        want: Dtype,
    },
    /// The bytes do not start at a multiple of the element's alignment (a mapped view of a
    /// tensor at an unaligned file offset, or a RAM copy restored from one):
    /// [`TensorGuard::to_vec_of`] copies instead.
    #[error("the bytes at {addr:#x} are not aligned to {align} bytes")]
    Misaligned {
        /// The address of the first byte.
        addr: usize,
        /// The alignment needed.
        align: usize,
    },
}

impl TensorGuard {
    /// The tensor this guard pins.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// The copy the bytes come from.
    pub fn tier(&self) -> Tier {
        match self.view {
            View::Ram(_) | View::Released => Tier::Ram,
            View::Mapped { .. } => Tier::Mapped,
        }
    }

    /// The tensor's element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The tensor's shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The bytes as elements of `T`, without a copy. `T`'s dtype must be the tensor's.
    ///
    /// Alignment: a RAM copy lowtide allocated (derived from aligned bytes, restored from the
    /// spill file, downloaded or recomputed) starts on a page; a RAM copy restored from the
    /// model file and a mapped view start where the tensor's file offset falls within its page,
    /// so they are aligned for `T` when the file offset is (safetensors writers align the data
    /// section to 8 bytes, and tensors of one dtype packed together stay aligned to it).
    /// Misaligned bytes are [`ViewError::Misaligned`], never an unaligned reference.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], ViewError> {
        if self.dtype != T::DTYPE {
            return Err(ViewError::Dtype {
                have: self.dtype,
                want: T::DTYPE,
            });
        }
        let bytes = self.bytes();
        crate::sys::cast::cast_slice(bytes).ok_or(ViewError::Misaligned {
            addr: bytes.as_ptr() as usize,
            align: std::mem::align_of::<T>(),
        })
    }

    /// The elements copied out as `T`, whatever the bytes' alignment (little-endian, as
    /// safetensors stores them). `T`'s dtype must be the tensor's.
    pub fn to_vec_of<T: Element>(&self) -> Result<Vec<T>, ViewError> {
        match self.as_slice::<T>() {
            Ok(slice) => Ok(slice.to_vec()),
            Err(ViewError::Misaligned { .. }) => {
                let size = std::mem::size_of::<T>();
                let mut out: Vec<T> = Vec::with_capacity(self.bytes().len() / size);
                for chunk in self.bytes().chunks_exact(size) {
                    out.push(crate::sys::cast::read_unaligned(chunk));
                }
                Ok(out)
            }
            Err(err) => Err(err),
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
            View::Released => &[],
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
        // The copy first, then the pin: once unpinned, an eviction may free the copy at once,
        // and must find no other reference to it.
        drop(std::mem::replace(&mut self.view, View::Released));
        // In a forked child the registry is a stale copy whose lock another thread of the
        // parent may have held at the fork: the pin is left as it is.
        if self.shared.owner.is_current() {
            self.shared.unpin(self.id);
        }
    }
}

impl std::fmt::Debug for TensorGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorGuard")
            .field("id", &self.id)
            .field("tier", &self.tier())
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("len", &self.bytes().len())
            .finish_non_exhaustive()
    }
}
