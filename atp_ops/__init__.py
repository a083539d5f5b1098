"""atp_ops: fused attention with learnable per-key soft masks and the ATP token-pruning scores.

    from atp_ops import atp_attention, atp_scores, atp_soft_mask, atp_hard_mask
"""
from . import ops, reference
from .ops import (
    atp_attention,
    atp_hard_mask,
    atp_scores,
    atp_soft_mask,
    has_cuda_kernels,
    normalize_scores,
    redundant_score,
    set_validation,
    validation_enabled,
)

__version__ = "0.1.0"

__all__ = [*ops.__all__, "reference"]
