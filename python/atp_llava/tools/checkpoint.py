"""A trained ATP model written as a user reloads it (``save_model``): the stock checkpoint
and ``ATP_FILE`` beside it. ``python -m atp_llava.train --save-model DIR`` writes through it."""
from __future__ import annotations

import os
from typing import Union

from torch import nn

from ..core.distributed import is_rank0
from ..io import save_atp
from ..patch import get_atp_controller
from .train_log import _unwrap

ATP_FILE = "atp.safetensors"  # the ATP weights inside a --save-model directory


def save_model(model: nn.Module, directory: Union[str, os.PathLike], tokenizer=None) -> None:
    """Write an ATP model as a user reloads it: ``directory`` gets the stock LLaVA
    (``save_pretrained`` of every weight but ``atp.*``; the config holds no trace of ATP, as
    transformers does not serialise the attention implementation), ``directory/atp.safetensors``
    (``save_atp``) and ``tokenizer`` if given. Then::

        load_atp(LlavaForConditionalGeneration.from_pretrained(directory), f"{directory}/atp.safetensors")

    is the same model. ``model`` itself is not changed.
    """
    inner = _unwrap(model)
    get_atp_controller(inner)
    writer = is_rank0()
    if _is_sharded(inner):  # FSDP2: whole tensors, a collective (every rank calls save_model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = inner.state_dict() if writer else {}
    if writer:
        os.makedirs(directory, exist_ok=True)
        inner.save_pretrained(directory, state_dict={k: v for k, v in state.items() if not k.startswith("atp.")})
    save_atp(inner, os.path.join(directory, ATP_FILE))
    if tokenizer is not None and writer:
        tokenizer.save_pretrained(directory)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
