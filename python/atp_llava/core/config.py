"""ATPConfig: every knob of ATP-LLaVA training in one serialisable dataclass.

Layer convention (paper Table 2: "Pruning Layer Indexes ... starting from 0 and occurring prior
to input"): an ATP layer index ``l`` prunes *before* decoder layer ``l``. Its importance scores
come from the attention of decoder layer ``l - 1`` (paper 3.1: "based on the self-attention map
from the previous layer"), and its mask is added to the key bias of layers ``l, l+1, ...``.
So ``l`` must satisfy ``1 <= l < num_hidden_layers``. ``score_layer(l) == l - 1``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["ATPConfig", "MODES", "MLP_INPUTS", "BUDGETS", "TARGET_LOSSES", "BUDGET_CONTROLS"]

MODES = ("adaptive", "fixed", "fastv", "random")
MLP_INPUTS = ("normalized", "raw")
BUDGETS = ("hard", "soft")
TARGET_LOSSES = ("huber", "l1")
BUDGET_CONTROLS = ("constraint", "penalty")


@dataclass
class ATPConfig:
    """Configuration of the ATP modules and of the ATP-LLaVA training objective.

    Attributes:
        layers: ATP layer indexes, increasing; ATP at ``l`` prunes before decoder layer ``l``
            using the attention of layer ``l - 1``. LLaVA-1.5 in the paper: (4, 14, 24).
            None: ``default_layers(num_hidden_layers)``, filled in by ``apply_atp``.
        target_tokens: N_target of Eq. 13, vision tokens per image averaged over all decoder
            layers (the paper's "Token" column, e.g. 144).
        target_ratio: the budget as a keep ratio instead, for families whose images differ in
            size (LLaVA-NeXT's anyres, Qwen2-VL's dynamic resolution): each sample's N_target is
            ``target_ratio`` times its images' mean real token count, so N_bar is still tokens
            per image averaged over all decoder layers and L_target compares it with the
            sample's own target (their means over the batch). None: ``target_tokens``.
        temperature: T of Eq. 9-10.
        lambda_atp, lambda_target: weights of L_ATP and L_target in Eq. 14.
        lambda_sample: lambda_sample of Eq. 5 (paper: 3).
        strides: spatial sampling strides of Eq. 5; None = every stride whose score
            ``1 - lambda_sample / s^2`` lies in (0, 1] (DESIGN §3.3).
        image_grid: (H, W) vision-token grid of one image; None = inferred from the vision
            config (image_size // patch_size, e.g. 24 x 24 = 576 for LLaVA-1.5 at 336 px).
        mlp_width: width of z in Eq. 6.
        mlp_canvas: (H, W) canvas the threshold MLP's input is resampled to for families whose
            images differ in size (masked average pooling, modules.ThresholdMLP); a fixed-grid
            family (LLaVA-1.5) uses its own grid, where the resampling is the identity.
        init_threshold: initial theta_r and theta_s (the heads' bias is its logit); small keeps
            most tokens at the start of training.
        init_spatial_threshold: initial theta_s when it differs from ``init_threshold`` (None:
            the same); e.g. 0.9 starts the spatial branch at its sparsest levels, so that the
            redundancy branch holds the budget until the loss asks for spatial tokens
            (bench/adaptivity.py's ``redundancy_first`` arm measures it).
        mode: "adaptive" (learned thresholds, soft masks in training, Eq. 6-11), "fixed"
            (paper Table 2: top-k by the same redundant score at the same layers, tokens masked
            with -inf, no learned parameters) or "fastv" (the FastV baseline: one layer, top-k
            by the attention the sample's last instruction token pays to each image token, i.e.
            S_cross with a one-row weight) or "random" (the random baseline: the counts of
            "fixed", the tokens drawn uniformly per image from those still kept, with a
            generator seeded by ``random_seed``). "fixed", "fastv" and "random" have no ATP
            parameters: training them needs ``train_lm``.
        fixed_keep: "fixed"/"fastv"/"random": vision tokens per image kept after each ATP layer,
            one per entry of ``layers`` (e.g. (136, 68, 34)); ``matched_fastv_keep`` gives
            FastV's count for a given average.
        random_seed: "random": the seed of the draws. The model draws from one generator made
            from it when ATP is applied, one draw per image and ATP layer of every forward, so a
            run repeated with the same seed and the same forwards selects the same tokens.
        train_lm: False = frozen LM, only the ATP modules train (paper Table 3 "Frozen");
            True = the language model, projector and lm_head train as well (vision tower frozen,
            as in LLaVA-1.5 instruction tuning).
        hard_in_eval: in ``model.eval()`` the masks are hard (Eq. 9-11 thresholded, -inf
            bias), which is what inference with real pruning computes for the kept tokens.
        prune_in_eval: in ``model.eval()`` with hard masks, pruned tokens really leave the
            sequence (and the KV cache) of all later layers: inference as the paper runs it.
            False keeps them in place with key_bias -inf (the training path with 0/1 masks;
            the same logits for the tokens that remain, but no speed-up and no generate()).
        flash_decode: decoding steps against a pruned cache run on flash-attn's
            ``flash_attn_with_kvcache`` (flash.py) instead of ``atp_attention``: None = when
            flash-attn (2.6+) is installed and the model is on CUDA in float16/bfloat16; True =
            always (an error where it cannot); False = never.
        theta_override: (theta_r, theta_s) used instead of the MLP's thresholds (ablations,
            tests). Values outside (0, 1) are allowed: (-5, -5) with T >= 10 keeps every token
            with a bias of exactly 0 in float32.
        score_grad: "adaptive" training: the scores S_self and S_cross of the score layers carry
            the gradient of the masks built from them (atp_scores' backward), so the LM's
            queries and keys at a score layer learn to mark the tokens the answer needs; the
            threshold MLP still sees them detached. False: the scores are constants of the step
            and only the thresholds learn where to cut. Needs ``train_lm`` to change anything.
        rope_2d: 2D rotary positions for vision tokens (DESIGN §3.6, Qwen2-VL's M-RoPE): the
            rotary frequencies are split into (t, row, col) sections; a vision token at grid
            (r, c) of an image whose first token has 1D position p0 gets (p0, p0 + r, p0 + c),
            every other token (p, p, p) with its own 1D position p, i.e. exactly 1D RoPE. No
            position is ever re-indexed, so pruning preserves them. Off by default: it changes
            the model (it needs training).
        rope_2d_section: rotary frequencies (head_dim / 2 in all) of the (t, row, col)
            sections; None = Qwen2-VL's proportions (1/4, 3/8, 3/8), e.g. (16, 24, 24) at
            head_dim 128.

    Options that depart from the paper (each switchable back; README "Training that holds the
    budget and learns adaptive ones" gives the reasons and the experiment that ablates them):
        mlp_inputs: what the threshold MLP sees. "normalized": S_self and S_cross each min-max
            normalised to [0, 1] over the image's kept tokens (pruned positions 0), so its input
            scale does not depend on the LM (raw logits of a trained LM are ~150x those of a
            random one); "raw": the scores as they are (the paper).
        budget: which token count the budget losses see. "hard": straight-through masks in
            training: the forward uses the hard 0/1 masks inference uses (keys multiplied by
            M in {0, 1} through atp_attention's ``key_mask``), the backward the sigmoid
            relaxation of Eq. 9-10, so the counts of Eq. 12-13 are exactly the tokens
            inference keeps; "soft": the soft masks of Eq. 9-11 in the softmax and their soft
            counts (the paper).
        min_keep: every image keeps at least this many tokens at each ATP layer under hard
            masks (the best ones by S_red among those still kept), so a threshold at or above
            every score cannot silently prune an image away; 0 = no floor (the paper).
        target_loss: "huber": ``L_target`` is the Huber loss of N_bar - N_target with
            ``target_delta`` tokens of quadratic zone (the gradient of L1 away from the target,
            a vanishing one at it, so Adam settles instead of oscillating); "l1":
            ``|N_bar - N_target|`` (the paper).
        target_delta: the Huber zone of ``target_loss="huber"``, in tokens.
        budget_control: how the budget is held. "constraint": ``target_tokens`` is a
            constraint. L_target's weight ``w`` (``model.atp.budget_weight``, saved with the ATP
            weights) starts at ``lambda_target``; every ``budget_window`` optimizer steps it
            compares ``|e|``, ``e`` the window's mean relative error of the hard N_bar of each
            step's batch (over every process, so ``w`` is the same on all), with the window
            before: while ``|e|`` stays above ``budget_tolerance`` and has not fallen by a quarter,
            ``w`` is multiplied by ``weight_growth``; once it is within the tolerance, ``w`` is
            divided by its fourth root, never below ``lambda_target``. The penalty method's rule for its
            weight (raise it when the violation does not fall fast enough): a fixed weight
            settles off the target by the next-token gradient over the weight; the growing one
            until that offset is within the tolerance, from above or from below, on any task.
            "penalty": Eq. 14 with the fixed ``lambda_target`` (the paper).
        weight_growth: ``budget_control="constraint"``: the factor of one change of ``w``.
        budget_window: ``budget_control="constraint"``: optimizer steps per comparison.
        budget_tolerance: ``budget_control="constraint"``: the relative error of N_bar within
            which ``w`` relaxes back towards ``lambda_target``.
        logit_bound: the thresholds' pre-sigmoid logits are clamped to [-b, b] in the forward
            (theta in [sigmoid(-b), sigmoid(b)]); the backward passes a gradient that points back
            inside, and only that, where a logit is at the bound, so a threshold at its limit
            moves away from it as soon as the loss asks, and no step can carry it further out.
            None: the plain sigmoid (the paper), which saturates to exactly 0 or 1 in float32
            with no gradient back.
    """

    layers: Optional[Tuple[int, ...]] = None
    target_tokens: float = 144.0
    target_ratio: Optional[float] = None
    temperature: float = 10.0
    lambda_atp: float = 0.05
    lambda_target: float = 0.2
    lambda_sample: float = 3.0
    strides: Optional[Tuple[int, ...]] = None
    image_grid: Optional[Tuple[int, int]] = None
    mlp_width: int = 256
    mlp_canvas: Tuple[int, int] = (24, 24)
    init_threshold: float = 0.1
    init_spatial_threshold: Optional[float] = None
    mode: str = "adaptive"
    fixed_keep: Optional[Tuple[int, ...]] = None
    train_lm: bool = False
    hard_in_eval: bool = True
    prune_in_eval: bool = True
    flash_decode: Optional[bool] = None
    theta_override: Optional[Tuple[float, float]] = None
    rope_2d: bool = False
    rope_2d_section: Optional[Tuple[int, int, int]] = None
    mlp_inputs: str = "normalized"
    budget: str = "hard"
    min_keep: int = 1
    target_loss: str = "huber"
    target_delta: float = 8.0
    budget_control: str = "constraint"
    weight_growth: float = 2.0
    budget_window: int = 10
    budget_tolerance: float = 0.02
    logit_bound: Optional[float] = 6.0
    random_seed: int = 0
    score_grad: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ATPConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.strides is not None:
            self.strides = tuple(int(s) for s in self.strides)
        if self.image_grid is not None:
            self.image_grid = tuple(int(s) for s in self.image_grid)
            if len(self.image_grid) != 2:
                raise ValueError(f"ATPConfig.image_grid must be (H, W), got {self.image_grid}")
        self.mlp_canvas = tuple(int(s) for s in self.mlp_canvas)
        if len(self.mlp_canvas) != 2 or min(self.mlp_canvas) < 1:
            raise ValueError(f"ATPConfig.mlp_canvas must be (H, W) with H, W >= 1, got {self.mlp_canvas}")
        if self.target_ratio is not None:
            self.target_ratio = float(self.target_ratio)
            if not 0.0 < self.target_ratio <= 1.0:
                raise ValueError(f"ATPConfig.target_ratio must lie in (0, 1], got {self.target_ratio}")
        if self.mode != "adaptive":
            if self.fixed_keep is None:
                raise ValueError(f"ATPConfig.fixed_keep must give one kept-token count per ATP layer in "
                                 f"mode={self.mode!r}")
            self.fixed_keep = tuple(int(x) for x in self.fixed_keep)
            if min(self.fixed_keep) < 0:
                raise ValueError(f"ATPConfig.fixed_keep must be >= 0, got {self.fixed_keep}")
        if self.layers is not None:
            self._check_layers()
        if self.theta_override is not None:
            self.theta_override = tuple(float(x) for x in self.theta_override)
        if self.rope_2d_section is not None:
            self.rope_2d_section = tuple(int(x) for x in self.rope_2d_section)
            if len(self.rope_2d_section) != 3 or min(self.rope_2d_section) < 1:
                raise ValueError(f"ATPConfig.rope_2d_section must be three positive sizes (t, row, col), "
                                 f"got {self.rope_2d_section}")
        for name, allowed in (("mlp_inputs", MLP_INPUTS), ("budget", BUDGETS), ("target_loss", TARGET_LOSSES),
                              ("budget_control", BUDGET_CONTROLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ATPConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.min_keep = int(self.min_keep)
        if self.min_keep < 0:
            raise ValueError(f"ATPConfig.min_keep must be >= 0, got {self.min_keep}")
        if self.target_delta <= 0:
            raise ValueError(f"ATPConfig.target_delta must be > 0, got {self.target_delta}")
        if self.temperature <= 0:
            raise ValueError(f"ATPConfig.temperature must be > 0, got {self.temperature}")
        if not self.weight_growth > 1.0:
            raise ValueError(f"ATPConfig.weight_growth must be > 1, got {self.weight_growth}")
        self.budget_window = int(self.budget_window)
        if self.budget_window < 1:
            raise ValueError(f"ATPConfig.budget_window must be >= 1, got {self.budget_window}")
        if not 0.0 <= self.budget_tolerance < 1.0:
            raise ValueError(f"ATPConfig.budget_tolerance must lie in [0, 1), got {self.budget_tolerance}")
        if not self.lambda_target > 0 and self.budget_control == "constraint":
            raise ValueError(f"ATPConfig.lambda_target must be > 0 with budget_control='constraint' (the budget "
                             f"weight starts there and grows by factors), got {self.lambda_target}")
        if self.logit_bound is not None:
            self.logit_bound = float(self.logit_bound)
            if not 0.0 < self.logit_bound < 30.0:
                raise ValueError(f"ATPConfig.logit_bound must lie in (0, 30) (sigmoid(30) is 1.0 in float32) or be "
                                 f"None, got {self.logit_bound}")
        self.random_seed = int(self.random_seed)
        for name in ("init_threshold", "init_spatial_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"ATPConfig.{name} must lie in (0, 1), got {value}")

    def _check_layers(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise ValueError("ATPConfig.layers must name at least one ATP layer")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"ATPConfig.layers must be strictly increasing, got {self.layers}")
        if self.layers[0] < 1:
            raise ValueError(f"ATPConfig.layers: ATP at layer l uses layer l-1's attention, so l >= 1; "
                             f"got {self.layers}")
        if self.fixed_keep is not None and self.mode != "adaptive" and len(self.fixed_keep) != len(self.layers):
            raise ValueError("ATPConfig.fixed_keep must give one kept-token count per ATP layer in "
                             f"mode={self.mode!r}; layers={self.layers}, fixed_keep={self.fixed_keep}")
        if self.mode == "fastv" and len(self.layers) != 1:
            raise ValueError(f"ATPConfig: mode='fastv' prunes at one layer, got layers={self.layers}")

    def for_depth(self, num_layers: int) -> "ATPConfig":
        """This config with ``layers`` filled in for a decoder of ``num_layers`` layers (itself if set)."""
        if self.layers is not None:
            return self
        return dataclasses.replace(self, layers=self.default_layers(num_layers))

    @staticmethod
    def default_layers(num_layers: int) -> Tuple[int, ...]:
        """ATP layers for a decoder of ``num_layers`` layers at the paper's relative depths
        (4, 14, 24 of LLaVA-1.5's 32): 1/8, 7/16 and 3/4 of the depth, each at least 1 and
        strictly increasing, fewer where the decoder is too shallow (1 -> none is possible)."""
        if num_layers < 2:
            raise ValueError(f"ATPConfig.default_layers: ATP needs at least 2 decoder layers, got {num_layers}")
        layers = []
        for frac in (4 / 32, 14 / 32, 24 / 32):
            layer = max(int(round(frac * num_layers)), layers[-1] + 1 if layers else 1)
            if layer < num_layers:
                layers.append(layer)
        return tuple(layers)

    @staticmethod
    def score_layer(atp_layer: int) -> int:
        """Decoder layer whose attention (q, k, lse) feeds the ATP module at ``atp_layer``."""
        return atp_layer - 1

    @staticmethod
    def matched_fastv_keep(n_bar: float, layer: int, num_layers: int, n_grid: int) -> int:
        """FastV's kept tokens per image when it prunes before decoder ``layer`` (of
        ``num_layers``) so that the average over all layers is ``n_bar`` (the paper's "Token"
        column): ``(layer * n_grid + (num_layers - layer) * keep) / num_layers = n_bar``."""
        keep = (n_bar * num_layers - layer * n_grid) / (num_layers - layer)
        if not 0 <= round(keep) <= n_grid:
            raise ValueError(f"matched_fastv_keep: an average of {n_bar} tokens cannot be reached by pruning "
                             f"before layer {layer} of {num_layers} ({n_grid} tokens per image)")
        return int(round(keep))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ATPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ATPConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ATPConfig":
        return cls.from_dict(json.loads(s))
