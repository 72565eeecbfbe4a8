"""Lossy compression of cached floating tensors to at most `compression_ratio` of their bytes.

Why: the same budget then holds 2x (fp16) to 4-8x (int8/int4) more DiT tensors (prompt
embeddings, latents, block activations), at an error a diffusion step tolerates.

Each floating tensor is stored in the most precise form whose bytes fit
`ratio * original bytes`, tried in this order (n elements seen as R rows of the last
dimension D; a 0-d tensor is one row of one; s = original element size):

    form         stored bytes                     max error  mean error
    raw          n*s (kept when ratio >= 1)       0          0
    fp32         4n (fp64 originals only)         2^-24      <= 2^-24
    fp16         2n (fp32/fp64, see below)        2^-11      <= 2^-11, measured 1.8e-4
    bf16         2n (fp32/fp64 out of fp16 range) 2^-8       <= 2^-8
    int8-row     n + 4R  (a scale per row)        1/254      measured 5.9e-3 .. 7.5e-3
    int8-col     n + 4D  (a scale per column)     1/254      (int8-row/col: same)
    int8-tensor  n + 4   (one scale)              1/254      data-dependent
    int4-row     R*ceil(D/2) + 4R                 1/14       measured 0.109 .. 0.137
    int4-col     R*ceil(D/2) + 4D                 1/14       (int4-row/col: same)
    int4-tensor  R*ceil(D/2) + 4                  1/14       data-dependent
    raw          n*s: nothing fits, full size     0          0

Errors: max = `max|x - x'| / max|x|`, mean = `mean|x - x'| / mean|x|` (see
`relative_errors`). The max column is a bound (`error_bound`); restoring to a 16-bit
original adds that dtype's rounding, `u * (1 + q)` with u = 2^-8 for bf16 and 2^-11 for
fp16, so int8 restored to bf16 is bounded by ~0.0079, not 0.0039. The cast forms also
bound the mean. The int means were measured on CPU at ratios 0.7 and 0.3, fp32 and bf16
originals, on N(0,1) [256, 1024], Flux-like packed latents [1, 4096, 64] (per-channel
mean and std), T5-like prompt embeddings [1, 256, 4096] with six outlier channels (std
3 vs 0.15) and DiT-like hidden states [1, 512, 3072] with four "massive activation"
channels at +-200; `MEAN_ERROR_BOUND` (int8 0.01, int4 0.16) is what
`tests/workers/dit_cache/test_compression.py` asserts on those tensors, on CPU and CUDA.

fp16 is used when `2^-14 <= absmax <= 65504` (no overflow, no precision lost to
subnormals relative to absmax), else bf16 (fp32's range).

Quantization is symmetric absmax: `scale = absmax / 127` (int8) or `/ 7` (int4),
`q = round(x / scale)`, kept as int8 or as two 4-bit codes per byte (rows padded to an
even length); scales are fp32 (exact, no overflow) and their bytes are counted. The
scale axis is chosen per tensor: one scale per row (token) or per column (channel),
whichever gives the smaller mean scale, i.e. the smaller expected error; the other axis,
then one scale for the whole tensor, are the fallbacks when it does not fit the ratio.
Per-column scales keep outlier channels (common in T5 and DiT activations) from
coarsening every other channel: with per-row scales the int8 mean error was ~8e-2 on the
T5-like and ~0.37 on the DiT-like tensors above, instead of < 1e-2.

A 16-bit original cannot go below 0.5 + 2/D with int8, so ratio 0.5 on bf16 already
means int4 (mean error ~0.13). Non-floating tensors (ints, bools, complex), fp8, empty
tensors and fp64 tensors beyond fp32's range are stored raw; a tensor with inf/nan
only takes the cast forms (which keep them) or raw. A tensor for which no form fits
(tiny tensors, where scales dominate) is stored raw and counted at its full size: the
budget accounting stays honest, only that tensor misses the ratio.

`compress` never aliases its input and `decompress` never aliases the stored value:
both return fresh tensors, on the stored tensors' device (so `decompress` restores the
original device unless the stored value was moved), in the original dtype and shape.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.dit_cache.sizing import (
    TensorBundle,
    map_leaves,
    map_tensors,
    tensor_nbytes,
    value_nbytes,
)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP32_MAX = torch.finfo(torch.float32).max
SCALE_BYTES = 4  # fp32 scales
FORMS = (
    "raw",
    "fp32",
    "fp16",
    "bf16",
    "int8-row",
    "int8-col",
    "int8-tensor",
    "int4-row",
    "int4-col",
    "int4-tensor",
)
_QUANTIZED = FORMS[4:]
_CAST_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QMAX = {"int8": 127, "int4": 7}
_FORM_ERROR = {
    "raw": 0.0,
    "fp32": 2.0**-24,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
    "int8-row": 1 / 254,
    "int8-col": 1 / 254,
    "int8-tensor": 1 / 254,
    "int4-row": 1 / 14,
    "int4-col": 1 / 14,
    "int4-tensor": 1 / 14,
}
MEAN_ERROR_BOUND = {
    "raw": 0.0,
    "fp32": 2.0**-24,
    "fp16": 2.0**-11,
    "bf16": 2.0**-8,
    "int8": 0.01,  # measured, per-row/per-column scales, see the module docstring
    "int4": 0.16,  # measured likewise
}
"""Documented `mean|x-x'| / mean|x|` per form family ("int8-col" -> "int8")."""
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


@dataclass(frozen=True)
class CompressedTensor(TensorBundle):
    """One tensor in a compressed form: codes (`data`), optional fp32 `scale`, and
    what restores it (original dtype and shape)."""

    form: str
    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype
    shape: torch.Size

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.data,) if self.scale is None else (self.data, self.scale)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompressedTensor:
        scale = None if self.scale is None else fn(self.scale)
        return CompressedTensor(self.form, fn(self.data), scale, self.dtype, self.shape)

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.tensors())


@dataclass
class CompressionInfo:
    """What `compress` did: bytes before/after and how many tensors took each form."""

    original_bytes: int = 0
    stored_bytes: int = 0
    forms: Counter = field(default_factory=Counter)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0


def error_bound(form: str, dtype: torch.dtype) -> float:
    """Upper bound of `max|x - x'| / max|x|` for `form` restored to `dtype`."""
    q = _FORM_ERROR[form]
    if form == "raw":
        return 0.0
    u = _UNIT_ROUNDOFF.get(dtype, 0.0)
    return q + u * (1 + q) + 1e-6  # 1e-6: fp32 rounding of x / scale and q * scale


def _rows(shape: torch.Size) -> tuple[int, int]:
    """(R, D): the tensor seen as R rows of its last dimension."""
    if len(shape) == 0:
        return 1, 1
    d = shape[-1]
    return (math.prod(shape) // d if d else 0), d


def form_nbytes(form: str, shape: torch.Size, dtype: torch.dtype) -> int:
    """Bytes `form` takes for a tensor of `shape` and `dtype` (codes plus scales)."""
    n = math.prod(shape)
    rows, d = _rows(shape)
    if form == "raw":
        return n * torch.empty((), dtype=dtype).element_size()
    if form in _CAST_DTYPES:
        return n * torch.empty((), dtype=_CAST_DTYPES[form]).element_size()
    if form == "int8-row":
        return n + SCALE_BYTES * rows
    if form == "int8-col":
        return n + SCALE_BYTES * d
    if form == "int8-tensor":
        return n + SCALE_BYTES
    if form == "int4-row":
        return rows * ((d + 1) // 2) + SCALE_BYTES * rows
    if form == "int4-col":
        return rows * ((d + 1) // 2) + SCALE_BYTES * d
    if form == "int4-tensor":
        return rows * ((d + 1) // 2) + SCALE_BYTES
    raise ValueError(f"unknown form {form!r}")


def choose_form(t: torch.Tensor, ratio: float) -> str:
    """The most precise form of `t` that fits `ratio * bytes(t)`, else "raw"."""
    return _plan(t, ratio)[0]


def _plan(t: torch.Tensor, ratio: float) -> tuple[str, torch.Tensor | None]:
    """(form, `t` as fp32 (R, D) matrix when the form is quantized, else None)."""
    if not t.is_floating_point() or t.element_size() < 2 or t.numel() == 0:
        return "raw", None
    budget = ratio * tensor_nbytes(t)
    if tensor_nbytes(t) <= budget:
        return "raw", None
    t = t.detach()
    finite = bool(torch.isfinite(t).all())
    absmax = float(_finite_absmax(t))
    if absmax > FP32_MAX:  # fp64 beyond fp32's range: no smaller form holds it
        return "raw", None
    size = t.element_size()
    candidates = []
    if size > 4:
        candidates.append("fp32")
    if size > 2:
        in_fp16 = absmax <= FP16_MAX and (absmax >= FP16_MIN_NORMAL or absmax == 0.0)
        candidates.append("fp16" if in_fp16 else "bf16")
    for form in candidates:
        if form_nbytes(form, t.shape, t.dtype) <= budget:
            return form, None
    if not finite:
        return "raw", None
    fitting = [f for f in _QUANTIZED if form_nbytes(f, t.shape, t.dtype) <= budget]
    if not fitting:
        return "raw", None
    rows, d = _rows(t.shape)
    x = t.reshape(rows, d).float()
    best_axis = "row"
    if any(f.endswith("-col") for f in fitting) and any(f.endswith("-row") for f in fitting):
        # Expected mean |error| is proportional to the mean scale an element gets.
        row_mean = x.abs().amax(dim=1).mean()
        col_mean = x.abs().amax(dim=0).mean()
        best_axis = "col" if col_mean < row_mean else "row"
    elif any(f.endswith("-col") for f in fitting):
        best_axis = "col"
    order = {f"-{best_axis}": 0, "-tensor": 2}
    for bits in ("int8", "int4"):
        options = [f for f in fitting if f.startswith(bits)]
        options.sort(key=lambda f: order.get(f[f.index("-") :], 1))
        if options:
            return options[0], x
    return "raw", None


def _finite_absmax(t: torch.Tensor) -> torch.Tensor:
    a = t.detach().abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype, device=a.device)).max()


def compress_tensor(t: torch.Tensor, ratio: float) -> torch.Tensor | CompressedTensor:
    """`t` in the form `choose_form` picks; a raw tensor is a private clone."""
    t = t.detach()
    form, x = _plan(t, ratio)
    if form == "raw":
        return t.clone()
    if form in _CAST_DTYPES:
        data = t.to(_CAST_DTYPES[form], copy=True)
        return CompressedTensor(form, data, None, t.dtype, t.shape)
    assert x is not None
    bits, axis = form.split("-")
    if axis == "row":
        absmax = x.abs().amax(dim=1, keepdim=True)
    elif axis == "col":
        absmax = x.abs().amax(dim=0, keepdim=True)
    else:
        absmax = x.abs().max().reshape(1, 1)
    scale = absmax / _QMAX[bits]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp_(-_QMAX[bits], _QMAX[bits])
    data = q.to(torch.int8) if bits == "int8" else _pack_int4(q)
    return CompressedTensor(form, data, scale.reshape(-1).contiguous(), t.dtype, t.shape)


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7], shape (R, D) -> uint8 (R, ceil(D/2)), low nibble first."""
    u = (q + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def _unpack_int4(p: torch.Tensor, d: int) -> torch.Tensor:
    lo = (p & 0x0F).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    q = torch.stack((lo, hi), dim=2).reshape(p.shape[0], -1)[:, :d]
    return q.float() - 8


def decompress_tensor(c: torch.Tensor | CompressedTensor) -> torch.Tensor:
    """A fresh tensor in the original dtype and shape, on the stored tensors' device."""
    if isinstance(c, torch.Tensor):
        return c.clone()
    if c.form in _CAST_DTYPES:
        return c.data.to(c.dtype, copy=True)
    rows, d = _rows(c.shape)
    q = c.data.float() if c.form.startswith("int8") else _unpack_int4(c.data, d)
    assert c.scale is not None
    scale = c.scale.reshape(1, -1) if c.form.endswith("-col") else c.scale.reshape(-1, 1)
    return (q * scale).to(c.dtype).reshape(c.shape)


def compress(value: Any, ratio: float) -> tuple[Any, CompressionInfo]:
    """`value` with each floating tensor compressed to at most `ratio` of its bytes
    (where any form fits), and what that did."""
    if not 0 < ratio <= 1:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio}")
    info = CompressionInfo()

    def one(t: torch.Tensor) -> torch.Tensor | CompressedTensor:
        stored = compress_tensor(t, ratio)
        info.original_bytes += tensor_nbytes(t)
        info.stored_bytes += value_nbytes(stored)
        info.forms[stored.form if isinstance(stored, CompressedTensor) else "raw"] += 1
        return stored

    return map_tensors(value, one), info


def decompress(stored: Any) -> Any:
    """The value `compress` was given (up to the documented error), as fresh tensors.

    Plain tensors in `stored` are cloned, so `decompress` of an uncompressed value is a
    deep copy: the cache hands this out and never its own tensors.
    """
    return map_leaves(stored, decompress_tensor)


def relative_errors(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(max|x-y| / max|x|, mean|x-y| / mean|x|), in float64: the metrics of the table."""
    x64, y64 = x.detach().double().cpu(), y.detach().double().cpu()
    diff = (x64 - y64).abs()
    amax, amean = x64.abs().max().item(), x64.abs().mean().item()
    return (diff.max().item() / amax if amax else 0.0, diff.mean().item() / amean if amean else 0.0)
