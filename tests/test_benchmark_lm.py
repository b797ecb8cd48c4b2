"""The Llama-shaped language-model benchmark (benchmarks/lm): domain readers, scoring, build, and a
CI smoke of the whole benchmark (2 domains, a tiny model, a few steps, the real flow and evaluator).

Needs WordNet and fortunes (Debian packages wordnet-base, fortunes; skipped, naming them, when absent).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from benchmarks.lm import data as data_mod
from benchmarks.retention.data import FORTUNES_DIR, WORDNET_DIR

SMOKE_DOMAINS = ("wordnet", "fortunes")
needs_data = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").exists() or not FORTUNES_DIR.exists(),
                                reason="Debian data absent: apt-get install -y wordnet-base fortunes")


@needs_data
@pytest.mark.parametrize("domain", SMOKE_DOMAINS)
def test_domain_split_is_deterministic_disjoint_and_seeded(domain):
    kwargs = {"max_train_chars": 50_000, "max_eval_chars": 10_000}
    first = data_mod.split_documents(domain, data_mod.READERS[domain](), seed=0, **kwargs)
    again = data_mod.split_documents(domain, list(reversed(data_mod.READERS[domain]())), seed=0, **kwargs)
    assert first == again and first.fingerprint == again.fingerprint  # reading order does not matter
    splits = [set(first.split(s)) for s in data_mod.SPLITS]
    assert all(splits) and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert sum(map(len, first.train)) <= 50_000 + data_mod.MAX_DOC_CHARS
    other = data_mod.split_documents(domain, data_mod.READERS[domain](), seed=1, **kwargs)
    assert set(other.test) != splits[2] and other.fingerprint != first.fingerprint


def test_split_bucket_rule_holds_per_document():
    docs = [f"document number {i} with some text" for i in range(3000)]
    d = data_mod.split_documents("synthetic", docs, seed=7, max_train_chars=10**9, max_eval_chars=10**9)
    for split, (lo, hi) in {"test": (0, 100), "val": (100, 150), "train": (150, 1000)}.items():
        assert all(lo <= data_mod._bucket(7, doc) < hi for doc in d.split(split))
    assert len(d.train) + len(d.val) + len(d.test) == len(docs)
    assert 0.05 < len(d.test) / len(docs) < 0.15  # about 10 %


def test_strip_roff_keeps_text_and_drops_macros():
    page = ('.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.TP\n'
            '\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore entries\n.B bold words\n.br\n')
    text = data_mod.strip_roff(page)
    assert text.splitlines() == ["NAME", "ls - list directory contents", "-a, --all", "do not ignore entries",
                                 "bold words"]


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="unknown domain"):
        data_mod.load_domain("klingon")


def _tiny_model(vocab: int = 50, seed: int = 0):
    from transformers import LlamaForCausalLM

    from benchmarks.lm.model import ModelShape, llama_config

    shape = ModelShape(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=vocab, max_positions=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(shape, vocab, 0)).eval()


def test_score_blocks_equals_an_independent_cross_entropy():
    pytest.importorskip("transformers")
    from benchmarks.lm.model import score_blocks

    model = _tiny_model()
    blocks = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(3))
    got = score_blocks(model, blocks, batch_size=2)  # batching must not matter
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for row in blocks:
            logits = model(input_ids=row[None]).logits[0].double()
            for t in range(len(row) - 1):  # position t predicts token t + 1
                z = logits[t]
                nll += float(torch.logsumexp(z, 0) - z[row[t + 1]])
                hits += int(int(z.argmax()) == int(row[t + 1]))
                n += 1
    assert got["tokens"] == n == 5 * 11
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["accuracy"] == pytest.approx(hits / n)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_normalize_formulas():
    from benchmarks.lm.evaluate import normalize

    base, expert, merged = {"loss": 4.0, "accuracy": 0.2}, {"loss": 3.0, "accuracy": 0.4}, {"loss": 3.25,
                                                                                               "accuracy": 0.3}
    r = normalize(merged, base, expert)
    assert r["loss_gap_closed"] == pytest.approx((4.0 - 3.25) / (4.0 - 3.0))
    assert r["normalized_accuracy"] == pytest.approx(0.3 / 0.4)
    assert normalize(base, base, expert)["loss_gap_closed"] == 0.0
    assert normalize(expert, base, expert)["loss_gap_closed"] == 1.0


# ------------------------------------------------------------------------------------ tiny build
TINY_ARGS = ["--domains", *SMOKE_DOMAINS, "--seeds", "0", "--lora-seeds", "0", "--layers", "1", "--hidden", "64",
             "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "384", "--seq-len", "32",
             "--batch", "4", "--pretrain-steps", "30", "--expert-steps", "12", "--lora-steps", "12", "--lora-rank", "4",
             "--max-train-chars", "40000", "--max-eval-chars", "6000", "--tokenizer-chars", "20000",
             "--eval-blocks", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    if not (WORDNET_DIR / "data.noun").exists() or not FORTUNES_DIR.exists():
        pytest.skip("Debian data absent: apt-get install -y wordnet-base fortunes")
    pytest.importorskip("peft")
    from benchmarks.lm import build

    out = tmp_path_factory.mktemp("lm") / "build"
    assert build.main(["--out", str(out), *TINY_ARGS]) == 0
    return out


def test_build_writes_checkpoints_adapters_and_references(tiny_build):
    from safetensors import safe_open

    m = json.loads((tiny_build / "manifest.json").read_text())
    assert {"data", "tokenizer", "base", "reference:base", "expert:0:wordnet", "expert:0:fortunes",
            "lora:0:wordnet", "lora:0:fortunes"} <= set(m["steps"])
    base = tiny_build / "base"
    assert (base / "tokenizer.json").exists() and json.loads((base / "config.json").read_text())[
        "num_key_value_heads"] == 2
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # untied
    for d in SMOKE_DOMAINS:
        adapter = tiny_build / "lora" / "seed0" / d
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"}
        assert (adapter / "adapter_model.safetensors").exists()
        # each expert beats the base on its own domain (it learned something)
        ref = m["reference"]["test"]
        assert ref["expert"]["0"][d]["loss"] < ref["base"][d]["loss"]


def test_build_rerun_skips_and_refuses_other_settings(tiny_build):
    from benchmarks.lm import build

    before = (tiny_build / "manifest.json").read_text()
    assert build.main(["--out", str(tiny_build), *TINY_ARGS]) == 0
    assert json.loads((tiny_build / "manifest.json").read_text())["steps"] == json.loads(before)["steps"]
    with pytest.raises(SystemExit, match="other settings"):
        build.main(["--out", str(tiny_build), *TINY_ARGS, "--expert-steps", "13"])


def test_reuse_base_keeps_the_base_and_retrains_the_experts(tiny_build, tmp_path):
    from benchmarks.lm import build

    out = tmp_path / "other-lr"
    args = [a if a != "12" else "6" for a in TINY_ARGS]  # fewer expert / LoRA steps
    assert build.main(["--out", str(out), "--reuse-base", str(tiny_build), *args, "--lora-seeds"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert all(m["steps"][s]["reused"] for s in build.BASE_STEPS) and m["settings"]["expert_steps"] == 6
    assert (out / "base" / "model.safetensors").read_bytes() == (tiny_build / "base" / "model.safetensors").read_bytes()
    assert (out / "experts" / "seed0" / "wordnet" / "model.safetensors").read_bytes() != (
        tiny_build / "experts" / "seed0" / "wordnet" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="differ"):
        build.main(["--out", str(tmp_path / "x"), "--reuse-base", str(tiny_build), *TINY_ARGS, "--hidden", "32"])


def test_evaluator_matches_the_build_references(tiny_build):
    from benchmarks.lm.evaluate import evaluate

    m = json.loads((tiny_build / "manifest.json").read_text())
    r = evaluate(str(tiny_build / "experts" / "seed0" / "wordnet"), build=str(tiny_build), split="test")
    assert set(r) == set(SMOKE_DOMAINS)
    assert r["wordnet"]["loss"] == pytest.approx(m["reference"]["test"]["expert"]["0"]["wordnet"]["loss"], rel=1e-5)
    assert r["wordnet"]["loss_gap_closed"] == pytest.approx(1.0, abs=1e-5)
    base = evaluate(str(tiny_build / "base"), build=str(tiny_build), split="val")
    assert all(v["loss_gap_closed"] == pytest.approx(0.0, abs=1e-5) for v in base.values())
    with pytest.raises(TypeError, match="unknown evaluator options"):
        evaluate(str(tiny_build / "base"), build=str(tiny_build), heads_dir="x")
    mixed = evaluate(str(tiny_build / "experts" / "seed0" / "wordnet"), build=str(tiny_build), split="test",
                     aggregate=True)
    assert set(mixed) == {*SMOKE_DOMAINS, "all"}
    for metric in ("loss", "loss_gap_closed", "accuracy"):
        by_hand = sum(mixed[d][metric] for d in SMOKE_DOMAINS) / len(SMOKE_DOMAINS)
        assert mixed["all"][metric] == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.slow
def test_benchmark_smoke_through_the_flow(tiny_build, prefect_api, tmp_path):
    """The real merge flow on the tiny experts and adapters with the benchmark's evaluator: the
    shared results format, every domain scored, merge time recorded, one study row."""
    from benchmarks.lm import run_benchmark

    out = tmp_path / "bench"
    methods = dict(run_benchmark.STUDY)
    run_benchmark.STUDY.clear()
    run_benchmark.STUDY["study:scale=1.25"] = methods["study:scale=1.25"]
    lora = dict(run_benchmark.LORA_METHODS)
    run_benchmark.LORA_METHODS.clear()
    run_benchmark.LORA_METHODS["lora:swudi_a"] = lora["lora:swudi_a"]
    try:
        assert run_benchmark.main(["--build", str(tiny_build), "--out", str(out), "--methods", "mean",
                                   "swudi_a:participation_sqrt"]) == 0
    finally:
        run_benchmark.STUDY.clear()
        run_benchmark.STUDY.update(methods)
        run_benchmark.LORA_METHODS.clear()
        run_benchmark.LORA_METHODS.update(lora)
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "swudi-benchmark/1" and results["benchmark"] == "lm"
    assert results["tasks"] == list(SMOKE_DOMAINS) and results["primary"] in results["metrics"]
    by_label = {r["label"]: r for r in results["runs"]}
    assert {"pretrained", "experts", "lora_experts", "mean", "swudi_a:participation_sqrt", "study:scale=1.25",
            "lora:swudi_a"} == set(by_label)
    assert by_label["experts"]["summary"]["loss_gap_closed"] == pytest.approx(1.0)
    assert by_label["pretrained"]["summary"]["loss_gap_closed"] == pytest.approx(0.0)
    swudi = by_label["swudi_a:participation_sqrt"]
    assert swudi["kind"] == "method" and swudi["merge_seconds"] > 0 and set(swudi["per_task"]) == set(SMOKE_DOMAINS)
    assert by_label["study:scale=1.25"]["config"]["scale"] == 1.25
    # the flow's evaluator scored the published version: re-score it independently
    from benchmarks.lm.evaluate import domain_blocks
    from benchmarks.lm.model import load_causal_lm, score_blocks

    version = next((out / "seed0" / "merged" / "swudi_a-participation_sqrt" / "versions").iterdir())
    model = load_causal_lm(version)
    for d, blocks in domain_blocks(tiny_build, "test").items():
        assert swudi["per_task"][d]["loss"] == pytest.approx(score_blocks(model, blocks)["loss"], rel=1e-5)
    shutil.rmtree(out)
