"""Student tower sizing from the teachers' intrinsic dimensions and the hardware memory budget.

The profiling stage measures, per teacher layer, how many principal directions hold 90/95/99% of the
activation variance. A tower that must reproduce those layers needs about that many directions and
no more, so:

* LoRA rank = the largest intrinsic dimension, over the tower's profiled layers, at `variance`
  (default 95%), floored at `min_rank`, then capped by MAX_RANK (memory) and by the hidden width.
* hidden width = the largest intrinsic dimension at `width_variance` (default 99%), rounded up to a
  multiple of `width_multiple` (64: matmul-friendly), clamped to [min_width, max_width]. The width
  uses the stricter threshold because it bounds what the tower can represent at all; the rank is
  what each adapted matrix may change.
* depth is configuration, not measured.

MAX_RANK, the hardware cap. The tower has `depth` layers, each with `adapted_matrices_per_layer`
square (hidden, hidden) projections that carry a LoRA pair A (r, hidden), B (hidden, r). Training
state per adapter parameter is bytes_per_param x (1 weight + 1 gradient + `optimizer_states`; Adam
keeps 2). Adapters may take `adapter_budget_fraction` of the budget (the rest is for the frozen
base, activations and the teacher's features), so

    bytes_per_rank = depth * adapted_matrices_per_layer * 2 * hidden * bytes_per_param * (2 + optimizer_states)
    raw            = floor(adapter_budget_fraction * memory_budget_bytes / bytes_per_rank)
    MAX_RANK       = raw rounded down to a multiple of 8 if raw >= 8, else to a power of two

(multiples of 8 keep the adapter matmuls on fast kernel paths). A budget that fits less than
`min_rank` is an error rather than a silent overrun.

No Dagster here: the `student_architecture` asset calls `choose_tower_architecture`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

FORMULA = (
    "MAX_RANK = round_down(floor(adapter_budget_fraction * memory_budget_bytes / "
    "(depth * adapted_matrices_per_layer * 2 * hidden_width * bytes_per_param * (2 + optimizer_states)))), "
    "round_down = multiple of 8 if >= 8 else power of two"
)


def _lookup(dims: Mapping[Any, Any], variance: float) -> int | None:
    """The entry of `dims` whose key ("0.95", 0.95, ...) equals `variance`, or None."""
    for key, value in dims.items():
        try:
            if abs(float(key) - variance) < 1e-9:
                return value
        except (TypeError, ValueError):
            continue
    return None


def _round_down_rank(raw: int) -> int:
    if raw >= 8:
        return raw // 8 * 8
    if raw >= 1:
        return 1 << (raw.bit_length() - 1)
    return 0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_fraction(name: str, value: Any, *, closed_top: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < value <= 1.0 if closed_top else 0.0 < value < 1.0
    )
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1{']' if closed_top else ')'}, got {value!r}")
    return float(value)


@dataclass
class SizingConfig:
    """How a random-init tower is sized from its teachers' intrinsic dimensions. Validated on construction.

    Attributes:
        memory_budget_bytes: device memory available to train this tower.
        variance: threshold whose intrinsic dimension sets the LoRA rank (a key of every profile's dims).
        width_variance: threshold whose intrinsic dimension sets the hidden width.
        min_rank: floor of the rank (a rank-1 or 2 adapter trains poorly).
        bytes_per_param: 4 for fp32 adapters and optimizer state, 2 for bf16.
        width_multiple, min_width, max_width: rounding and clamp of the hidden width.
        depth: number of tower layers.
        adapted_matrices_per_layer: square (hidden, hidden) matrices per layer carrying a LoRA pair.
        optimizer_states: optimizer tensors per parameter (Adam: 2).
        adapter_budget_fraction: share of memory_budget_bytes the adapters' training state may use.
    """

    memory_budget_bytes: int
    variance: float = 0.95
    width_variance: float = 0.99
    min_rank: int = 4
    bytes_per_param: int = 4
    width_multiple: int = 64
    min_width: int = 64
    max_width: int = 1024
    depth: int = 2
    adapted_matrices_per_layer: int = 4
    optimizer_states: int = 2
    adapter_budget_fraction: float = 0.25

    def __post_init__(self):
        for f in ("variance", "width_variance", "adapter_budget_fraction"):
            setattr(self, f, _check_fraction(f, getattr(self, f), closed_top=True))
        for f, lo in (("memory_budget_bytes", 1), ("min_rank", 1), ("bytes_per_param", 1), ("width_multiple", 1),
                      ("min_width", 1), ("depth", 1), ("adapted_matrices_per_layer", 1), ("optimizer_states", 0)):
            _check_int(f, getattr(self, f), lo)
        _check_int("max_width", self.max_width, self.min_width)


def choose_tower_architecture(tower: str, layer_profiles: Sequence[Mapping[str, Any]],
                              config: SizingConfig | None = None, **fields) -> dict[str, Any]:
    """Choose LoRA rank, hidden width and depth of one student tower.

    Args:
        tower: tower name, for errors and the result.
        layer_profiles: one dict per profiled teacher layer feeding this tower:
            {"teacher": str, "layer": str, "width": int,
             "intrinsic_dims": {"0.9": k, "0.95": k, "0.99": k}} (keys may also be floats).
        config: the SizingConfig, or its fields as keyword arguments.

    Returns:
        A JSON-able dict: tower, lora_rank, max_rank, hidden_width, depth, the thresholds, the layer
        that drove each choice, the adapter's size, the formula, and `reasoning`: human-readable
        sentences saying which teacher and layer drove the rank and width and which cap applied.

    Raises:
        ValueError: naming the argument, or the tower, profile index, teacher and layer at fault;
            also when the budget cannot fit even `min_rank`.
    """
    c = config or SizingConfig(**fields)
    layers = _parse_profiles(tower, layer_profiles, c)
    reasoning: list[str] = []
    w_src, hidden = _choose_width(layers, c, reasoning)
    max_rank, bytes_per_rank, params_per_rank, state_bytes = _max_rank(tower, hidden, c, reasoning)
    r_src, rank, cap = _choose_rank(layers, hidden, max_rank, c, reasoning)
    reasoning.append(f"depth {c.depth} from configuration")
    adapter_params = params_per_rank * rank
    return {
        "tower": str(tower), "lora_rank": rank, "max_rank": max_rank, "rank_cap_applied": cap,
        "variance": c.variance,
        "rank_source": {k: r_src[k] for k in ("teacher", "layer", "width")} | {"intrinsic_dim": r_src["rank_dim"]},
        "hidden_width": hidden, "width_variance": c.width_variance,
        "width_source": {k: w_src[k] for k in ("teacher", "layer", "width")} | {"intrinsic_dim": w_src["width_dim"]},
        "depth": c.depth, "adapter_params": adapter_params, "adapter_train_state_bytes": adapter_params * state_bytes,
        "memory_budget_bytes": c.memory_budget_bytes, "formula": FORMULA,
        "config": {k: getattr(c, k) for k in ("min_rank", "bytes_per_param", "width_multiple", "min_width", "max_width",
                                             "adapted_matrices_per_layer", "optimizer_states", "adapter_budget_fraction")},
        "layers": [{"teacher": l["teacher"], "layer": l["layer"], "width": l["width"],
                    "rank_intrinsic_dim": l["rank_dim"], "width_intrinsic_dim": l["width_dim"]} for l in layers],
        "reasoning": reasoning,
    }


def _parse_profiles(tower: str, layer_profiles, c: SizingConfig) -> list[dict]:
    """Validated profiles with the intrinsic dimensions at the two thresholds picked out."""
    if not layer_profiles:
        raise ValueError(f"tower {tower!r}: no layer profiles")
    layers = []
    for i, prof in enumerate(layer_profiles):
        missing = {"teacher", "layer", "width", "intrinsic_dims"} - set(prof)
        if missing:
            raise ValueError(f"tower {tower!r} profile {i}: missing keys {sorted(missing)}")
        where = f"tower {tower!r} profile {i} (teacher {prof['teacher']!r} layer {prof['layer']!r})"
        width = prof["width"]
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{where}: width must be a positive int, got {width!r}")
        dims = prof["intrinsic_dims"]
        if not isinstance(dims, Mapping):
            raise ValueError(f"{where}: intrinsic_dims must be a mapping, got {type(dims).__name__}")
        picked = {}
        for name, t in (("variance", c.variance), ("width_variance", c.width_variance)):
            k = _lookup(dims, t)
            if k is None:
                raise ValueError(
                    f"{where}: {name}={t} is not among its intrinsic_dims keys {sorted(map(str, dims))}; "
                    "profile that threshold or choose one of those"
                )
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
                raise ValueError(f"{where}: intrinsic_dims[{t}] must be an int in [1, width={width}], got {k!r}")
            picked[name] = k
        layers.append({"teacher": str(prof["teacher"]), "layer": str(prof["layer"]), "width": width,
                       "rank_dim": picked["variance"], "width_dim": picked["width_variance"]})
    return layers


def _choose_width(layers: list[dict], c: SizingConfig, reasoning: list[str]) -> tuple[dict, int]:
    """Hidden width first (the rank cap depends on it). max() keeps the first of equal layers."""
    w_src = max(layers, key=lambda l: l["width_dim"])
    need = math.ceil(w_src["width_dim"] / c.width_multiple) * c.width_multiple
    hidden = min(max(need, c.min_width), c.max_width)
    reasoning.append(
        f"hidden width {hidden}: teacher {w_src['teacher']!r} layer {w_src['layer']!r} needs "
        f"{w_src['width_dim']} dims for {c.width_variance:.0%} variance (largest of {len(layers)} layers), "
        f"rounded up to a multiple of {c.width_multiple} = {need}"
        + (f", raised to min_width {c.min_width}" if need < c.min_width else "")
        + (f", clamped to max_width {c.max_width}" if need > c.max_width else "")
    )
    return w_src, hidden


def _max_rank(tower: str, hidden: int, c: SizingConfig, reasoning: list[str]) -> tuple[int, int, int, int]:
    """(MAX_RANK, bytes per rank, adapter params per rank, bytes per adapter param) from the memory budget."""
    params_per_rank = c.depth * c.adapted_matrices_per_layer * 2 * hidden
    state_bytes_per_param = c.bytes_per_param * (2 + c.optimizer_states)
    bytes_per_rank = params_per_rank * state_bytes_per_param
    adapter_budget = c.adapter_budget_fraction * c.memory_budget_bytes
    raw_max = int(adapter_budget // bytes_per_rank)
    max_rank = _round_down_rank(raw_max)
    reasoning.append(
        f"MAX_RANK {max_rank}: {c.adapter_budget_fraction:.0%} of the {c.memory_budget_bytes} B budget "
        f"= {adapter_budget:.0f} B over {bytes_per_rank} B per rank (depth {c.depth} x "
        f"{c.adapted_matrices_per_layer} matrices x 2 x hidden {hidden} params x {state_bytes_per_param} B "
        f"weight+grad+{c.optimizer_states} optimizer states) = {raw_max}, rounded down"
    )
    if max_rank < c.min_rank:
        raise ValueError(
            f"tower {tower!r}: memory_budget_bytes={c.memory_budget_bytes} fits at most rank {max_rank} "
            f"< min_rank={c.min_rank} (needs {c.min_rank * bytes_per_rank / c.adapter_budget_fraction:.0f} B "
            f"at hidden width {hidden}); raise the budget or lower min_rank, max_width or depth"
        )
    return max_rank, bytes_per_rank, params_per_rank, state_bytes_per_param


def _choose_rank(layers: list[dict], hidden: int, max_rank: int, c: SizingConfig,
                 reasoning: list[str]) -> tuple[dict, int, str]:
    """(source layer, rank, which cap applied): the intrinsic dimension, floored and capped."""
    r_src = max(layers, key=lambda l: l["rank_dim"])
    wanted = r_src["rank_dim"]
    reasoning.append(
        f"rank driven by teacher {r_src['teacher']!r} layer {r_src['layer']!r}: {wanted} of its "
        f"{r_src['width']} dims hold {c.variance:.0%} of the variance (largest of {len(layers)} layers)"
    )
    rank, cap = wanted, "none"
    if rank < c.min_rank:
        rank, cap = c.min_rank, "min_rank"
        reasoning.append(f"raised to min_rank {c.min_rank}")
    if rank > max_rank:
        rank, cap = max_rank, "max_rank"
        reasoning.append(f"capped at MAX_RANK {max_rank} by the memory budget (wanted {wanted})")
    if rank > hidden:
        rank, cap = hidden, "hidden_width"
        reasoning.append(f"capped at the hidden width {hidden}")
    if cap == "none":
        reasoning.append(f"rank {rank} = the intrinsic dimension; no cap applied")
    return r_src, rank, cap
