"""The lmms-eval plugin's efficiency reports (``atp_llava.lmms_eval_model``): every request's
share of ``model.atp_report``, logged and kept, and their means (``EfficiencyReports``, a base of
``ATPLlava``)."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger

# per-sample fields of ATPReport.to_dict(), split per request
_PER_SAMPLE = ("n_bar", "vision_tokens", "tokens_seen", "flops_per_layer", "flops", "flops_full",
               "kv_cache_bytes_per_layer", "kv_cache_bytes", "kv_cache_bytes_full", "flops_reduction",
               "kv_cache_reduction")


class EfficiencyReports:
    """ATPLlava's efficiency reports, kept in ``atp_reports`` (set by ``ATPLlava.__init__``, with
    ``_model`` and ``report_path``)."""

    def _record(self, metas: List[Dict[str, Any]], generated: Optional[List[int]], elapsed: float) -> None:
        """Split ``model.atp_report`` (the last call) per request, log and keep each; log the
        batch means to lmms-eval's throughput metrics."""
        report = getattr(self._model, "atp_report", None)
        if report is None:
            return
        d = report.to_dict()
        per_token = 0.0  # KV bytes one cached generated token adds over all layers
        if report.generated > 1:  # the cache holds all generated tokens but the last
            per_token = float((report.kv_cache_bytes_final[0] - report.kv_cache_bytes[0]) / (report.generated - 1))
        batch = []
        for b, meta in enumerate(metas):
            rec = dict(meta)
            rec.update(atp_layers=list(report.atp_layers), batch_size=len(metas), latency_s=elapsed / len(metas))
            rec.update({k: d[k][b] for k in _PER_SAMPLE})
            gen = 0 if generated is None else int(generated[b])
            rec["generated_tokens"] = gen
            rec["kv_cache_bytes_final"] = rec["kv_cache_bytes"] + max(gen - 1, 0) * per_token
            batch.append(rec)
            vt = " ".join(f"{x:.0f}" for x in rec["vision_tokens"])
            eval_logger.info(f"atp_llava {rec['request_type']} {rec['task']} doc {rec['doc_id']}: vision tokens per "
                             f"layer [{vt}], N_bar {rec['n_bar']:.1f}, TFLOPs {rec['flops'] / 1e12:.4f} "
                             f"(-{rec['flops_reduction']:.1%}), KV {rec['kv_cache_bytes'] / 2**20:.3f} MiB "
                             f"(-{rec['kv_cache_reduction']:.1%})")
        self.atp_reports.extend(batch)
        if self.report_path:
            with open(self.report_path, "a") as f:
                for rec in batch:
                    f.write(json.dumps(rec) + "\n")
        total_gen = 0 if generated is None else int(sum(generated))
        mean = lambda k: float(sum(r[k] for r in batch) / len(batch))  # noqa: E731
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=total_gen,
                    avg_speed=total_gen / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={"num_requests": len(batch), "atp_n_bar": mean("n_bar"),
                                        "atp_tflops": mean("flops") / 1e12,
                                        "atp_flops_reduction": mean("flops_reduction"),
                                        "atp_kv_cache_reduction": mean("kv_cache_reduction")})

    def efficiency_summary(self, records: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """Means over the requests recorded so far (or over ``records``): N_bar, FLOPs, KV bytes,
        their reductions, and vision tokens per decoder layer."""
        records = self.atp_reports if records is None else records
        if not records:
            return {"requests": 0}
        n = len(records)
        out: Dict[str, Any] = {"requests": n}
        for k in ("n_bar", "flops", "flops_full", "flops_reduction", "kv_cache_bytes", "kv_cache_bytes_full",
                  "kv_cache_reduction", "generated_tokens"):
            out[k] = sum(float(r[k]) for r in records) / n
        layers = len(records[0]["vision_tokens"])
        out["vision_tokens"] = [sum(r["vision_tokens"][i] for r in records) / n for i in range(layers)]
        return out

    def _log_summary(self, kind: str, records: List[Dict[str, Any]]) -> None:
        s = self.efficiency_summary(records)
        if s["requests"]:
            eval_logger.info(f"atp_llava {kind}: {s['requests']} requests, mean N_bar {s['n_bar']:.1f}, FLOPs "
                             f"-{s['flops_reduction']:.1%}, KV cache -{s['kv_cache_reduction']:.1%}, vision tokens "
                             f"per layer [{' '.join(f'{x:.0f}' for x in s['vision_tokens'])}]")
