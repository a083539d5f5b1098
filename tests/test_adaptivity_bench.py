"""bench/adaptivity.py's pieces: the tasks' need and relevant tokens, the rank correlation, and the
evaluation's branch accounting on a tiny run (the full experiment is recorded in bench/results)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import adaptivity  # noqa: E402


def test_count_task_need_is_the_number_of_asked_objects():
    data = adaptivity.CountTask(64, 0, 127)
    needs = set()
    for i in range(64):
        ex = data[i]
        needs.add(ex["need"])
        assert int(ex["relevant"].sum()) == 4 * ex["need"]  # 2 x 2 tokens per object, apart
        assert ex["labels"][-2] == 20 + ex["need"]
    assert needs == set(range(1, 7))
    assert torch.equal(data[5]["pixel_values"], data[5]["pixel_values"])  # deterministic
    colour = adaptivity.ColourTask(4, 0, 127)
    assert [colour[i]["need"] for i in range(4)] == [0, 1, 0, 1]
    assert int(colour[1]["relevant"].sum()) == 4 and bool(colour[0]["relevant"].all())


def test_spearman_is_the_rank_correlation_with_average_ranks_for_ties():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert adaptivity.spearman(x, x ** 3) == pytest.approx(1.0)
    assert adaptivity.spearman(x, -x) == pytest.approx(-1.0)
    # ties: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    r = adaptivity.spearman(torch.tensor([1.0, 1.0, 2.0, 3.0]), x)
    rx = torch.tensor([0.5, 0.5, 2.0, 3.0]) - 1.5
    ry = torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5
    assert r == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())))
    assert adaptivity.spearman(torch.ones(4), x) is None


def test_quick_run_reports_every_arm_and_target():
    report = adaptivity.main(["--quick", "--no-json", "--no-progress"])
    assert set(report["summary"]) == {"unpruned", "adaptive", "fixed", "random", "fastv"}
    layer = report["arms"][1]["eval"]["layers"]["2"]
    kept = layer["redundancy_only"] + layer["spatial_only"] + layer["both"]
    assert kept == pytest.approx(layer["tokens"]["mean"])  # every kept token is counted by one branch
    recall = report["arms"][0]["score_recall"]  # per possible first ATP layer of the 4-layer LM
    assert set(recall) == {"1", "2", "3"} and recall["1"]["random"] == pytest.approx(24 / 144)
    assert all(0.0 <= r[k] <= 1.0 for r in recall.values() for k in ("s_red", "fastv"))
    assert set(report["targets"]["all_seeds"]) == {"n_bar_within_5pct", "no_saturated_threshold",
                                                   "tokens_rise_with_need", "adaptive_geq_baselines"}


def test_an_arm_does_not_depend_on_the_arms_run_before_it():
    small = ["--seeds", "0", "--warmup-steps", "4", "--arm-steps", "3", "--eval-size", "16", "--batch-size", "4",
             "--no-json", "--no-progress", "--ablations"]
    alone = adaptivity.main(small + ["penalty"])
    after = adaptivity.main(small + ["temperature_5", "penalty"])

    def penalty(report):
        arm = next(a for a in report["arms"] if a["arm"] == "penalty")
        return arm["curve"], arm["eval"]

    assert penalty(alone) == penalty(after)
