"""The lmms-eval plugin (atp_llava.lmms_eval_model, lmms-eval --model atp_llava): its entry point,
loglikelihood against a hand computation from the unpruned model's logits, batching, stop
strings, and whole lmms-eval runs on a local task (Python API and CLI), on a tiny random LLaVA
saved with a word-level tokenizer (no download).

Skips cleanly without lmms-eval (pip install .[lmms]).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from atp_llava import ATPConfig, apply_atp, save_atp  # noqa: E402
from atp_llava.lmms_eval_model import CLASS_PATH, ENTRY_POINT, MODEL_ID, ATPLlava, lmms_eval_manifest  # noqa: E402
from atp_llava.tools.data import CLIP_MEAN, CLIP_STD, _preprocess, load_image  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_GRID = 576
KEEP_ALL = "[-5,-5]"  # theta below every score: every token kept with bias exactly 0
THETA = (0.5, 0.5)  # prunes the random images below at every ATP layer
WORDS = ["USER", "ASSISTANT", ":", "what", "is", "this", "the", "colour", "of", "cat", "dog", "red", "blue", "."]


def make_tokenizer():
    """A word-level tokenizer over TINY_VOCAB ids: specials 0-3 (pad, bos, eos, unk as tiny_llava's
    config has them), WORDS, filler words up to 126, "<image>" at TINY_IMAGE_TOKEN."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + WORDS
    vocab += [f"w{i}" for i in range(len(vocab), TINY_IMAGE_TOKEN)] + ["<image>"]
    assert len(vocab) == TINY_VOCAB and vocab.index("<image>") == TINY_IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def image(seed: int, h: int = 40, w: int = 56):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Model directories (with and without a saved image processor), the ATP weights file."""
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("lmms")
    model = tiny_llava(4)
    tok = make_tokenizer()
    plain, with_proc = root / "tiny", root / "tiny_proc"
    for d in (plain, with_proc):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(with_proc)
    atp_file = root / "atp.safetensors"
    save_atp(apply_atp(copy.deepcopy(model), ATPConfig(layers=(1, 2, 3), theta_override=THETA)), atp_file)
    return {"root": root, "plain": str(plain), "proc": str(with_proc), "atp": str(atp_file), "tokenizer": tok}


def requests_for(lm, docs, kind, task="unit", split="test", gen_kwargs=None):
    """Instances as lmms-eval's ConfigurableTask builds them for docs {image(s), question, answer}."""
    lm.task_dict[task] = {split: docs}
    visual = lambda doc: list(doc["images"])  # noqa: E731
    out = []
    for i, doc in enumerate(docs):
        if kind == "loglikelihood":
            args = (doc["question"], lambda d: d["answer"], visual, i, task, split)
        else:
            args = (doc["question"], dict(gen_kwargs or {}), visual, i, task, split)
        out.append(Instance(request_type=kind, arguments=args, idx=0,
                            metadata={"task": task, "doc_id": i, "repeats": 1}))
    return out


DOCS = [
    {"images": [image(0)], "question": "what is this", "answer": "cat"},
    {"images": [image(1, 64, 48)], "question": "what is the colour of this cat", "answer": "red dog ."},
    {"images": [image(2), image(3, 30, 30)], "question": "what is this <image> and this", "answer": "blue"},
    {"images": [], "question": "what is the colour of the dog", "answer": "blue ."},  # text only
]


# ----------------------------------------------------------------------------------------------
# registration


def test_entry_point_declared_and_resolves():
    """setup.py declares the lmms_eval.models entry point; its manifest resolves to ATPLlava
    through lmms-eval's own registry (the path `--model atp_llava` takes)."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    name, value = (s.strip() for s in ENTRY_POINT.split("="))
    setup_py = (ROOT / "setup.py").read_text()
    assert '"lmms_eval.models"' in setup_py and f'"{name} = {value}"' in setup_py
    assert '"lmms": ["lmms-eval' in setup_py
    manifest = lmms_eval_manifest()
    assert manifest.model_id == MODEL_ID and manifest.simple_class_path == CLASS_PATH
    registry = ModelRegistryV2()
    registry.register_manifest(manifest)
    assert registry.get_model_class(MODEL_ID) is ATPLlava


def test_model_args_errors(saved):
    with pytest.raises(ValueError, match="needs --atp FILE"):
        ATPLlava(pretrained=saved["plain"], layers="[1,2,3]")
    with pytest.raises(ValueError, match="untrained ATP modules"):
        ATPLlava(pretrained=saved["plain"], atp=saved["atp"], theta="[0.5,0.5]")
    with pytest.raises(ValueError, match="theta must be two numbers"):
        ATPLlava(pretrained=saved["plain"], layers="1:2:3", theta=0.5)
    with pytest.raises(TypeError, match="unknown arguments"):
        ATPLlava(pretrained=saved["plain"], atp=saved["atp"], thetta="[0.5,0.5]")
    with pytest.raises(ValueError, match="local directory"):
        ATPLlava(pretrained=str(saved["root"] / "missing"), atp=saved["atp"])
    lm = ATPLlava(pretrained=saved["plain"], atp=saved["atp"])
    with pytest.raises(NotImplementedError, match="multi_round"):
        lm.generate_until_multi_round([])


# ----------------------------------------------------------------------------------------------
# loglikelihood


def test_loglikelihood_matches_unpruned_logits(saved):
    """ATP keeping every token: loglikelihood == the sum of log-softmax of the continuation
    tokens computed by hand from the stock (unpatched) model's logits, prompt laid out by hand."""
    from transformers import LlavaForConditionalGeneration

    lm = ATPLlava(pretrained=saved["plain"], layers="[1,2,3]", theta=KEEP_ALL, dtype="float64", batch_size=2)
    got = lm.loglikelihood(requests_for(lm, DOCS, "loglikelihood"))
    stock = LlavaForConditionalGeneration.from_pretrained(saved["plain"], dtype=torch.float64).eval()
    tok = saved["tokenizer"]
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    img = [TINY_IMAGE_TOKEN] * N_GRID
    prompts = [  # LLAVA_TEMPLATE "USER: {image}\n{prompt} ASSISTANT:"; images fill the image slots in order
        [1] + enc("USER:") + img + enc("what is this ASSISTANT:"),
        [1] + enc("USER:") + img + enc("what is the colour of this cat ASSISTANT:"),
        [1] + enc("USER:") + img + enc("what is this") + img + enc("and this ASSISTANT:"),
        [1] + enc("USER: what is the colour of the dog ASSISTANT:"),
    ]
    expected_loss = []
    for doc, prompt, (logprob, greedy) in zip(DOCS, prompts, got):
        cont = enc(doc["answer"])
        ids = torch.tensor([prompt + cont])
        pixels = [_preprocess(load_image(im), 48, CLIP_MEAN, CLIP_STD) for im in doc["images"]]
        with torch.no_grad():
            logits = stock(input_ids=ids, pixel_values=torch.stack(pixels).double() if pixels else None).logits[0]
        rows = logits[len(prompt) - 1:len(prompt) - 1 + len(cont)].log_softmax(-1)
        expected = rows[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
        assert logprob == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
        assert logprob < 0
        expected_loss.append(-expected / len(cont))
    lm.loglikelihood_output = "loss"  # model_args loglikelihood=loss: lmms-eval's multiple_choice convention
    losses = [ll for ll, _ in lm.loglikelihood(requests_for(lm, DOCS, "loglikelihood"))]
    assert losses == pytest.approx(expected_loss, rel=1e-9, abs=1e-9)
    assert len(lm.atp_reports) == 2 * len(DOCS)
    for rec in lm.atp_reports:
        assert rec["request_type"] == "loglikelihood" and rec["flops_reduction"] == pytest.approx(0.0, abs=1e-12)
        assert rec["vision_tokens"] == [N_GRID if DOCS[rec["doc_id"]]["images"] else 0] * 4


def test_batched_equals_unbatched_with_pruning(saved):
    """Pruning with the saved thresholds: batch 3 (ragged, left padded for generation, right
    padded for loglikelihood) gives what batch 1 gives, and the per-request reports agree."""
    one = ATPLlava(pretrained=saved["proc"], atp=saved["atp"], dtype="float64", batch_size=1)
    three = ATPLlava(pretrained=saved["proc"], atp=saved["atp"], dtype="float64", batch_size=3)
    gen = {"max_new_tokens": 5, "until": ["</s>"]}
    run = lambda lm, kind: getattr(lm, kind)(requests_for(lm, DOCS, kind, gen_kwargs=gen))  # noqa: E731
    for (la, ga), (lb, gb) in zip(run(one, "loglikelihood"), run(three, "loglikelihood")):
        assert la == pytest.approx(lb, rel=1e-9, abs=1e-9) and ga == gb
    a, b = run(one, "generate_until"), run(three, "generate_until")
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.token_counts.output_tokens for r in a] == [r.token_counts.output_tokens for r in b]
    by_key = lambda lm: {(r["request_type"], r["doc_id"]): r for r in lm.atp_reports}  # noqa: E731
    ra, rb = by_key(one), by_key(three)
    assert ra.keys() == rb.keys() and len(ra) == 2 * len(DOCS)
    for k in ra:
        assert ra[k]["vision_tokens"] == rb[k]["vision_tokens"]
        assert ra[k]["flops"] == pytest.approx(rb[k]["flops"])
        assert ra[k]["batch_size"] == 1
        if not DOCS[k[1]]["images"]:
            assert ra[k]["vision_tokens"] == [0] * 4
            continue
        assert max(ra[k]["vision_tokens"][1:]) < N_GRID  # the ATP layers 1, 2, 3 pruned
        assert ra[k]["vision_tokens"][0] == N_GRID
        assert 0 < ra[k]["flops_reduction"] < 1 and 0 < ra[k]["kv_cache_reduction"] < 1
    assert sorted(r["batch_size"] for r in three.atp_reports) == [1, 1] + [3] * 6  # 4 requests: 3 + 1, twice
    summary = one.efficiency_summary()
    assert summary["requests"] == 2 * len(DOCS) and 0 < summary["n_bar"] < N_GRID


def test_generate_until_stops_at_until(saved):
    """A stop string cuts the text before it and stops that sample's generation early."""
    lm = ATPLlava(pretrained=saved["plain"], atp=saved["atp"], batch_size=2)
    free = lm.generate_until(requests_for(lm, DOCS[:1], "generate_until", gen_kwargs={"max_new_tokens": 6}))[0]
    words = free.text.split()
    assert free.token_counts.output_tokens == 6 and len(words) == 6  # the random model never says </s> here
    stop = words[2]
    # the first prefix of the free text that holds the stop string (a word may contain it: w1 in w12)
    k = next(k for k in range(1, 7) if stop in " ".join(words[:k]))
    cut = lm.generate_until(requests_for(lm, DOCS[:1], "generate_until",
                                         gen_kwargs={"max_new_tokens": 6, "until": [stop]}))[0]
    assert cut.text == " ".join(words[:k]).split(stop, 1)[0]
    assert cut.token_counts.output_tokens == k and k <= 3
    assert lm.atp_reports[-1]["generated_tokens"] == k


# ----------------------------------------------------------------------------------------------
# whole runs on a local task


def write_task(root: Path) -> Path:
    """A local lmms-eval task folder: two YAML tasks (generate_until; multiple_choice, which sends
    loglikelihood requests) over one parquet file of {image, question, answer} docs (PIL images,
    datasets' Image feature). (lmms-eval 0.7.3's plain output_type loglikelihood cannot be scored
    without a process_results of the task's own: its default one unpacks a list of one result.)"""
    import datasets
    from PIL import Image

    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    docs = [{"image": Image.fromarray(image(10 + i, 48 + 8 * i, 64)), "question": q, "answer": a}
            for i, (q, a) in enumerate([("what is this", "cat"), ("what is the colour of this", "red"),
                                        ("what is this dog", "blue")])]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    data = tasks / "docs.parquet"
    datasets.Dataset.from_list(docs, features=features).to_parquet(str(data))
    common = (f"dataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_visual: image\ndoc_to_text: question\ndoc_to_target: answer\n")
    (tasks / "atp_tiny_vqa.yaml").write_text(
        "task: atp_tiny_vqa\noutput_type: generate_until\n" + common
        + "generation_kwargs:\n  until: [\".\"]\n  max_new_tokens: 4\n"
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "atp_tiny_mc.yaml").write_text(  # scored from loglikelihood requests, one per choice
        "task: atp_tiny_mc\noutput_type: multiple_choice\n" + common + "doc_to_choice: [cat, red, blue]\n"
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


@pytest.fixture()
def plugin_path(tmp_path, monkeypatch):
    """The entry point as `pip install .[lmms]` installs it, for a checkout whose installed
    metadata predates it: a dist-info holding setup.py's entry point, put on sys.path."""
    dist = tmp_path / "plugin" / "atp_llava_lmms_plugin-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: atp-llava-lmms-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    monkeypatch.syspath_prepend(str(dist.parent))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dist.parent


def test_simple_evaluate_local_task(saved, tmp_path, plugin_path):
    """lmms_eval.evaluator.simple_evaluate(model="atp_llava", ...) on the local tasks: results for
    both, per-request efficiency reports (pruned at the ATP layers) in report_path and in the
    results' throughput metrics; the choice is scored from the loss (loglikelihood=loss)."""
    from lmms_eval import evaluator
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)  # as at lmms_eval.models' import
    tasks = write_task(tmp_path)
    reports = tmp_path / "reports.jsonl"
    results = evaluator.simple_evaluate(
        model="atp_llava",
        model_args=f"pretrained={saved['proc']},atp={saved['atp']},report_path={reports},loglikelihood=loss",
        tasks=["atp_tiny_vqa", "atp_tiny_mc"], batch_size=2, device="cpu",
        task_manager=TaskManager("INFO", include_path=str(tasks), include_defaults=False))
    assert set(results["results"]) == {"atp_tiny_vqa", "atp_tiny_mc"}
    assert 0 <= results["results"]["atp_tiny_vqa"]["exact_match,none"] <= 1
    assert 0 <= results["results"]["atp_tiny_mc"]["acc,none"] <= 1
    recs = [json.loads(line) for line in reports.read_text().splitlines()]
    assert sorted((r["request_type"], r["task"], r["doc_id"]) for r in recs) == sorted(
        [("generate_until", "atp_tiny_vqa", i) for i in range(3)]
        + [("loglikelihood", "atp_tiny_mc", i) for i in range(3) for _ in range(3)])
    for r in recs:
        assert r["atp_layers"] == [1, 2, 3] and r["vision_tokens"][0] == N_GRID
        assert max(r["vision_tokens"][1:]) < N_GRID and r["flops"] < r["flops_full"]
        assert r["kv_cache_bytes"] < r["kv_cache_bytes_full"]
    assert all(0 < r["generated_tokens"] <= 4 for r in recs if r["request_type"] == "generate_until")
    assert results["throughput"]["avg_atp_n_bar"] < N_GRID
    samples = results["samples"]["atp_tiny_vqa"]
    assert all(s["token_counts"] and s["token_counts"][0]["output_tokens"] > 0 for s in samples)


def test_cli_local_task(saved, tmp_path, plugin_path):
    """`lmms-eval --model atp_llava --model_args pretrained=DIR,atp=FILE ...` in a subprocess."""
    tasks = write_task(tmp_path)
    out, reports = tmp_path / "out", tmp_path / "cli_reports.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "atp_llava",
           "--model_args", f"pretrained={saved['proc']},atp={saved['atp']},report_path={reports}",
           "--tasks", "atp_tiny_vqa", "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    files = glob.glob(str(out / "**" / "*results*.json"), recursive=True)
    assert files, log
    results = json.loads(Path(files[0]).read_text())
    assert "atp_tiny_vqa" in results["results"], log
    recs = [json.loads(line) for line in reports.read_text().splitlines()]
    assert len(recs) == 3 and all(max(r["vision_tokens"][1:]) < N_GRID for r in recs)
    assert "atp_llava generate_until atp_tiny_vqa doc" in proc.stdout + proc.stderr  # the per-request log line
