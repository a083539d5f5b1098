"""ATP-LLaVA on Hugging Face Trainer: the budget loss normalised over the accumulated batch, the
ATP and LM learning rates, and the budget statistics in Trainer's logs.

    from atp_llava.trainer import ATPTrainer
    trainer = ATPTrainer(model=apply_atp(llava, ATPConfig(...)), args=TrainingArguments(...,
                         learning_rate=2e-5), train_dataset=..., data_collator=collate, lr_atp=1e-3)
    trainer.train()

``ATPTrainer`` is a ``transformers.Trainer`` that

* counts the samples with an image in every accumulated batch (all gradient-accumulation steps of
  one optimizer step, all processes) and passes the count to the model, which weights each
  forward's budget term by its share of them (``atp_llava.core.losses``, "Normalisation"): with
  gradient accumulation N and world size W the gradients are those of one process on the whole
  batch, as Trainer's ``num_items_in_batch`` makes them for the next-token loss;
* builds the optimizer from ``atp_llava.core.optim.param_groups``: the ATP modules at ``lr_atp``, the
  LM (``ATPConfig.train_lm``) at ``TrainingArguments.learning_rate``; Trainer's optimizer choice
  (``optim``, its kwargs) and scheduler apply to both groups;
* logs ATP's statistics with Trainer's own loss (``ATPCallback``, placed before the reporting
  callbacks so that every logger receives them).

DeepSpeed ZeRO-3: ``TrainingArguments(deepspeed=atp_llava.trainer.ZERO3_CONFIG)`` (a config with
Trainer's "auto" values; ``pip install .[deepspeed]``). ZeRO-3 gathers a module's parameters
only around its forward; the ATP modules read theirs nowhere else, and every rank runs them in
the same order whatever its batch holds. ``save_atp`` gathers the partitions (call it on every
rank).

With a plain ``Trainer``, the model still normalises its budget term over the accumulated batch,
by label tokens instead of samples (exact when every forward holds the same label tokens per
sample with an image); add ``ATPCallback`` for the logs.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .core.losses import SAMPLES_IN_BATCH
from .core.optim import DEFAULT_LR_ATP, param_groups

__all__ = ["ATPTrainer", "ATPCallback", "ZERO3_CONFIG"]

# DeepSpeed ZeRO-3 for TrainingArguments(deepspeed=...): Trainer fills in the "auto" values.
ZERO3_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero3.json")


def _atp_model(model: nn.Module) -> nn.Module:
    """The ATP model (apply_atp) inside ``model`` (itself, or wrapped by DDP / DeepSpeed / PEFT)."""
    for m in model.modules():
        if getattr(m, "_atp_controller", None) is not None:
            return m
    raise TypeError(f"atp_llava.trainer: {type(model).__name__} holds no ATP-LLaVA model; call "
                    "atp_llava.apply_atp(model, ATPConfig(...)) first")


class ATPCallback(TrainerCallback):
    """Logs ATP-LLaVA's budget statistics each time Trainer logs its loss, as means over the
    training forwards since the previous log on every process, weighted by their samples with an
    image (Trainer's loss is likewise the mean since the previous log):

    ``atp/n_bar`` (Eq. 13, the budget's N_bar), ``atp/n_bar_hard`` (the hard masks' N_bar, what
    inference keeps), ``atp/loss_atp``, ``atp/loss_target`` (each forward's own, before the
    weights of Eq. 14), and per ATP layer ``l``: ``atp/tokens_l{l}`` (vision tokens per image kept
    after it), ``atp/theta_r_l{l}``, ``atp/theta_s_l{l}`` (its thresholds, mode "adaptive").
    Beside the means, ``atp/budget_weight``: L_target's weight as it stands at the log (mode
    "adaptive"; ATPConfig.budget_control), the same on every process by construction.

    Across processes the sums are all-reduced at each log (Trainer logs on every process at the
    same steps), so every process logs the same values.
    """

    # atp_stats key -> logged name (each forward's value, weighted by its samples with an image)
    _scalars = {"n_bar_batch": "n_bar", "n_bar_hard": "n_bar_hard", "loss_atp": "loss_atp",
                "loss_target": "loss_target"}

    def __init__(self):
        self._per_layer = ()
        self._model: Optional[nn.Module] = None
        self._hook = None
        self._sums: Optional[torch.Tensor] = None
        self._names: List[str] = []

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Start collecting from ``model`` (an ATP model or a wrapper around one); Trainer calls
        it at the start of training."""
        atp_model = _atp_model(model)
        if atp_model is self._model:
            return
        self.detach()
        config = atp_model._atp_controller.config
        self._per_layer = ("tokens", "theta_r", "theta_s") if config.mode == "adaptive" else ("tokens",)
        self._names = [f"atp/{name}" for name in self._scalars.values()]
        self._names += [f"atp/{what}_l{l}" for what in self._per_layer for l in config.layers]
        self._model = atp_model
        self._hook = atp_model.register_forward_hook(self._collect)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._model = self._hook = self._sums = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()

    def _collect(self, module: nn.Module, args, output) -> None:
        stats = getattr(output, "atp_stats", None)
        if not module.training or stats is None:
            return
        w = (stats["images_per_sample"] > 0).to(torch.float64)  # (B,)
        n = w.sum()
        scalars = torch.stack([stats[key].to(torch.float64) for key in self._scalars]) * n
        per_layer = [w @ stats[what].to(torch.float64) for what in self._per_layer]  # (K,) each
        row = torch.cat([scalars, *per_layer, n[None]])
        self._sums = row if self._sums is None else self._sums + row

    # -- logging -----------------------------------------------------------------------------

    def metrics(self) -> Dict[str, float]:
        """The means since the previous call, over every process (a collective when
        torch.distributed is initialised: call it on every process), and start again."""
        if self._model is None:
            return {}
        sums = self._sums
        if sums is None:
            device = self._model.atp.budget_weight.device
            sums = torch.zeros(len(self._names) + 1, dtype=torch.float64, device=device)
        self._sums = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        n = float(sums[-1])
        if n == 0:
            return {}
        values = dict(zip(self._names, (sums[:-1] / n).tolist()))
        if self._model.atp.config.mode == "adaptive":
            values["atp/budget_weight"] = float(self._model.atp.budget_weight)
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # the ATP statistics go with the training loss
            return
        values = self.metrics()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


class ATPTrainer(Trainer):
    """``transformers.Trainer`` for an ATP model (see the module docstring).

    lr_atp: learning rate of the ATP modules (``model.atp``); the LM's is
        ``TrainingArguments.learning_rate`` (the paper: 2e-5 with the LM trained).
    log_atp: log the budget statistics (``ATPCallback``).
    """

    def __init__(self, *args, lr_atp: float = DEFAULT_LR_ATP, log_atp: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_atp = float(lr_atp)
        self._adapter = _atp_model(self.model)._atp_controller.adapter
        self._samples_in_batch: Optional[torch.Tensor] = None
        if log_atp:
            self.callback_handler.callbacks.insert(0, ATPCallback())

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = param_groups(opt_model, lr_atp=self.lr_atp, lr_lm=self.args.learning_rate,
                                  weight_decay=self.args.weight_decay)
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("params", "model", "optimizer_dict")}
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._samples_in_batch = None
        if num_items_in_batch is not None and batch_samples:
            count = sum(self._adapter.vision_token_mask(b["input_ids"]).any(-1).sum() for b in batch_samples)
            count = torch.as_tensor(count, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()  # as Trainer counts num_items_in_batch
            self._samples_in_batch = count
        return batch_samples, num_items_in_batch

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None):
        if model.training and num_items_in_batch is not None and self._samples_in_batch is not None:
            inputs = {**inputs, SAMPLES_IN_BATCH: self._samples_in_batch}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
