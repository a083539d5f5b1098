"""ATP-LLaVA integration layer (Hugging Face LLaVA -> ATP-LLaVA). Built on atp_ops.

    from atp_llava import ATPConfig, apply_atp
    model = apply_atp(llava_model, ATPConfig(layers=(4, 14, 24), target_tokens=144))
"""
from .core.attention import ATTN_IMPLEMENTATION
from .core.config import ATPConfig
from .core.efficiency import ATPReport, layer_flops, run_cost
from .core.layout import VisionLayout
from .core.seqview import SeqView
from .core.losses import atp_losses, tokens_per_layer
from .core.modules import ATPModules, ThresholdMLP
from .core.optim import DEFAULT_LR_ATP, DEFAULT_LR_LM, param_groups
from .core.rope2d import positions_3d, rope_2d_cos_sin
from .core.spatial import default_strides, spatial_score
from .core.step import KEEP_REDUNDANT, KEEP_SPATIAL
from .io import load_atp, read_atp_config, save_atp
from .patch import SUPPORTED_TRANSFORMERS, apply_atp, check_transformers_version, get_atp_controller, remove_atp

__all__ = [
    "ATPConfig",
    "apply_atp",
    "remove_atp",
    "save_atp",
    "load_atp",
    "shard_fsdp2",
    "read_atp_config",
    "ATPModules",
    "ThresholdMLP",
    "VisionLayout",
    "SeqView",
    "ATPReport",
    "visualize_pruning",
    "render_pruning",
    "write_png",
    "KEEP_REDUNDANT",
    "KEEP_SPATIAL",
    "atp_losses",
    "tokens_per_layer",
    "spatial_score",
    "default_strides",
    "positions_3d",
    "rope_2d_cos_sin",
    "get_atp_controller",
    "layer_flops",
    "run_cost",
    "check_transformers_version",
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_TRANSFORMERS",
    "param_groups",
    "DEFAULT_LR_ATP",
    "DEFAULT_LR_LM",
]

# visualize.py is also a script (python -m atp_llava.visualize); importing
# it with the package would make runpy warn, so its names load on first use. shard_fsdp2 is a
# tool (tools/fsdp.py), and the package's import never reaches the tools.
_LAZY = {"visualize_pruning": "visualize", "render_pruning": "visualize",
         "write_png": "visualize", "shard_fsdp2": "tools.fsdp"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
