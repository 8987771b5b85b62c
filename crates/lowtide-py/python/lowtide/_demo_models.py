"""The demo's models: a ComfyUI-shaped session of real ``torch.nn`` modules (a text encoder, a
UNet-like denoiser with cross-attention, a VAE-like decoder), their seeded safetensors files
and two LoRAs for the denoiser. Sizes scale with ``scale``; at 1.0 the weights total about
3.2 GiB of BF16.

The weights are stored in BF16, in the files and in the modules, and computed with as ComfyUI
does on a CPU (its ``manual_cast`` operations): each layer casts its weights to float32 for
its own forward (a temporary copy, freed after it) and activations stay in float32. CPUs
without BF16 units run a BF16 matmul about 150 times slower than a float32 one, so computing
in BF16 would make the demo a test of the CPU rather than of memory management."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the usual name)

DTYPE = torch.bfloat16  # the weights', in the files and in the modules
COMPUTE = torch.float32  # the activations', and the weights' for the length of one forward


def _cast(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``param`` in ``like``'s dtype for one forward (ComfyUI's ``cast_bias_weight``)."""
    return param.to(like.dtype)


def _cast_bias(param: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if param is None else param.to(like.dtype)


# --- layers that store BF16 and compute in the input's dtype (ComfyUI's manual_cast) -------


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast_bias(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _cast(self.weight, x), _cast_bias(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, _cast(self.weight, x), _cast_bias(self.bias, x), self.eps
        )


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x, self.num_groups, _cast(self.weight, x), _cast_bias(self.bias, x), self.eps
        )


class Embedding(nn.Embedding):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Only the rows looked up are cast (the same values as casting the whole table).
        return F.embedding(tokens, self.weight).to(COMPUTE)


@dataclass(frozen=True)
class Sizes:
    """Widths and depths for one scale."""

    text_width: int
    text_depth: int
    vocab: int
    tokens: int
    unet_channels: tuple[int, ...]
    unet_depth: int
    vae_channels: tuple[int, ...]
    latent: int  # latent side; the image is 8x larger

    @staticmethod
    def at(scale: float) -> Sizes:
        if not 0 < scale <= 4:
            raise ValueError(f"--scale must be in (0, 4], not {scale}")
        # Widths grow with the cube root of the scale and depths take the rest, so that the
        # bytes grow about linearly with it.
        width = scale ** (1 / 3)

        def w(n: int) -> int:
            return max(64, round(n * width / 64) * 64)

        def d(n: int) -> int:
            return max(1, round(n * width))

        return Sizes(
            text_width=w(2048),
            text_depth=d(10),
            vocab=w(32000),
            tokens=16,
            unet_channels=(w(320), w(640), w(1280)),
            unet_depth=d(6),
            vae_channels=(w(512), w(512), w(256), w(128)),
            latent=16,
        )


# --- the models ---------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width: int, context: int | None = None, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = Linear(width, width, bias=False)
        self.to_k = Linear(context or width, width, bias=False)
        self.to_v = Linear(context or width, width, bias=False)
        self.to_out = Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class TextBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.attn = Attention(width)
        self.norm2 = LayerNorm(width)
        self.fc1 = Linear(width, 4 * width)
        self.fc2 = Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """A transformer text encoder (T5/CLIP-like): token embedding, blocks, final norm."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.embed = Embedding(s.vocab, s.text_width)
        self.blocks = nn.ModuleList(TextBlock(s.text_width) for _ in range(s.text_depth))
        self.norm = LayerNorm(s.text_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int, time: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(32, channels)
        self.conv1 = Conv2d(channels, channels, 3, padding=1)
        self.time = Linear(time, channels)
        self.norm2 = GroupNorm(32, channels)
        self.conv2 = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(t)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context: int) -> None:
        super().__init__()
        self.norm = GroupNorm(32, channels)
        self.proj_in = Linear(channels, channels)
        self.norm1 = LayerNorm(channels)
        self.attn1 = Attention(channels)
        self.norm2 = LayerNorm(channels)
        self.attn2 = Attention(channels, context)
        self.norm3 = LayerNorm(channels)
        self.ff1 = Linear(channels, 4 * channels)
        self.ff2 = Linear(4 * channels, channels)
        self.proj_out = Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        y = y + self.attn1(self.norm1(y))
        y = y + self.attn2(self.norm2(y), context)
        y = y + self.ff2(F.gelu(self.ff1(self.norm3(y))))
        return x + self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    def __init__(self, channels: int, depth: int, time: int, context: int) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResBlock(channels, time) for _ in range(depth))
        self.attn = nn.ModuleList(SpatialTransformer(channels, context) for _ in range(depth))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for res, attn in zip(self.res, self.attn, strict=True):
            x = attn(res(x, t), context)
        return x


class Denoiser(nn.Module):
    """A UNet-like denoiser: conv in, down levels of res + cross-attention blocks, a middle,
    up levels with skip connections, conv out."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        ch = s.unet_channels
        time = 4 * ch[0]
        self.time_in = Linear(ch[0], time)
        self.time_out = Linear(time, time)
        self.conv_in = Conv2d(4, ch[0], 3, padding=1)
        self.down = nn.ModuleList(Level(c, s.unet_depth, time, s.text_width) for c in ch)
        self.downsample = nn.ModuleList(
            Conv2d(a, b, 3, stride=2, padding=1) for a, b in itertools.pairwise(ch)
        )
        self.mid = Level(ch[-1], 1, time, s.text_width)
        self.upsample = nn.ModuleList(Conv2d(b, a, 3, padding=1) for a, b in itertools.pairwise(ch))
        self.up = nn.ModuleList(Level(c, s.unet_depth, time, s.text_width) for c in ch)
        self.norm_out = GroupNorm(32, ch[0])
        self.conv_out = Conv2d(ch[0], 4, 3, padding=1)
        self.base = ch[0]

    def forward(self, x: torch.Tensor, step: float, context: torch.Tensor) -> torch.Tensor:
        half = self.base // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angles = step * freqs
        t = torch.cat([angles.sin(), angles.cos()])[None].to(x.dtype)  # float32
        t = self.time_out(F.silu(self.time_in(t)))
        h = self.conv_in(x)
        skips = []
        for index, level in enumerate(self.down):
            h = level(h, t, context)
            skips.append(h)
            if index < len(self.downsample):
                h = self.downsample[index](h)
        h = self.mid(h, t, context)
        for index in reversed(range(len(self.up))):
            if index < len(self.upsample):
                h = self.upsample[index](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[index](h + skips[index], t, context)
        return self.conv_out(F.silu(self.norm_out(h)))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(32, cin)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm(32, cout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Decoder(nn.Module):
    """A VAE-like decoder: latent to image through res blocks and three 2x upsamplings."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        ch = s.vae_channels
        self.conv_in = Conv2d(4, ch[0], 3, padding=1)
        self.mid = nn.ModuleList([DecoderBlock(ch[0], ch[0]), DecoderBlock(ch[0], ch[0])])
        self.blocks = nn.ModuleList(
            nn.ModuleList([DecoderBlock(a, b), DecoderBlock(b, b)])
            for a, b in itertools.pairwise(ch)
        )
        self.ups = nn.ModuleList(Conv2d(b, b, 3, padding=1) for b in ch[1:])
        self.norm_out = GroupNorm(32, ch[-1])
        self.conv_out = Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for pair, up in zip(self.blocks, self.ups, strict=True):
            for block in pair:  # type: ignore[attr-defined]
                h = block(h)
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))


MODELS = {"text_encoder": TextEncoder, "denoiser": Denoiser, "decoder": Decoder}

# The denoiser's weights each LoRA patches: the attention projections, as style LoRAs do.
LORA_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out")
LORA_RANK = 16


def build(kind: str, s: Sizes, device: str | torch.device = "meta") -> nn.Module:
    """A model of ``kind`` with uninitialised weights on ``device`` (meta: no memory)."""
    with torch.device(device):
        module = MODELS[kind](s)
    return module.to(DTYPE).eval()


# --- files --------------------------------------------------------------------------------


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded weights that keep activations bounded: norms 1, biases small, matrices scaled
    by their fan-in."""
    if name.endswith("bias"):
        return (torch.randn(shape, generator=gen) * 0.01).to(DTYPE)
    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=DTYPE)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if name.endswith("embed.weight"):
        fan_in = 1
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(DTYPE)


def _write_streaming(path: Path, tensors: Iterator[tuple[str, torch.Tensor]], shapes) -> None:
    """Writes a safetensors file tensor by tensor (never more than one in memory)."""
    header: dict = {"__metadata__": {"written_by": "lowtide.demo"}}
    offset = 0
    for name, (dtype, shape) in shapes.items():
        nbytes = math.prod(shape) * {"BF16": 2, "F32": 4}[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for _, tensor in tensors:
            out.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        out.flush()
        os.fsync(out.fileno())
    tmp.rename(path)


def model_files(directory: Path, scale: float, log=print) -> dict[str, Path]:
    """The three model files and two LoRAs for ``scale``, written once into ``directory``
    (seeded: the same bytes every time) and reused afterwards."""
    s = Sizes.at(scale)
    tag = hashlib.sha256(repr(s).encode()).hexdigest()[:10]
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for seed, kind in enumerate(MODELS):
        path = directory / f"{kind}-{tag}.safetensors"
        paths[kind] = path
        if path.exists():
            continue
        module = build(kind, s)
        state = module.state_dict()
        shapes = {name: ("BF16", tuple(t.shape)) for name, t in state.items()}
        total = sum(math.prod(shape) * 2 for _, shape in shapes.values())
        log(f"writing {path.name} ({total / 2**30:.2f} GiB, once)")
        gen = torch.Generator().manual_seed(1000 + seed)
        tensors = ((name, _init(name, shape, gen)) for name, (_, shape) in shapes.items())
        _write_streaming(path, tensors, shapes)
    denoiser = build("denoiser", s)
    targets = [
        (name, sub)
        for name, sub in denoiser.named_modules()
        if isinstance(sub, nn.Linear) and name.endswith(LORA_TARGETS)
    ]
    for index in range(2):
        path = directory / f"lora-{index}-{tag}.safetensors"
        paths[f"lora{index}"] = path
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(2000 + index)
        shapes = {}
        values = {}
        for name, sub in targets:
            stem = "lora_unet_" + name.replace(".", "_")
            values[f"{stem}.lora_down.weight"] = torch.randn(
                LORA_RANK, sub.in_features, generator=gen
            ) / math.sqrt(sub.in_features)
            values[f"{stem}.lora_up.weight"] = torch.randn(
                sub.out_features, LORA_RANK, generator=gen
            ) * (0.5 / math.sqrt(LORA_RANK))
            values[f"{stem}.alpha"] = torch.tensor([float(LORA_RANK)])
        for key, value in values.items():
            shapes[key] = ("F32", tuple(value.shape))
        log(f"writing {path.name} ({len(targets)} LoRA pairs, once)")
        _write_streaming(path, iter(values.items()), shapes)
    return paths


def file_bytes(paths: dict[str, Path]) -> int:
    """Bytes of the three models' files."""
    return sum(paths[kind].stat().st_size for kind in MODELS)
