"""LoRA files and their merge: kohya, diffusers and PEFT naming, PEFT adapter configs, and
``W += up @ down * scale`` as PEFT's ``merge_and_unload`` computes it."""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lowtide
from lowtide.torch._binding import Slot
from lowtide.torch._errors import LoraError

Lora = str | os.PathLike[str] | Mapping[str, torch.Tensor]


@dataclass
class LoraReport:
    """What :meth:`ManagedModule.patch` did."""

    patched: list[str] = field(default_factory=list)
    """Module weights a LoRA pair was merged into."""
    unmatched: list[str] = field(default_factory=list)
    """LoRA key stems that named no managed weight (left alone)."""


def merge_lora(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | None,
    strength: float,
) -> torch.Tensor:
    """``weight + up @ down * (strength * (alpha / rank))``, computed in float32 on
    ``weight``'s device and returned in ``weight``'s dtype (a new tensor). Conv weights are
    handled by flattening; ``alpha`` defaults to the rank. Raises :class:`LoraError` for a
    rank of 0 or a strength or alpha that is not finite."""
    rank = down.shape[0] if down.dim() else 0
    if rank == 0:
        raise LoraError(f"a LoRA of rank 0 (down has shape {list(down.shape)})")
    scaling = 1.0 if alpha is None else finite(float(alpha), "alpha") / rank
    return merge(weight, down, up, finite(float(strength), "strength") * scaling)


def merge(
    weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``weight + delta * scale`` in float32, ``delta = up @ down`` (transposed for
    ``fan_in_fan_out`` weights, stored as inputs x outputs), as PEFT's merge computes it."""
    device = weight.device
    delta = up.to(device, torch.float32).flatten(1) @ down.to(device, torch.float32).flatten(1)
    if fan_in_fan_out:
        delta = delta.T
    merged = weight.to(torch.float32) + delta.reshape(weight.shape) * scale
    return merged.to(weight.dtype)


def finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise LoraError(f"a LoRA {what} of {value}: it must be a finite number")
    return value


def lora_pairs(
    lora: Lora,
    prefix: str | None,
    store: lowtide.Store,
    with_room: Callable[[int, Callable[[], torch.Tensor]], torch.Tensor],
) -> tuple[dict[str, Pair], lowtide.Model | None]:
    """LoRA stems (module names, prefix removed) -> their pair, the tensors as callables
    so that a file's tensors are read only when merged; and the LoRA's model, opened in
    ``store`` when ``lora`` is a file (the caller closes it). ``with_room(nbytes, read)``
    makes room for each read."""
    lora_model = None
    if isinstance(lora, Mapping):
        keys = list(lora)

        def shape(key: str) -> tuple[int, ...]:
            return tuple(lora[key].shape)  # type: ignore[index]

        def get(key: str) -> torch.Tensor:
            return lora[key]  # type: ignore[index]
    else:
        path = Path(lora)
        lora_model = store.open_model(path / "adapter_model.safetensors" if path.is_dir() else path)
        keys = lora_model.names()
        model = lora_model

        def shape(key: str) -> tuple[int, ...]:
            return tuple(model.info(key).shape)

        def get(key: str) -> torch.Tensor:
            info = model.info(key)
            # A copy of its own: the LoRA's RAM copy is let go at once.
            return with_room(info.nbytes, lambda: model.torch(key).clone())

    try:
        found: dict[str, dict[str, str]] = {}
        for key in keys:
            match = _LORA_KEY.match(key)
            if match is None:
                continue
            stem = strip_prefix(match["stem"], prefix)
            found.setdefault(stem, {})[_ROLES[match["role"]]] = key
        pairs: dict[str, Pair] = {}
        for stem, roles in found.items():
            if "down" not in roles or "up" not in roles:
                continue
            alpha = None
            if "alpha" in roles:
                alpha = finite(float(get(roles["alpha"]).float().item()), "alpha")
            pairs[stem] = Pair(
                down_key=roles["down"],
                down_shape=shape(roles["down"]),
                up_shape=shape(roles["up"]),
                alpha=alpha,
                down=functools.partial(get, roles["down"]),
                up=functools.partial(get, roles["up"]),
            )
        if not pairs:
            raise LoraError("no LoRA down/up pairs found (kohya or diffusers/PEFT naming)")
    except BaseException:
        if lora_model is not None:
            lora_model.close()
        raise
    return pairs, lora_model


@dataclass
class Pair:
    """A LoRA's down/up pair for one weight; the tensors are read when called."""

    down_key: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    alpha: float | None  # kohya's per-pair alpha, when the file has it
    down: Callable[[], torch.Tensor]
    up: Callable[[], torch.Tensor]


@dataclass
class AdapterConfig:
    """What a PEFT ``adapter_config.json`` says about the scaling of its pairs."""

    path: str
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool
    fan_in_fan_out: bool


def adapter_config(lora: Lora) -> AdapterConfig | None:
    """The PEFT adapter config beside (or inside) a LoRA path, if there is one."""
    if isinstance(lora, Mapping):
        return None
    path = Path(lora)
    path = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("use_dora"):
            raise LoraError(f"{path}: DoRA adapters (use_dora) cannot be merged by lowtide.torch")
        r = raw.get("r", 8)
        config = AdapterConfig(
            path=str(path),
            r=r,
            alpha=finite(float(raw.get("lora_alpha", r)), "lora_alpha"),
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={
                str(k): finite(float(v), "alpha_pattern value")
                for k, v in (raw.get("alpha_pattern") or {}).items()
            },
            rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        )
    except LoraError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise LoraError(f"{path}: not a usable PEFT adapter config ({err})") from err
    if not isinstance(config.r, int) or config.r <= 0:
        raise LoraError(f"{path}: r must be a positive integer, not {config.r!r}")
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup: the first pattern that matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def scaling(pair: Pair, config: AdapterConfig | None, slot: Slot, stem: str) -> tuple[float, bool]:
    """A pair's ``alpha / rank`` (PEFT's ``scaling``) and whether its weight is stored
    inputs x outputs; checks that the pair fits the weight."""
    rank = pair.down_shape[0] if pair.down_shape else 0
    if rank == 0:
        raise LoraError(f"{pair.down_key}: a LoRA of rank 0 (shape {list(pair.down_shape)})")
    transposed = False
    if pair.alpha is not None:
        scaling = pair.alpha / rank
    elif config is not None:
        module = slot.name.removesuffix(".weight")
        r = _pattern_value(config.rank_pattern, module, config.r)
        alpha = _pattern_value(config.alpha_pattern, module, config.alpha)
        if r != rank:
            raise LoraError(
                f"{pair.down_key}: {config.path} gives rank {r} for {module}, the file's "
                f"pair has rank {rank}"
            )
        scaling = alpha / math.sqrt(r) if config.rslora else alpha / r
        transposed = config.fan_in_fan_out
    else:
        scaling = 1.0
    out_dim, in_dims = (1, 0) if transposed else (0, 1)
    fits = (
        len(pair.up_shape) >= 2
        and math.prod(pair.up_shape[1:]) == rank
        and len(slot.shape) >= 2
        and pair.up_shape[0] == slot.shape[out_dim]
        and math.prod(pair.down_shape[1:])
        == (slot.shape[0] if transposed else math.prod(slot.shape[in_dims:]))
    )
    if not fits:
        raise LoraError(
            f"{stem}: a LoRA pair with down {list(pair.down_shape)} and up "
            f"{list(pair.up_shape)} does not fit {slot.name} {list(slot.shape)}"
        )
    return scaling, transposed


_LORA_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|lora_A\.weight|"
    r"lora_B\.weight|lora\.down\.weight|lora\.up\.weight)$"
)
_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "alpha": "alpha",
}
_PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "lora_transformer_",
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "unet.",
    "transformer.",
    "text_encoder.",
)


def strip_prefix(stem: str, prefix: str | None) -> str:
    if prefix is not None:
        return stem.removeprefix(prefix)
    for known in _PREFIXES:
        if stem.startswith(known):
            return stem[len(known) :]
    return stem


def normal(name: str) -> str:
    """Kohya names replace the dots of module paths with underscores: compare that way."""
    return name.replace(".", "_")
