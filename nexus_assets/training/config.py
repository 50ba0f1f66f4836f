"""How a tower is trained: the typed, validated TrainConfig, its CPU defaults, and test hooks."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

__all__ = ["TrainConfig", "TrainHooks", "TrainingDiverged", "cpu_train_config"]


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps or loss spikes; the message names the step."""


LR_DECAYS = ("cosine", "linear")


def check_lr_decay(decay: str) -> None:
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay: must be one of {', '.join(LR_DECAYS)}, got {decay!r}")


@dataclass
class TrainConfig:
    """How one tower is trained. Validated on construction; errors name the field."""

    seed: int = 0
    """Seeds model init, adapter init and the batch order (batches are a function of seed, phase, step)."""
    phase_a_steps: int = 200
    """Optimizer steps of phase (a), joint backbone + heads training."""
    phase_b_steps: int = 40
    """Optimizer steps of phase (b) per capability (adapter + head)."""
    phase_b_steps_by_capability: dict[str, int] = field(default_factory=dict)
    """Capability -> its own phase (b) steps instead of `phase_b_steps` (0: its adapter stays the identity
    and its head as phase (a) left it)."""
    batch_size: int = 8
    """Rows per batch per rank (the global batch is batch_size x world size)."""
    lr: float = 1e-3
    """Peak AdamW learning rate of phase (a)."""
    adapter_lr: float = 2e-3
    """Peak AdamW learning rate of phase (b) (LoRA + head)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    ema_decay: float = 0.0
    """Exponential moving average of phase (a)'s weights (torch.optim.swa_utils, Polyak averaging): each
    accepted step folds the weights into the average at 1 - ema_decay, and the phase ends by loading the
    average into the tower (phase (b) and the saved tower start from it). Batches of 8 rows at a peak rate
    of 1e-3 leave the last weights noisy; the average is their mean over ~1 / (1 - ema_decay) steps. 0 = off,
    the default: measured on the carved text tower (2026-12-06, the default's 2,160 steps, one run, the raw and
    averaged weights of the same phase (a) validated side by side; text.generate held-out / never-seen) raw
    0.751 / 0.672, 0.99 0.752 / 0.675, 0.995 0.753 / 0.677, 0.998 0.753 / 0.678, 0.999 0.746 / 0.675: inside the
    CIs (+-0.012 / +-0.007), since the cosine decay to 10% already quiets the last steps; after phase (b) 0.998
    gave 0.754 / 0.680 against 0.756 / 0.678. Kept for longer runs at a flatter rate (`full`, `gpu`)."""
    warmup_steps: int = 10
    """Linear warmup steps of each phase, then the decay (`lr_decay`) to `lr_floor` of the peak."""
    lr_decay: str = "cosine"
    """Shape of the decay after warmup: "cosine" or "linear" (Bergsma et al. 2025, "Straight to Zero":
    linear decay to zero beat a cosine to 10% for LLM pre-training at many tokens per parameter). Measured on the
    carved text tower (2026-12-06, the default's 2,160 steps, seed 0; text.generate held-out / never-seen): linear
    to 0 0.753 / 0.681 against the cosine's 0.753 / 0.676 in the same harness: flat, so the cosine stays."""
    lr_floor: float = 0.1
    """The rate at the phase's last step, as a share of the peak, in [0, 1]."""
    temperature: float = 2.0
    """Softmax temperature of top-k KD and of LwF on logits heads."""
    w_kd: float = 1.0
    """Weight of the top-k KD losses (lm, asr, classes heads)."""
    w_anchor: float = 0.5
    """Base weight of the anchoring losses (times the alpha curriculum and the rollback escalation)."""
    w_state: float = 0.0
    """Weight of the per-token intermediate-state loss of "lm" heads (`losses.token_state_loss`: each kept
    block's output against the teacher's cached states at the same depth, inside their PCA basis;
    Minitron's advice for a model cut deeply). Needs a carved backbone and a teacher that caches
    `extraction.state_layers`; 0 = off."""
    w_gram: float = 0.5
    """Weight of the Gram (batch-relational) loss of embedding heads."""
    w_cosine: float = 1.0
    """Weight of the cosine loss of embedding heads."""
    w_neighbour: float = 0.0
    """Weight of the neighbour-ranking loss of embedding heads (`losses.neighbour_kd_loss`: each row's
    softmax over its cosines to a bank of the training rows' teacher embeddings); 0 = off."""
    neighbour_temperature: float = 0.05
    """Softmax temperature of the neighbour-ranking loss, on cosines."""
    neighbour_bank_rows: int = 2048
    """Training rows (a seeded draw) whose teacher embeddings make the bank; 0 = every training row."""
    neighbour_in_phase_a: bool = False
    """Whether phase (a), which trains the backbone every capability shares, also gets the neighbour loss;
    by default only the embedding capability's own phase (b) and its linear probe do. Measured on the
    carved text tower (w 3): in phase (a) it raised text.generate's KD loss by 0.15-0.3 over the first 200
    steps, the same batches, so the shared blocks pay for it."""
    w_lwf: float = 0.5
    """Weight of the learning-without-forgetting loss in phase (b)."""
    kd_divergence: str = "forward"
    """"forward" = KL(teacher || student) (mass-covering, Hinton's KD); "reverse" = KL(student || teacher)
    (mode-seeking, MiniLLM), on the same cached top-k + tail buckets (`losses.topk_kd_loss`)."""
    kd_skew: float = 0.0
    """alpha in [0, 1) of DistiLLM's skew KL: the KL's second argument mixed with its first (0 = plain KL)."""
    w_ce: float = 0.0
    """Weight of cross-entropy on the TRUE next token of "lm" heads, next to their KD (the data's own labels,
    as DistilBERT's hard loss); 0 = KD only. Targets the trimmed vocabulary drops do not count."""
    head_probe_epochs: int = 0
    """Linear-probe warm start of a pooled head (embedding / classes) at the start of its phase (b):
    epochs over the training rows' cached pooled states, backbone frozen, the head's own losses (LP-FT,
    Kumar et al. 2022: probe first, then fine-tune). 0 = off; `cpu_train_config` turns it on where it
    was measured to help on never-seen data (the text tower), not where it overfits (the speaker head)."""
    head_probe_lr: float = 1e-3
    """AdamW learning rate of the linear-probe warm start."""
    carved_lr_scale: float = 1.0
    """Multiplier of the learning rate (both phases) of the parameters a carved tower took from its
    teacher; new parameters (fresh heads, anchor projections, LoRA adapters) keep the full rate. A
    pretrained network fine-tunes at a small fraction of the rate a fresh head needs."""
    teacher_weights: dict[str, float] = field(default_factory=dict)
    """Teacher name -> multiplier of all of that teacher's losses (multi-teacher towers); missing = 1."""
    alpha_start: float = 1.0
    """Anchoring multiplier at the first step of a phase ..."""
    alpha_end: float = 0.2
    """... ramped linearly to this at the last step: anchor early for structure, then let KD lead."""
    eval_every: int = 20
    """Steps between validation passes (early stopping)."""
    val_batches: int = 4
    """Batches per validation pass (and per final train/val loss estimate)."""
    patience: int = 5
    """Validation passes without improvement before a phase stops early ..."""
    patience_fraction: float = 0.1
    """... or this share of the phase's steps (in passes), whichever is longer. A fixed 5 passes (100 steps,
    on 32 validation rows) stopped a 4,320-step carved text phase at step 1,240, while its learning rate was
    still near the peak: a longer phase must be allowed a longer plateau before its decay pays."""
    min_delta: float = 0.0
    """Improvement below this does not count for early stopping."""
    grad_clip: float = 1.0
    """Max global gradient norm (the pre-clip norm is logged)."""
    spike_factor: float = 4.0
    """A step whose loss exceeds spike_factor x the running median is a spike (rolled back)."""
    spike_window: int = 20
    """Accepted steps the running median is taken over."""
    spike_min_history: int = 8
    """Accepted steps needed before spikes are detected."""
    anchor_escalation: float = 2.0
    """Factor applied to the anchoring weight after each rollback."""
    max_rollbacks: int = 5
    """More rollbacks than this raise TrainingDiverged."""
    max_nan_skips: int = 10
    """More skipped non-finite steps than this raise TrainingDiverged."""
    checkpoint_every: int = 25
    """Steps between checkpoints (also the in-memory rollback snapshots)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    log_every: int = 10
    """Steps between log lines (TensorBoard gets every step)."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda:LOCAL_RANK when available)."""
    num_threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""
    channels_last: bool = False
    """Convolution weights and image batches in channels-last memory format during training (oneDNN's and
    cuDNN's fast layout for convolutions, forward and backward); the saved tower is in the default format."""
    group_by_length: bool = False
    """Batches of rows of like length (transformers' length-grouped order, per epoch): sequence towers
    cut each batch to its longest row, so random batches of short and long rows pay for padding."""
    source_alpha: float = 1.0
    """Each epoch draws its rows per probe source (the row id's first part) with shares proportional to
    the source's rows ** source_alpha: 1 = every row once (the rows' own mix), 0 = every source alike.
    Doubling the text probe with the big sources only halved a small source's share of the steps and
    cost its register (manpages 0.634 -> 0.586 never-seen, README); below 1 a small source keeps its steps."""
    compile_backbone: str = "no"
    """"no", "yes" or "auto": phase (a)'s training passes run the backbone through torch.compile where the
    backbone supports it (`set_compiled`: the carved text tower); validation, the head probe and phase (b)
    stay eager. "auto" = only when phase (a) has at least COMPILE_MIN_STEPS steps (compiling costs about a
    minute on 2 cores) and a probe function compiles on the device (inductor needs a C++ compiler on CPU)."""
    mixed_precision: str = "no"
    """"no", "bf16" or "auto": the training forward runs under torch.autocast in bfloat16 (weights, optimizer
    state and the losses stay float32; the losses upcast their inputs). On a CPU with AVX512-BF16 or AMX, and
    on GPUs since Ampere, bfloat16 matmuls run about twice as fast; "auto" = bf16 on such a device only."""

    def __post_init__(self):
        ints = {"phase_a_steps": 0, "phase_b_steps": 0, "batch_size": 1, "warmup_steps": 0, "eval_every": 1,
                "val_batches": 1, "patience": 1, "spike_window": 2, "spike_min_history": 2, "max_rollbacks": 0,
                "max_nan_skips": 0, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1, "num_threads": 0,
                "head_probe_epochs": 0, "neighbour_bank_rows": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: must be an int >= {lo}, got {v!r}")
        pos = ("lr", "adapter_lr", "head_probe_lr", "carved_lr_scale", "temperature", "grad_clip", "spike_factor", "anchor_escalation",
               "neighbour_temperature")
        nonneg = ("weight_decay", "w_kd", "w_anchor", "w_state", "w_gram", "w_cosine", "w_neighbour", "w_lwf", "w_ce", "alpha_start", "alpha_end",
                  "min_delta")
        for name in pos + nonneg:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if name in pos else v >= 0)):
                raise ValueError(f"{name}: must be a finite number {'> 0' if name in pos else '>= 0'}, got {v!r}")
        # shares and decays: (name, closed at 1); NaN fails both comparisons
        for name, upper_closed in (("ema_decay", False), ("source_alpha", True), ("patience_fraction", True),
                                   ("lr_floor", True), ("kd_skew", False)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and 0.0 <= v and (v <= 1.0 if upper_closed else v < 1.0)):
                raise ValueError(f"{name}: must be a number in [0, 1{']' if upper_closed else ')'}, got {v!r}")
        for cap, v in self.phase_b_steps_by_capability.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"phase_b_steps_by_capability: steps of {cap!r} must be an int >= 0, got {v!r}")
        for t, w in self.teacher_weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"teacher_weights: weight of {t!r} must be a finite number >= 0, got {w!r}")
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor: must be > 1, got {self.spike_factor}")
        if not isinstance(self.neighbour_in_phase_a, bool):
            raise ValueError(f"neighbour_in_phase_a: must be true or false, got {self.neighbour_in_phase_a!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last: must be true or false, got {self.channels_last!r}")
        if self.kd_divergence not in ("forward", "reverse"):
            raise ValueError(f"kd_divergence: must be 'forward' or 'reverse', got {self.kd_divergence!r}")
        check_lr_decay(self.lr_decay)
        if self.compile_backbone not in ("no", "yes", "auto"):
            raise ValueError(f"compile_backbone: must be 'no', 'yes' or 'auto', got {self.compile_backbone!r}")
        if self.mixed_precision not in ("no", "bf16", "auto"):
            raise ValueError(f"mixed_precision: must be 'no', 'bf16' or 'auto', got {self.mixed_precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# Phase-(a) / phase-(b) steps and batch of a carved tower per size profile (NEXUS_PROFILE). The default
# trains 1.6 epochs of its 7,053 text rows (12,000 items). Measured on that probe (11-block carve, text.generate
# held-out / never-seen, next-token accuracy on 400 of its own train rows): 720 steps 0.68 / 0.51; 1,440 steps
# 0.73 / 0.56 (train rows 0.87; ~20 instead of ~11 min of training on 2 cores); 720 steps on 40% of the train
# rows (2,842, the 4,800-item amount) 0.66 / 0.50 (train rows 0.77): 2.5x the rows gave +0.02, 2x the steps
# +0.04, so at 12,000 items the tower is bound by steps and capacity more than by distinct rows (on the
# 4,800-item probe, 2.1 epochs had memorised: 0.87 on train rows, 0.60 held-out). A profile with 10-100x the
# data must still train longer or its extra data is never seen. `full` is hours on the
# same 2 cores (text ~1 s a step in bfloat16: ~2 h of text steps, 0.6 epoch of its 96k train rows, 5x the default's text steps;
# vision 1.25 epochs of 51k views; audio 0.75 epoch of 16k utterances); `gpu`: about 3 epochs at a GPU's batch
# (not yet measured on one). tiny (tests) uses the default table.
#
# The audio tower has no phase (a): its carve (Whisper's own encoder and decoder, vocabulary trimmed,
# 10 s window) already transcribes as well as the teacher untrained (1 - WER retention held-out /
# never-seen 1.02 / 0.90), and training the shared encoder for the speaker head at 2e-4 cut that to
# 0.62 / 0.58 (1e-5: 0.96 / 0.86). The speaker head learns in its own phase (b) instead: a fresh head +
# its own LoRA adapter on the encoder at the full rate, the carved weights at 1% of it (measured, same
# data: transcribe 1.00 / 0.91, speaker 0.90 / 0.87, against 0.62 / 0.58 and 0.95 / 1.03 before).
# audio.transcribe then trains no steps at all (CARVED_PHASE_B_BY_CAPABILITY): its 120 adapter steps
# moved nothing (pipeline report 0.99 / 0.92 trained vs the untrained carve's 1.02 / 0.90) and cost about
# 7 of the audio tower's 15 minutes.
#
# The default text tower trains 480 steps in bfloat16 autocast (CARVED_MIXED_PRECISION) in the time 320 took
# in float32 (measured on 2 cores with AVX512-BF16, same carve, data and rate; train time, text.generate
# held-out / never-seen): fp32 320 steps 448 s 0.56 / 0.47; bf16 320 steps 312 s 0.56 / 0.47 (the same
# figures: bfloat16 costs nothing here); bf16 480 steps 485 s 0.58 / 0.50. With the default's text items
# doubled to 4,800 (2,744 train rows; measured on that probe's held-out / never-seen rows, same carve):
# 480 steps 0.61 / 0.48, 720 steps 0.64 / 0.50 (text.embed 0.90 / 0.68 -> 0.83 / 0.67, held-out ~100 queries).
#
# Length-grouped batches (CARVED_GROUP_BY_LENGTH, 2026-12-06; the 16,000-item default's features, the pipeline's
# training and validation code, seed 0; text.generate / text.embed retention, held-out / never-seen): the text
# rows are 5-64 tokens (median 39), so random batches of 8 paid for 1.56 positions per real token and grouped
# ones 1.01; bench/length_grouping.py: 1.25x less time per real token. At the same 1,440 steps grouped
# batches gave 0.736 / 0.655 and 0.804 / 0.678 (early stop at 1,340) against 0.745 / 0.665 and 0.864 / 0.682;
# at 2,160 steps (about 1.2x the random-batch run's time) 0.755 / 0.682 and 0.842 / 0.697: never-seen
# text.generate +0.017, outside its CI of 0.656-0.673, so the default is 2,160 grouped steps.
CARVED_STEPS = {
    "default": {"text": (2160, 30, 8), "vision": (200, 40, 32), "audio": (0, 120, 8)},
    "full": {"text": (10800, 300, 8), "vision": (2000, 200, 32), "audio": (0, 1500, 8)},
    "gpu": {"text": (3000, 300, 32), "vision": (1200, 200, 128), "audio": (0, 1500, 32)},
}
# learning-rate multiplier of a carved tower's teacher weights (TrainConfig.carved_lr_scale); 1 = as new ones
CARVED_LR_SCALE = {"text": 1.0, "vision": 1.0, "audio": 0.01}
# phase-(a) learning rate of a carved tower. The text carve drops 18 of SmolLM2's 30 blocks and heals in
# 320 steps: measured on the embedded default (same carve, data and steps, held-out / never-seen retention
# of text.generate): 2e-4 0.49 / 0.40, 5e-4 0.54 / 0.44, 1e-3 0.56 / 0.47 (2e-4 with 4x the steps: 0.54 /
# 0.45); text.embed never-seen 0.76 / 0.77 / 0.80. 2e-3: 0.57 / 0.45, text.embed never-seen 0.86 (flat).
# Vision the other way (same harness, top-1 agreement): 5e-4 0.50 / 0.13, 2e-4 0.66 / 0.47, 1e-4 0.70 / 0.52
# (float32); in bf16 + channels-last 1e-4 0.69 / 0.54, 5e-5 0.72 / 0.55.
CARVED_LR = {"text": 1e-3, "vision": 5e-5, "audio": 2e-4}
# TrainConfig.mixed_precision of a carved tower: "auto" = bfloat16 autocast where the device has it natively.
# Vision also trains channels-last (CARVED_CHANNELS_LAST). One vision step (batch 32, forward + backward, 2
# cores with AVX512-BF16): float32 2.0 s, bf16 1.3 s, channels-last 1.2 s, both 0.82 s; bf16 alone measured
# on retention (same carve, data, steps): top-1 agreement held-out / never-seen 0.70 / 0.52 -> 0.69 / 0.54;
# the pipeline with both: 0.67 / 0.52 (CI 0.62-0.72 / 0.48-0.55; float32 0.70 / 0.51), vision training 383 s
# instead of ~600 s. 300 steps instead of 200 in bf16 + channels-last: 0.68 / 0.54 (flat).
CARVED_MIXED_PRECISION = {"text": "auto", "vision": "auto", "audio": "no"}
CARVED_CHANNELS_LAST = {"text": False, "vision": True, "audio": False}
CARVED_GROUP_BY_LENGTH = {"text": True, "vision": False, "audio": False}
# TrainConfig.compile_backbone of a carved tower (only the carved text backbone supports it) and the phase-(a)
# length below which "auto" leaves it eager. Measured 2026-12-07 (2 cores with AMX, the default's features and
# steps, the pipeline's training and validation code, seed 0): phase (a) 908 s eager (0.418 s a step over steps
# 100-2,159) against 690 s compiled (0.315 s) plus ~75 s of compiling in its first steps; text.generate 0.759 /
# 0.723 (CI 0.747-0.771 / 0.715-0.731) against the eager pipeline's 0.762 / 0.718, text.embed 0.866 / 0.741
# against 0.848 / 0.740: the same tower, within its CIs. Compiling pays after ~300 steps, so below 500 "auto"
# stays eager (tests, short runs).
CARVED_COMPILE = {"text": "auto", "vision": "no", "audio": "no"}
COMPILE_MIN_STEPS = 500
# Activation-anchoring weight of a carved tower (TrainConfig.w_anchor). A carved tower starts at its teacher's
# representations; anchoring its pooled states to the teacher's layers inside the protected subspaces was
# chosen at 0.05 on a random-init-era text tower (next-token accuracy 0.102 at 0.5 vs 0.132 at 0.05). On the
# carved text tower it costs never-seen text (2026-12-06, twenty-first session; the default's features, the
# pipeline's training and validation code, seed 0; text.generate held-out / never-seen, CI): 0.05 0.753 / 0.676
# in the same harness and 0.756 / 0.678 (0.743-0.769 / 0.671-0.685) in the pipeline report; 0 0.756 / 0.687
# (0.743-0.768 / 0.680-0.694), text.embed 0.880 / 0.766 against 0.859 / 0.758; README command 1 with it: 0.755 /
# 0.680 (0.743-0.768 / 0.673-0.688), text.embed 0.902 / 0.766. So text.generate +0.002-0.011 never-seen (inside
# run-to-run noise), text.embed up, and the anchoring loss is not computed: off. The 12-of-30-block tower is short of capacity,
# and pulling its blocks towards the depths of the teacher they replace can only spend some of it. Audio
# keeps 0.05 (its speaker head trains through anchoring's LoRA phase; not measured at 0), vision trains no steps.
CARVED_W_ANCHOR = {"text": 0.0, "vision": 0.05, "audio": 0.05}
# Per-token intermediate-state loss of a carved tower (TrainConfig.w_state; the teacher's cached states at the
# depths its kept blocks end at, `extraction.state_layers`). Measured 2026-12-07 (twenty-seventh session; the
# default's features plus SmolLM2's states at layers 11 / 21 / 25 / 29 in their top-128 PCA basis, the pipeline's
# training and validation code, compiled phase (a), seed 0; text.generate held-out / never-seen, CI): off (three
# compiled runs) 0.760 / 0.712, 0.760 / 0.711, 0.759 / 0.723; w 1 0.764 / 0.717; w 5 0.763 / 0.728 (0.751-0.775 /
# 0.720-0.736), the student's perplexity 179 -> 170 held-out, 183 -> 172 never-seen; text.embed 0.854 / 0.754.
# The loss leaves attention-sink tokens out (losses.token_state_loss sink_factor): without that a rank-32 cache
# diverged (6 rollbacks by step 557), and rank 32 with it kept little of the gain (docs/experiments.md).
CARVED_W_STATE = {"text": 5.0, "vision": 0.0, "audio": 0.0}
# KD temperature of a carved tower. The text tower distils at T=1: its cached top-32 + tail buckets are the
# teacher's exact (coarsened) distribution only at T=1 (losses.topk_kd_loss), and the metric is next-token
# accuracy. Measured on the default probe, same carve, data, steps and seed (texp harness = the pipeline's code
# path; held-out / never-seen): T=2 text.generate 0.736 / 0.595, text.embed 0.833 / 0.655; T=1 0.740 / 0.600,
# 0.907 / 0.665 (small: inside text.generate's bootstrap CI, but no capability lost). Vision and audio keep 2:
# vision trains no steps, and audio's trained head (speaker) has no logits.
CARVED_TEMPERATURE = {"text": 1.0, "vision": 2.0, "audio": 2.0}
# The KD divergence stays TrainConfig's plain forward KL for every carved tower. Measured on the carved text tower
# (2026-12-06, the default's features, the pipeline's training and validation code, seed 0; text.generate held-out /
# never-seen): forward 0.756 / 0.687, skew forward (kd_skew 0.1) 0.719 / 0.609, skew reverse (kd_divergence
# reverse, kd_skew 0.1) 0.699 / 0.589: the metric is the student's top token against the true next token.
# capabilities whose carved phase (b) differs from their tower's (TrainConfig.phase_b_steps_by_capability).
# text.embed keeps the tower's 30: 300 (early-stopped at 120 by its flat validation loss) scored 0.884 / 0.734
# against 0.848 / 0.750 (held-out / never-seen, 2026-12-07, docs/experiments.md): more steps fit the training
# register, they do not transfer
CARVED_PHASE_B_BY_CAPABILITY = {"audio": {"audio.transcribe": 0}}
# Neighbour-ranking loss of a carved tower's embedding heads (TrainConfig.w_neighbour; bank = every training
# row's teacher embedding, temperature 0.05, in the embedding capability's own linear probe and phase (b)).
# Measured 2026-12-06 on the default's features, the pipeline's training and validation code, seed 0: text.embed
# recall@1 retention 0.826 / 0.688 (the pipeline report, CI 0.716-0.957 / 0.652-0.722) -> 0.870 / 0.769 (CI
# 0.766-0.988 / 0.732-0.806) held-out / never-seen; text.generate unchanged (0.756 / 0.678 -> 0.753 / 0.676, its
# phase (a) is the same); the probe costs 296 s instead of 64. Linear probe alone on the trained tower (w, bank,
# temperature): off 0.832 / 0.690, 1 / 2,048 / 0.05 0.902 / 0.735, 1 / 2,048 / 0.1 0.870 / 0.722, 3 / all / 0.05
# 0.891 / 0.762. Not on audio: the speaker head with it (w 3, every row, phase b) scored 1 - EER retention
# 0.956 / 0.753 against 0.955 / 0.776 (never-seen CIs 0.746-0.759 / 0.771-0.783): worse on the Piper voice.
# Its probe runs 50 epochs, not the 100 of a bank-less probe (2026-12-06, linear probe alone on the trained tower,
# same bank and seed; held-out / never-seen, probe seconds on 2 cores): 100 epochs 0.891 / 0.762 (296 s idle),
# 50 0.864 / 0.773 (132 s), 30 0.870 / 0.755 (88 s): within the held-out CI of about +-0.11 and the never-seen
# CI of +-0.04 of each other, so half the epochs take 2.7 minutes off README command 1 for nothing measurable.
CARVED_NEIGHBOUR = {"text": {"w_neighbour": 3.0, "neighbour_bank_rows": 0, "head_probe_epochs": 50}}


def cpu_train_config(tower: str, init: str = "random", profile: str | None = None, **overrides) -> TrainConfig:
    """The 2-core CPU default per tower, sized so the three towers train in about 6 minutes together
    (carved towers: per size profile, `CARVED_STEPS`; None = NEXUS_PROFILE).

    bench/training.py measured (2 cores, idle machine) text 9 / vision 110 / audio 30 samples/s in
    phase (a): about 3 minutes of pure steps; validation passes, checkpoints and a busy machine bring
    it to about 6. Text gets the smallest batch because its LM head and KD are (B, T, 49152) per step.
    """
    steps = {"text": (100, 20, 4), "vision": (300, 60, 16), "audio": (150, 30, 8)}
    if tower not in steps:
        raise ValueError(f"tower: {tower!r} has no CPU default; known: {sorted(steps)}")
    a, b, bs = steps[tower]
    # the text.embed head gets only its phase steps (batch 8) and stays far from converged: a 100-epoch
    # linear probe first (measured, carved text tower: never-seen recall@1 retention 0.26 -> 0.56, held-out
    # 0.17 -> 0.33). Not on audio: the speaker head fits its 337 rows / 163 speakers and loses on the
    # never-seen voice (1 - EER retention 1.03 -> 0.92, held-out 0.95 either way).
    probe = {"head_probe_epochs": 100} if tower == "text" else {}
    base = {"phase_a_steps": a, "phase_b_steps": b, "batch_size": bs, **probe}
    if init == "carved":
        # a carved tower starts from the teacher's weights: its rate, steps and precision per tower are
        # measured (CARVED_LR, CARVED_STEPS, CARVED_MIXED_PRECISION)
        from nexus_assets.core.registry import active_profile

        a, b, bs = CARVED_STEPS.get(profile or active_profile(), CARVED_STEPS["default"])[tower]
        # anchoring pulls pooled states towards the teacher's, which a carved tower starts at: light or off
        # (CARVED_W_ANCHOR, measured)
        base = {"phase_a_steps": a, "phase_b_steps": b, "batch_size": bs, "lr": CARVED_LR[tower], "adapter_lr": 1e-3,
                "w_anchor": CARVED_W_ANCHOR[tower], "w_state": CARVED_W_STATE[tower], "carved_lr_scale": CARVED_LR_SCALE[tower], "temperature": CARVED_TEMPERATURE[tower],
                "mixed_precision": CARVED_MIXED_PRECISION[tower], "channels_last": CARVED_CHANNELS_LAST[tower],
                "group_by_length": CARVED_GROUP_BY_LENGTH[tower], "compile_backbone": CARVED_COMPILE[tower],
                "phase_b_steps_by_capability": dict(CARVED_PHASE_B_BY_CAPABILITY.get(tower, {})),
                **probe, **CARVED_NEIGHBOUR.get(tower, {})}
    return TrainConfig(**{**base, **overrides})


@dataclass
class TrainHooks:
    """Test/instrumentation hooks; None = not called.

    batch(phase, step, batch) -> batch: may alter a batch (e.g. inject NaN).
    loss(phase, step, loss) -> loss: may alter the total loss before the checks (e.g. inject a spike).
    after_step(global_step): called after each step (e.g. to simulate a kill by raising).
    """

    batch: Callable[[str, int, dict], dict] | None = None
    loss: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[int], None] | None = None
