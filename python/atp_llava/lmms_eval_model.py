"""lmms-eval model plugin: evaluate ATP-LLaVA (real pruning in eval mode) with lmms-eval 0.7.

    pip install .[lmms]
    lmms-eval --model atp_llava --model_args pretrained=DIR,atp=atp.safetensors --tasks TASK --batch_size 4
    lmms-eval --model atp_llava --model_args "pretrained=DIR,layers=[4,14,24],theta=[0.5,0.5]" --tasks TASK

lmms-eval finds the model through the ``lmms_eval.models`` entry point that setup.py declares
(``atp_llava = atp_llava.lmms_eval_model:lmms_eval_manifest``): a ``ModelManifest`` naming
``ATPLlava`` as a simple (non-chat) model. The class lives in this module, which imports
lmms-eval, so ``import atp_llava`` itself never needs it.

model_args (comma-separated; lists in brackets or colon-separated, e.g. ``layers=[1,2,3]`` or
``layers=1:2:3``, because lmms-eval splits the string on commas outside brackets):

    pretrained      a saved LlavaForConditionalGeneration (local directory), with its tokenizer
                    and, when saved, its image processor (else CLIP preprocessing, data.py)
    tokenizer       where the tokenizer is, when not in ``pretrained``
    atp             ATP weights and config (atp_llava.save_atp); or else, as python -m
                    atp_llava.report takes them (cli.py):
    layers, theta, mode, keep, init_threshold, seed
                    untrained ATP modules: ATP layers, fixed thresholds (theta_r, theta_s),
                    "adaptive" / "fixed" / "fastv" / "random", kept tokens per layer, initial
                    thresholds, the seed of mode "random"'s draws (default 0)
    dtype, device   float32 (default), bfloat16, float16, float64; cuda if available, else cpu
    batch_size      requests per batch (lmms-eval's --batch_size)
    max_new_tokens  generation length when a task's generation_kwargs give none (default 128)
    template        the prompt template, with {image} and {prompt} (default: data.LLAVA_TEMPLATE,
                    the LLaVA-1.5 one training uses)
    report_path     also append every request's efficiency report to this JSON-lines file
    loglikelihood   what loglikelihood returns per request: "logprob" (default) the summed
                    log-probability of the continuation tokens, as lmms-eval's API documents it and
                    its perplexity aggregation expects; "loss" the mean negative log-probability per
                    continuation token, what lmms-eval 0.7's bundled models return and what its
                    multiple_choice scoring expects (it picks the choice with the smallest value)

Every request's efficiency report (model.atp_report split per sample: vision tokens per decoder
layer, FLOPs by Eq. 15, KV-cache bytes, their reductions) is logged through lmms-eval's logger
and kept in ``ATPLlava.atp_reports`` (a list of dicts, one per request, in completion order);
``ATPLlava.efficiency_summary()`` averages them. Per batch the means go to lmms-eval's
throughput log (``log_metrics``), so they appear in the results JSON under "throughput".

This module is the model class and its answers to lmms-eval's requests; the model_args' lists
and a request's inputs are in ``atp_llava.tools.lmms_inputs`` (``RequestInputs``), the
efficiency reports in ``atp_llava.tools.lmms_reports`` (``EfficiencyReports``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from transformers import StoppingCriteria

from .tools.cli import load_model, model_atp
from .tools.data import LLAVA_TEMPLATE
from .tools.lmms_inputs import RequestInputs, _int_list, _theta
from .tools.lmms_reports import EfficiencyReports

__all__ = ["ATPLlava", "LoglikelihoodResult", "lmms_eval_manifest", "MODEL_ID", "CLASS_PATH", "ENTRY_POINT"]

MODEL_ID = "atp_llava"
CLASS_PATH = "atp_llava.lmms_eval_model.ATPLlava"
# setup.py's entry_points={"lmms_eval.models": [ENTRY_POINT]} (tests check the two agree).
ENTRY_POINT = "atp_llava = atp_llava.lmms_eval_model:lmms_eval_manifest"


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point's payload: model id ``atp_llava`` -> ATPLlava."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


@dataclass(eq=False)
class LoglikelihoodResult(GenerationResult):
    """One loglikelihood answer: ``text`` is the pair (log-likelihood, is_greedy), and the object
    unpacks, indexes and compares as that pair (``ll, greedy = result``).

    Why not a plain tuple: lmms-eval 0.7.3's evaluator passes every response through
    ``unwrap_generation_output``, which turns anything but a string or a GenerationResult into
    ``str(response)``, so a (float, bool) tuple reaches the task's scoring as the string
    "(-1.5, False)" and multiple_choice fails. A GenerationResult's ``text`` passes through as is.
    """

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, i):
        return self.text[i]

    def __len__(self) -> int:
        return len(self.text)

    def __eq__(self, other) -> bool:
        if isinstance(other, GenerationResult):
            return tuple(self.text) == tuple(other.text)
        return isinstance(other, tuple) and tuple(self.text) == other

    __hash__ = None


class _StopOnStrings(StoppingCriteria):
    """StoppingCriteria: a sample is done once its new tokens hold eos or decode to text with one
    of ``until``; remembers at which step each sample finished (its generated-token count)."""

    def __init__(self, tokenizer, prompt_len: int, until: Sequence[str], eos_ids: Sequence[int], batch: int):
        self.tokenizer, self.prompt_len, self.until = tokenizer, prompt_len, list(until)
        self.eos_ids = set(int(e) for e in eos_ids)
        self.finished_at: List[Optional[int]] = [None] * batch

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            if self.finished_at[b] is not None:
                done[b] = True
                continue
            last = int(new[b, -1]) if new.shape[1] else None
            hit = last in self.eos_ids
            if not hit and self.until:
                text = self.tokenizer.decode(new[b].tolist(), skip_special_tokens=True)
                hit = any(s in text for s in self.until)
            if hit:
                self.finished_at[b] = new.shape[1]
                done[b] = True
        return done


class ATPLlava(RequestInputs, EfficiencyReports, lmms):
    """lmms-eval model ``atp_llava``: a saved LLaVA with ATP applied, generating with real
    pruning. See the module docstring for the model_args."""

    is_simple = True

    def __init__(self, pretrained: str, atp: Optional[str] = None, layers=None, theta=None, mode: str = "adaptive",
                 keep=None, init_threshold: Optional[float] = None, seed=0, tokenizer: Optional[str] = None,
                 device: Optional[str] = None, dtype: str = "float32", batch_size=1, max_new_tokens: int = 128,
                 template: str = LLAVA_TEMPLATE, report_path: Optional[str] = None, loglikelihood: str = "logprob",
                 max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"atp_llava model_args: unknown arguments {sorted(kwargs)}; known: pretrained, "
                            "tokenizer, atp, layers, theta, mode, keep, init_threshold, seed, dtype, device, "
                            "batch_size, max_new_tokens, template, report_path, loglikelihood")
        if not pretrained or not os.path.isdir(str(pretrained)):
            raise ValueError(f"atp_llava model_args: pretrained must be a local directory holding a saved "
                             f"LlavaForConditionalGeneration, got {pretrained!r}")
        if loglikelihood not in ("logprob", "loss"):
            raise ValueError(f"atp_llava model_args: loglikelihood must be 'logprob' or 'loss', got {loglikelihood!r}")
        if "{prompt}" not in template:
            raise ValueError(f"atp_llava model_args: template must contain {{prompt}}, got {template!r}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            eval_logger.warning("atp_llava: batch_size 'auto' is not supported; using 1")
            batch_size = 1
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"atp_llava model_args: batch_size must be >= 1, got {batch_size}")
        options = dict(layers=_int_list(layers, "layers"), theta=_theta(theta), keep=_int_list(keep, "keep"),
                       init_threshold=None if init_threshold is None else float(init_threshold))
        try:
            source = model_atp(tiny=False, atp=atp, mode=str(mode), seed=int(seed), **options)
        except ValueError as e:
            raise ValueError(f"atp_llava model_args: {e} (model_args names: atp, layers, theta, init_threshold, "
                             "keep, mode, seed)") from None
        self._model = load_model(str(pretrained), dtype=str(dtype), atp=source, device=device)  # eval()
        self._device = next(self._model.parameters()).device
        self._dtype = next(self._model.parameters()).dtype
        self._config = self._model.config
        self.pretrained, self.atp_path, self.template = str(pretrained), atp, template
        self.n_grid = int(self._model.atp.n_grid)
        self.image_token_id = int(self._config.image_token_id)
        self.image_size = int(self._config.vision_config.image_size)

        from transformers import AutoTokenizer

        tok_dir = tokenizer or str(pretrained)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"atp_llava: no tokenizer in {tok_dir!r} (save one beside the model or pass "
                             f"tokenizer=DIR): {e}") from e
        self._image_processor = self._load_image_processor(str(pretrained))
        text_cfg = self._config.text_config
        self.eos_token_id = self._tokenizer.eos_token_id
        if self.eos_token_id is None:
            self.eos_token_id = getattr(text_cfg, "eos_token_id", None)
        pad = self._tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (getattr(text_cfg, "pad_token_id", None) or
                                                         (self.eos_token_id if self.eos_token_id is not None else 0))
        self.max_new_tokens = int(max_new_tokens)
        self.report_path = report_path
        self.loglikelihood_output = loglikelihood
        self._warned_choice = False
        self.atp_reports: List[Dict[str, Any]] = []
        cfg = self._model.atp.config
        eval_logger.info(f"atp_llava: {self.pretrained} with ATP {'from ' + atp if atp else '(untrained modules)'}: "
                         f"mode {cfg.mode}, layers {list(cfg.layers)}, theta_override {cfg.theta_override}, "
                         f"{self.n_grid} tokens per image, image processor: "
                         f"{type(self._image_processor).__name__ if self._image_processor else 'CLIP preprocessing'}, "
                         f"{self._dtype} on {self._device}")

    # -- properties lmms-eval reads ------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._config

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # -- lmms-eval API -------------------------------------------------------------------------

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        """Greedy (or, with temperature > 0, sampled) generation with real pruning, batched by
        generation_kwargs; stops at eos, at any of ``until`` (cut from the text), or after
        ``max_new_tokens``."""
        from tqdm import tqdm

        start = len(self.atp_reports)
        collator = lmms_utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        results: List[GenerationResult] = []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="atp_llava generate_until")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            examples, metas = [], []
            for ctx, dtv, doc_id, task, split in zip(contexts, doc_to_visuals, doc_ids, tasks, splits):
                visuals = self._visuals(dtv, task, split, doc_id)
                examples.append({"input_ids": self._prompt_ids(ctx, len(visuals)),
                                 "pixel_values": self._pixels(visuals)})
                metas.append({"request_type": "generate_until", "task": task, "doc_id": doc_id,
                              "prompt_tokens": len(examples[-1]["input_ids"])})
            texts, generated = self._generate(examples, dict(all_kwargs[0]), metas)
            for ctx, gen_kwargs, text, n_gen, meta in zip(contexts, all_kwargs, texts, generated, metas):
                self.cache_hook.add_partial("generate_until", (ctx, gen_kwargs), text)
                results.append(GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=meta["prompt_tokens"], output_tokens=n_gen)))
            pbar.update(len(chunk))
        pbar.close()
        self._log_summary("generate_until", self.atp_reports[start:])
        return collator.get_original(results)

    def _generate(self, examples, gen_kwargs: Dict[str, Any], metas) -> Tuple[List[str], List[int]]:
        from transformers import StoppingCriteriaList

        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        gen_kwargs.pop("do_sample", None)  # as lmms-eval's own models: sampling iff temperature > 0
        do_sample = temperature > 0
        top_p = gen_kwargs.pop("top_p", None)
        top_k = gen_kwargs.pop("top_k", None)
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        if num_beams > 1:
            eval_logger.warning(f"atp_llava: num_beams={num_beams} is not supported with pruning (the pruned "
                                "per-layer cache cannot follow beam search); decoding with num_beams=1")
        if gen_kwargs:
            eval_logger.debug(f"atp_llava: generation_kwargs ignored: {sorted(gen_kwargs)}")
        inputs = self._batch(examples, "left")
        prompt_len = inputs["input_ids"].shape[1]
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        stop = _StopOnStrings(self._tokenizer, prompt_len, until, eos, len(examples))
        kwargs: Dict[str, Any] = dict(max_new_tokens=max_new, do_sample=do_sample, num_beams=1,
                                      pad_token_id=self.pad_token_id, use_cache=True,
                                      stopping_criteria=StoppingCriteriaList([stop]))
        if self.eos_token_id is not None:
            kwargs["eos_token_id"] = self.eos_token_id
        if do_sample:
            kwargs["temperature"] = temperature
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
            if top_k is not None:
                kwargs["top_k"] = int(top_k)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self._model.generate(**inputs, **kwargs)
        elapsed = time.perf_counter() - t0
        new = out[:, prompt_len:].tolist()
        texts, generated = [], []
        for b, toks in enumerate(new):
            n = stop.finished_at[b] if stop.finished_at[b] is not None else len(toks)
            toks = toks[:n]
            text = self._tokenizer.decode(toks, skip_special_tokens=True)
            for s in until:
                if s and s in text:
                    text = text.split(s, 1)[0]
            texts.append(text)
            generated.append(n)
        self._record(metas, generated, elapsed)
        return texts, generated

    def loglikelihood(self, requests: List[Instance]) -> List[LoglikelihoodResult]:
        """(log P(continuation | context, images), whether greedy decoding gives the continuation),
        from the logits of one pruned forward in eval mode: the sum of the log-softmax of the
        continuation tokens (no loss term of the model is used). With ``loglikelihood=loss``,
        minus that sum over the number of continuation tokens instead. Each answer is a
        LoglikelihoodResult: it unpacks as the pair (value, is_greedy)."""
        from tqdm import tqdm

        # multiple_choice requests carry the choice as a string, loglikelihood ones doc_to_target
        if (self.loglikelihood_output == "logprob" and not self._warned_choice
                and any(len(r.args) > 1 and isinstance(r.args[1], str) for r in requests)):
            self._warned_choice = True
            eval_logger.warning("atp_llava: loglikelihood returns log-probabilities (higher is likelier), but "
                                "lmms-eval 0.7's multiple_choice scoring takes the choice with the smallest value "
                                "(its bundled models return a loss): pass loglikelihood=loss in --model_args for "
                                "multiple_choice tasks")

        start = len(self.atp_reports)
        prepared = []
        for r in requests:
            args = r.args
            if len(args) == 2:  # unconditional ("", choice): acc_mutual_info
                context, continuation, dtv, doc_id, task, split = args[0], args[1], None, r.doc_id, r.task_name, None
            else:
                context, continuation, dtv, doc_id, task, split = args
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            if isinstance(continuation, list):
                continuation = continuation[0]
            prepared.append((context, str(continuation), dtv, doc_id, task, split))
        collator = lmms_utils.Collator(prepared, lambda a: (-(len(a[0]) + len(a[1])), a[0]), grouping=False)
        results: List[LoglikelihoodResult] = []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="atp_llava loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            examples, metas, spans = [], [], []
            for context, continuation, dtv, doc_id, task, split in chunk:
                visuals = self._visuals(dtv, task, split, doc_id)
                ctx_ids = self._prompt_ids(context, len(visuals))
                cont_ids = self._encode(continuation)
                examples.append({"input_ids": ctx_ids + cont_ids, "pixel_values": self._pixels(visuals)})
                spans.append((len(ctx_ids), cont_ids))
                metas.append({"request_type": "loglikelihood", "task": task, "doc_id": doc_id,
                              "prompt_tokens": len(ctx_ids), "continuation_tokens": len(cont_ids)})
            inputs = self._batch(examples, "right")  # right padding: position ids are plain aranges
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self._model(**inputs, use_cache=False).logits
            elapsed = time.perf_counter() - t0
            for b, (n_ctx, cont_ids) in enumerate(spans):
                counts = TokenCounts(input_tokens=n_ctx + len(cont_ids), output_tokens=0)
                if not cont_ids:
                    results.append(LoglikelihoodResult(text=(0.0, True), token_counts=counts))
                    continue
                # logits at position i predict token i + 1
                rows = logits[b, n_ctx - 1:n_ctx - 1 + len(cont_ids)]
                rows = rows.to(torch.promote_types(rows.dtype, torch.float32)).log_softmax(-1)
                target = torch.tensor(cont_ids, device=rows.device)
                logprob = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                if self.loglikelihood_output == "loss":
                    logprob = -logprob / len(cont_ids)
                results.append(LoglikelihoodResult(text=(logprob, greedy), token_counts=counts))
            self._record(metas, None, elapsed)
            for (context, continuation, *_), res in zip(chunk, results[-len(chunk):]):
                self.cache_hook.add_partial("loglikelihood", (context, continuation), tuple(res))
            pbar.update(len(chunk))
        pbar.close()
        self._log_summary("loglikelihood", self.atp_reports[start:])
        return collator.get_original(results)

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("atp_llava: generate_until_multi_round is not implemented (multi-round tasks would "
                                  "need the pruned cache carried across rounds); use generate_until tasks")
