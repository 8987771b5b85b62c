"""The errors of ``lowtide.torch``: each a :class:`lowtide.LowtideError` and the builtin
class code caught before (``ValueError``, ``RuntimeError``)."""

from __future__ import annotations

import lowtide


class BindError(lowtide.LowtideError, ValueError):
    """A module that cannot be bound to its model files: a weight missing from them or of
    another shape or dtype, no weight matched at all, a tensor that nothing would fill, or a
    file ``lowtide.torch`` does not take. The module is left as it was."""


class LoraError(lowtide.LowtideError, ValueError):
    """A LoRA that cannot be merged: no pair matches a managed weight, a pair whose shapes do
    not fit its weight, a rank of 0, a strength or alpha that is not finite, an adapter config
    that cannot be used. Checked before any weight changes: nothing was patched."""


class ForwardRunning(lowtide.LowtideError, RuntimeError):
    """A call that changes which weights a module computes with (``patch``, ``unpatch``,
    ``close``, ``load`` to another device) made while a forward of the module runs, in this
    thread or another. Nothing was changed: call it again once the forward returned."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}: a forward of the managed module is running; call it between forwards",
            retryable=True,
        )
