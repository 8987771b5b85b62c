//! Handles: the small copyable ids of models, tensors and devices in a store.
//!
//! A leaf module: the store, the policy and the devices all name tensors by these, and none
//! of them depends on another through them.

/// A model opened in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub(crate) u32);

/// A tensor registered in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub(crate) u32);

/// A device added to a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub(crate) u32);
