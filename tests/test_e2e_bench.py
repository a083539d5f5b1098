"""bench/e2e_bench.py's timing: the variants run interleaved rep by rep, and a ratio of two
variants' times is the median of the ratios within each rep (the full run is recorded in
bench/results)."""
from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import e2e_bench  # noqa: E402


def test_paired_ratio_is_the_median_of_the_ratios_within_each_rep():
    # A slow spell (rep 1) slows both variants: the ratio of the medians (10 / 3) is off, the
    # median of the per-rep ratios is not.
    r = e2e_bench.paired_ratio([1.0, 20.0, 10.0, 1.1], [1.0, 20.0, 3.0, 1.0])
    assert r["all"] == pytest.approx([1.0, 1.0, 10.0 / 3.0, 1.1])
    assert r["median"] == pytest.approx(1.05)
    assert r["iqr"] == pytest.approx([1.0, 1.1 + 0.25 * (10.0 / 3.0 - 1.1)])
    assert e2e_bench.paired_ratio([3.0], [2.0]) == {"median": 1.5, "iqr": [1.5, 1.5], "all": [1.5]}
    with pytest.raises(ValueError):
        e2e_bench.paired_ratio([1.0, 2.0], [1.0])


def test_interleaved_rotates_the_order_and_keeps_reps_of_one_round_together():
    calls = []

    def arm(name):
        def run():
            calls.append(name)
            return {"round": float(len(calls) - 1) // 3, "n": float(len(calls))}
        return run

    times = e2e_bench.interleaved({"a": arm("a"), "b": arm("b"), "c": arm("c")}, reps=3, warmup=2)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    for name in "abc":
        assert times[name]["round"] == [2.0, 3.0, 4.0]  # the warm-up rounds 0 and 1 are dropped
    assert times["b"]["n"] == [9.0, 11.0, 13.0]


def test_bench_rows_carry_the_paired_ratios(tmp_path):
    out = tmp_path / "e2e.json"
    threads = torch.get_num_threads()
    try:
        rows = e2e_bench.main(["--preset", "tiny", "--num-layers", "3", "--batch", "1", "--reps", "3",
                               "--warmup", "1", "--new-tokens", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"unpruned", "atp", "fastv"} and out.exists()
    for r in rows:
        assert len(r["prefill_ms_all"]) == len(r["decode_ms_all"]) == 3
        assert r["prefill_ms"] == statistics.median(r["prefill_ms_all"])
    assert by["fastv"]["prefill_vs_fastv"] == 1.0 and by["unpruned"]["prefill_vs_unpruned"] == 1.0
    ratios = [a / f for a, f in zip(by["atp"]["prefill_ms_all"], by["fastv"]["prefill_ms_all"])]
    assert by["atp"]["prefill_vs_fastv_all"] == ratios
    assert by["atp"]["prefill_vs_fastv"] == statistics.median(ratios)
    lo, hi = by["atp"]["prefill_vs_fastv_iqr"]
    assert lo <= by["atp"]["prefill_vs_fastv"] <= hi
    dec = [u / a for u, a in zip(by["unpruned"]["decode_ms_all"], by["atp"]["decode_ms_all"])]
    assert by["atp"]["decode_vs_unpruned"] == statistics.median(dec)
