"""Per-token PCA scores in 4 or 8 bits: the cached teacher states at a quarter / half of float16's bytes.

Why: the carved text tower's state loss needs every token's scores on the top 128 components of 4 teacher
layers; in float16 that is 1,024 B a token, most of an LM cache entry (issue 12's goal is <= 600 B for all of
it), and rank 32 (the same bytes as 4 bits at 128) lost most of what the states teach. The scores are
targets of a regression, so a small unbiased rounding noise costs little, while dropping components costs
their whole signal.

How (block-wise absmax, as in bitsandbytes' blockwise quantization and GPTQ's groups): each score is first
divided by its component's scale (the square root of the component's variance from the entry's PCA basis),
so the components, whose variances fall by ~100x from the first to the 128th, share one grid; then every
`group` consecutive components of a token get their own absmax scale, so one token's outlier (an attention
sink is 400-2,000x a typical token) widens only its own group's step. Codes are symmetric integers in
[-qmax, qmax] stored with an offset as unsigned bytes, two to a byte at 4 bits.
"""
from __future__ import annotations

import numpy as np

GROUP = 32  # components per absmax scale: 2 B of float16 scale per 16 B of 4-bit codes
BITS = (4, 8)


def _check(bits: int, group: int) -> int:
    if bits not in BITS:
        raise ValueError(f"state score bits must be one of {BITS} (16 stores float16 unquantized), got {bits}")
    if group < 1 or (bits == 4 and group % 2):
        raise ValueError(f"state score group must be a positive (at 4 bits, even) number of components, got {group}")
    return 2 ** (bits - 1) - 1


def code_width(rank: int, bits: int, group: int = GROUP) -> tuple[int, int]:
    """(bytes of codes, scales) per token for `rank` components: the rank is padded to whole groups."""
    _check(bits, group)
    groups = -(-rank // group)
    return groups * group * bits // 8, groups


def component_scale(variances) -> np.ndarray:
    """(r,) the per-component divisor, from the basis' variances: the one definition encoder and decoder share."""
    v = np.asarray(variances, np.float64)
    # a floor relative to the largest: a near-empty component must not set its block's step on new tokens
    floor = max(float(v.max(initial=0.0)) * 1e-6, 1e-12)
    return np.sqrt(np.clip(v, floor, None)).astype(np.float32)


def quantize_scores(scores: np.ndarray, component_scale: np.ndarray, bits: int, group: int = GROUP
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(N, r) float scores -> (codes (N, code bytes) uint8, scales (N, groups) float32).

    component_scale (r,) > 0: what each component is divided by first (its standard deviation)."""
    qmax = _check(bits, group)
    x = np.asarray(scores, np.float32)
    c = np.asarray(component_scale, np.float32)
    if x.ndim != 2 or c.shape != (x.shape[1],):
        raise ValueError(f"scores must be (N, r) with a component scale of (r,), got {x.shape} and {c.shape}")
    if not (np.isfinite(c).all() and (c > 0).all()):
        raise ValueError("component scales must be finite and > 0")
    if not np.isfinite(x).all():
        raise ValueError("state scores must be finite (a NaN or inf has no code)")
    n, r = x.shape
    _, groups = code_width(r, bits, group)
    z = np.zeros((n, groups * group), np.float32)
    z[:, :r] = x / c
    z = z.reshape(n, groups, group)
    scale = np.abs(z).max(axis=2) / qmax  # (N, groups); an all-zero group keeps scale 0 and codes 0
    q = np.rint(z / np.where(scale > 0, scale, 1.0)[..., None]).clip(-qmax, qmax).astype(np.int16) + qmax + 1
    q = q.reshape(n, groups * group).astype(np.uint8)
    if bits == 4:
        q = (q[:, 0::2] << 4) | q[:, 1::2]
    return q, scale.astype(np.float32)


def dequantize_scores(codes: np.ndarray, scales: np.ndarray, component_scale: np.ndarray, bits: int,
                      group: int = GROUP) -> np.ndarray:
    """What `quantize_scores` made -> (N, r) float32, r = len(component_scale)."""
    qmax = _check(bits, group)
    c = np.asarray(component_scale, np.float32)
    codes = np.asarray(codes, np.uint8)
    scales = np.asarray(scales, np.float32)
    n, r = codes.shape[0], c.shape[0]
    width, groups = code_width(r, bits, group)
    if codes.shape != (n, width) or scales.shape != (n, groups):
        raise ValueError(f"{r} components at {bits} bits in groups of {group} need codes (N, {width}) and scales "
                         f"(N, {groups}), got {codes.shape} and {scales.shape}")
    if bits == 4:
        q = np.empty((n, width * 2), np.uint8)
        q[:, 0::2], q[:, 1::2] = codes >> 4, codes & 0x0F
    else:
        q = codes
    z = (q.astype(np.float32) - (qmax + 1)).reshape(n, groups, group) * scales[..., None]
    return z.reshape(n, groups * group)[:, :r] * c


def bits_of(code_bytes: int, rank: int, group: int = GROUP) -> int:
    """The bit width a stored code width stands for (ValueError if none of BITS gives it)."""
    for bits in BITS:
        if code_width(rank, bits, group)[0] == code_bytes:
            return bits
    raise ValueError(f"{code_bytes} code bytes a token fit no quantized layout of {rank} components "
                     f"(bits {BITS}, groups of {group})")
