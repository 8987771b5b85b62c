"""``lowtide.torch``: the weights of a ``torch.nn.Module`` managed by a lowtide :class:`Store`.

:func:`manage` binds every parameter and persistent buffer of a module to a tensor of its
model files by name, without reading anything, and leaves them on the ``meta`` device. Then:

- :meth:`ManagedModule.load` materialises weights on a device up to a byte budget; the rest
  come in when a submodule's forward needs them and leave after it, so a model larger than
  the budget still runs;
- :meth:`ManagedModule.unload` frees them again: an unchanged weight is let go with nothing
  written (lowtide reads it again from the file), a patched one stays in lowtide's RAM while the
  budget and the reserve allow and goes to the spill file when they do not;
- :meth:`ManagedModule.patch` merges a LoRA into the weights; the merged weights become
  lowtide's dirty tensors. :meth:`ManagedModule.unpatch` returns to the file's weights without
  any backup copy.

Build the module under :func:`init_empty`: its parameters are created on ``meta`` (nothing
allocated), while its buffers are computed by its own code as usual. Buffers that are not in
the model files (``position_ids``, a rotary ``inv_freq``) then hold what the module computes.
A module built under ``torch.device("meta")`` has those buffers on ``meta`` too, and
:func:`manage` refuses it, naming each tensor nothing would fill.

On the CPU a loaded weight *is* lowtide's RAM copy, used by torch in place through DLPack (no
second copy): it stays pinned while the module holds it. On CUDA a weight is uploaded from
lowtide's RAM copy (read with ``O_DIRECT`` when cold), which is then evictable at once::

    import lowtide, lowtide.torch

    store = lowtide.Store(ram_budget="12GiB", reserve_ram="2GiB")
    with lowtide.torch.init_empty():
        unet = UNet(config)
    managed = lowtide.torch.manage(unet, store, "unet.safetensors")
    managed.load("cpu", budget="6GiB")     # what does not fit streams in per submodule
    managed.patch("style.safetensors", 0.8)
    image = unet(latents, t, text)         # an ordinary forward
    managed.unload()                       # unchanged weights: nothing written
    managed.unpatch()                      # the file's weights again, no backup kept

Each parameter keeps the ``requires_grad`` the module gave it, so a managed module computes
exactly what the same module loaded the ordinary way computes.

Threads: forwards of one managed module may run in several threads at once; a weight is let
go only when no running forward uses it. Each thread's streamed weights need room of their
own: when the store cannot hold them all, a forward raises :class:`lowtide.OverBudget`,
never computes with a missing weight. :meth:`~ManagedModule.patch`,
:meth:`~ManagedModule.unpatch`, :meth:`~ManagedModule.close` and a
:meth:`~ManagedModule.load` to another device raise :class:`ForwardRunning` while a forward
runs. An exception in a forward, ``KeyboardInterrupt`` included, leaves no weight held.

Parameters read by a module other than the one that owns them (a tied embedding read through
another module's ``forward``, a position embedding read by its parent) must be loaded: declare
them with :meth:`ManagedModule.keep_loaded`, and every :meth:`ManagedModule.load` loads them
first; a forward only brings in weights of the module it belongs to.
"""

from lowtide.torch._binding import init_empty
from lowtide.torch._errors import BindError, ForwardRunning, LoraError
from lowtide.torch._lora import LoraReport, merge_lora
from lowtide.torch._managed import ManagedModule, manage

__all__ = [
    "BindError",
    "ForwardRunning",
    "LoraError",
    "LoraReport",
    "ManagedModule",
    "init_empty",
    "manage",
    "merge_lora",
]
