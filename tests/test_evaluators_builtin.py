"""The built-in evaluators on real tiny transformers models, against an independent computation.

A word-level tokenizer is trained offline on a few sentences (``tokenizers``), a 1-layer
``LlamaForCausalLM`` (hidden 32) and a 1-layer ``BertForSequenceClassification`` are built from
configs and saved with ``save_pretrained`` once per module. The expected loss is computed here in
float64 from the model's logits over shifted targets, the expected accuracy from per-example argmax.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from swudi.config.merge_config import EvaluatorConfig, config_from_mapping
from swudi.errors import ConfigError, InputError
from swudi.evaluators import causal_lm_loss, check_evaluators, sequence_classification
from swudi.evaluators.models import transformers_module
from swudi.evaluators.relative import (
    cached_evaluation,
    check_relative_inputs,
    relative_evaluations,
    relative_metrics,
)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song in the tree",
    "my cat likes the warm mat",
    "a small dog sat in the sun",
    "the tree was tall and green",
]
EOS = "<eos>"
LABELS = {0: "neg", 1: "neu", 2: "pos"}


def _tokenizer(special: list[str], **named: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", *special]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=64, **named)


def _save_lm(folder: Path, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny causal LM (base) and two experts (the base plus seeded noise), each a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm")
    tokenizer = _tokenizer([EOS], eos_token=EOS, pad_token=EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folders = {"base": _save_lm(root / "base", model, tokenizer)}
    for i in range(2):
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        folders[f"expert{i}"] = _save_lm(root / f"expert{i}", model, tokenizer)
    (root / "wiki.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES)))
    (root / "notes.txt").write_text(" ".join(SENTENCES[::-1]))
    folders["root"] = str(root)
    return folders


def expected_lm_loss(folder: str, documents: list[str], block: int, max_tokens: int | None = None) -> tuple[float, int]:
    """Mean next-token NLL in float64: documents + EOS as one stream, non-overlapping blocks."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).double().eval()
    stream: list[int] = []
    for doc in documents:
        stream += [*tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
    stream = stream[:max_tokens] if max_tokens else stream
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), block):
            ids = stream[start : start + block]
            if len(ids) < 2:
                continue
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(len(ids) - 1):
                total -= float(logp[t, ids[t + 1]])
                count += 1
    return total / count, count


def test_causal_lm_loss_matches_float64_computation(lm: dict[str, str]) -> None:
    root = Path(lm["root"])
    files = [str(root / "wiki.jsonl"), str(root / "notes.txt")]
    result = causal_lm_loss(lm["base"], files=files, block_size=8, batch_size=3)
    assert set(result) == {"wiki", "notes"}
    for task, docs in (("wiki", SENTENCES), ("notes", [" ".join(SENTENCES[::-1])])):
        loss, count = expected_lm_loss(lm["base"], docs, block=8)
        assert result[task]["tokens"] == count
        assert result[task]["loss"] == pytest.approx(loss, rel=1e-5)
        assert result[task]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # max_tokens cuts the stream before blocking: 20 tokens -> blocks of 8, 8, 4 -> 17 predictions
    cut = causal_lm_loss(lm["base"], files=files[:1], block_size=8, max_tokens=20)
    loss, count = expected_lm_loss(lm["base"], SENTENCES, block=8, max_tokens=20)
    assert cut["wiki"]["tokens"] == count == 17
    assert cut["wiki"]["loss"] == pytest.approx(loss, rel=1e-5)
    # two runs are equal to the bit, whatever the batch size split
    assert causal_lm_loss(lm["base"], files=files, block_size=8, batch_size=3) == result


def test_causal_lm_loss_on_s3_files_and_model(lm: dict[str, str], s3_bucket) -> None:
    root = Path(lm["root"])
    s3_bucket.fs.put(str(root / "wiki.jsonl"), f"{s3_bucket.name}/eval/wiki.jsonl")
    s3_bucket.fs.put(lm["base"] + "/", f"{s3_bucket.name}/models/base/", recursive=True)
    local = causal_lm_loss(lm["base"], files=[str(root / "wiki.jsonl")], block_size=16)
    remote = causal_lm_loss(
        f"{s3_bucket.url}/models/base",
        files=[f"{s3_bucket.url}/eval/wiki.jsonl"],
        block_size=16,
        storage_options=s3_bucket.storage_options,
    )
    assert remote == local
    # through the runner: the config's storage options reach the evaluator (not written in its options)
    entry = EvaluatorConfig(
        function="swudi.evaluators:causal_lm_loss",
        options={"files": [f"{s3_bucket.url}/eval/wiki.jsonl"], "block_size": 16},
    )
    from swudi.evaluators.runner import run_evaluator

    check_evaluators([entry], s3_bucket.storage_options)
    assert run_evaluator(entry, lm["base"], s3_bucket.storage_options) == local
    with pytest.raises(InputError, match=rf"{s3_bucket.url}/eval/missing.jsonl does not exist"):
        causal_lm_loss(
            lm["base"], files=[f"{s3_bucket.url}/eval/missing.jsonl"], storage_options=s3_bucket.storage_options
        )


def test_bad_evaluation_files_are_named(lm: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n\n{"body": "no text field"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "ok"}\n{"text": \n')
    cases = [
        ([str(missing)], InputError, rf"{missing} does not exist"),
        ([str(bad)], InputError, rf"{bad} line 3: no field 'text'"),
        ([str(empty)], InputError, rf"{empty} is empty"),
        ([str(not_json)], InputError, rf"{not_json} line 2: not JSON"),
        ([str(bad), str(tmp_path / "x" / "bad.jsonl")], ConfigError, "same task name 'bad'"),
        ([], ConfigError, "non-empty list"),
    ]
    for files, error, message in cases:
        with pytest.raises(error, match=message):  # before the model is loaded: the check of check_evaluators
            check_evaluators([EvaluatorConfig(function="swudi.evaluators:causal_lm_loss", options={"files": files})])
        with pytest.raises(error, match=message):
            causal_lm_loss(lm["base"], files=files)
    with pytest.raises(ConfigError, match=r"unknown option 'max_token'; known: .*max_tokens"):
        check_evaluators(
            [EvaluatorConfig(function="swudi.evaluators:causal_lm_loss", options={"files": [str(bad)], "max_token": 5})]
        )
    with pytest.raises(ConfigError, match=r"block_size 128 exceeds .*max_position_embeddings 64"):
        causal_lm_loss(lm["base"], files=[str(Path(lm["root"]) / "wiki.jsonl")], block_size=128)
    with pytest.raises(InputError, match=r"no config\.json"):
        causal_lm_loss(str(tmp_path), files=[str(Path(lm["root"]) / "wiki.jsonl")])


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what Python does when it is not installed
    with pytest.raises(ConfigError, match=r"swudi\[bench\]"):
        transformers_module()


# ------------------------------------------------------------------------------ classification
@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = _tokenizer(["[PAD]", "[CLS]", "[SEP]"], pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(  # type: ignore[call-arg]  # num_labels: a PretrainedConfig keyword, not in BertConfig's stub
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _predictions(folder: str, texts: list[str]) -> list[int]:
    """Each example alone (no padding), float64, argmax."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(folder)
    model = BertForSequenceClassification.from_pretrained(folder).double().eval()
    with torch.no_grad():
        return [int(model(**tok(text, return_tensors="pt")).logits[0].argmax()) for text in texts]


def test_sequence_classification_accuracy(classifier: str, tmp_path: Path) -> None:
    texts = [*SENTENCES, "the dog", "a warm green park in the sun and the song of a bird"]
    predicted = _predictions(classifier, texts)
    # labels: right on the first 5 (as indices or as names, alternately), wrong on the other 3
    labels: list[int | str] = [p if i % 2 else LABELS[p] for i, p in enumerate(predicted[:5])]
    labels += [(p + 1) % 3 for p in predicted[5:]]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in zip(texts, labels, strict=True)))
    options: dict[str, Any] = {"files": [str(path)], "text_column": "sentence", "label_column": "y", "batch_size": 3}
    result = sequence_classification(classifier, **options)
    assert result == {"sentiment": {"accuracy": 5 / 8, "examples": 8.0}}
    assert sequence_classification(classifier, **{**options, "batch_size": 8}) == result

    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({"sentence": "the cat", "y": "angry"}) + "\n")
    with pytest.raises(InputError, match=rf"{bad} line 1: label 'angry' is not a class of the model"):
        sequence_classification(classifier, **{**options, "files": [str(bad)]})
    bad.write_text(json.dumps({"sentence": "the cat", "y": 1}) + "\n" + json.dumps({"sentence": "a", "y": 3}) + "\n")
    with pytest.raises(InputError, match=rf"{bad} line 2: label 3 is outside the model's 3 classes"):
        sequence_classification(classifier, **{**options, "files": [str(bad)]})
    bad.write_text(json.dumps({"sentence": "the cat"}) + "\n")
    with pytest.raises(InputError, match=rf"{bad} line 1: no field 'y'"):
        check_evaluators(
            [
                EvaluatorConfig(
                    function="swudi.evaluators:sequence_classification", options={**options, "files": [str(bad)]}
                )
            ]
        )


# ---------------------------------------------------------------------------- relative metrics
def test_relative_metrics_formula() -> None:
    merged = {"wiki": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 50.0}, "code": {"accuracy": 0.6}}
    base = {"wiki": {"loss": 3.0, "perplexity": math.exp(3.0), "tokens": 50.0}, "code": {"accuracy": 0.3}}
    experts = [
        {"wiki": {"loss": 1.5, "perplexity": math.exp(1.5), "tokens": 50.0}, "code": {"accuracy": 0.5}},
        {"wiki": {"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 50.0}, "code": {"accuracy": 0.8}},
    ]
    out = relative_metrics(merged, base, experts)
    wiki = out["tasks"]["wiki"]["loss"]
    # no mapping, two experts: the expert of a task is its best one (lowest loss, highest accuracy)
    assert (wiki["expert_index"], wiki["expert_rule"]) == (0, "best expert")
    assert wiki["gap_closed"] == pytest.approx((3.0 - 2.0) / (3.0 - 1.5))
    assert out["tasks"]["wiki"]["perplexity"]["gap_closed"] == pytest.approx(
        (math.exp(3) - math.exp(2)) / (math.exp(3) - math.exp(1.5))
    )
    assert "tokens" not in out["tasks"]["wiki"]  # neither lower nor higher is better
    code = out["tasks"]["code"]["accuracy"]
    assert code["expert_index"] == 1 and code["normalized"] == pytest.approx(0.6 / 0.8)
    # a mapping names the expert; the best one is still reported
    mapped = relative_metrics(merged, base, experts, {"wiki": 1, "code": 0})
    wiki = mapped["tasks"]["wiki"]["loss"]
    assert (wiki["expert_index"], wiki["expert_rule"]) == (1, "task_experts")
    assert wiki["gap_closed"] == pytest.approx((3.0 - 2.0) / (3.0 - 2.5))
    assert wiki["best_expert_index"] == 0 and wiki["gap_closed_best"] == pytest.approx(1 / 1.5)
    assert mapped["tasks"]["code"]["accuracy"]["normalized"] == pytest.approx(0.6 / 0.5)
    assert mapped["mean"]["loss"] == {"gap_closed": pytest.approx(2.0), "tasks": 1}
    # one expert is the expert of every task; base == expert has no gap to close
    single = relative_metrics(merged, base, [base])
    assert single["tasks"]["wiki"]["loss"]["expert_rule"] == "only expert"
    assert single["tasks"]["wiki"]["loss"]["gap_closed"] is None

    # the model card's table: one row per task and compared metric, the mean last
    from swudi.publish.card import _relative

    card = "\n".join(_relative({"fn:eval": mapped}))
    assert "| wiki | loss (gap closed) | 2.0000 | 3.0000 | 1: 2.5000 | 2.0000 | 0: 1.5000 | 0.6667 |" in card
    assert "| code | accuracy (normalized) | 0.6000 | 0.3000 | 0: 0.5000 | 1.2000 | 1: 0.8000 | 0.7500 |" in card
    assert "| mean of 1 | loss (gap closed) | | | | 2.0000 | | |" in card


def test_relative_evaluations_cached_by_fingerprint(lm: dict[str, str], tmp_path: Path) -> None:
    files = [str(Path(lm["root"]) / "wiki.jsonl")]
    experts = [str(tmp_path / "e0"), str(tmp_path / "e1")]
    for i, target in enumerate(experts):
        shutil.copytree(lm[f"expert{i}"], target)
    cfg = config_from_mapping(
        {
            "base": lm["base"],
            "experts": experts,
            "output": str(tmp_path / "out"),
            "device": "cpu",
            "evaluators": [
                {
                    "function": "swudi.evaluators:causal_lm_loss",
                    "options": {"files": files, "block_size": 16},
                    "relative": True,
                    "task_experts": {"wiki": experts[1]},
                }
            ],
        }
    )
    entry = cfg.evaluators[0]
    assert entry.task_experts == {"wiki": experts[1]}
    merged = causal_lm_loss(lm["expert0"], files=files, block_size=16)  # any model stands for the merge
    out = relative_evaluations(cfg, {entry.function: merged})[entry.function]
    base_loss, _ = expected_lm_loss(lm["base"], SENTENCES, block=16)
    e1_loss, _ = expected_lm_loss(experts[1], SENTENCES, block=16)
    wiki = out["tasks"]["wiki"]["loss"]
    assert wiki["expert_index"] == 1 and wiki["base"] == pytest.approx(base_loss, rel=1e-5)
    assert wiki["gap_closed"] == pytest.approx((base_loss - merged["wiki"]["loss"]) / (base_loss - e1_loss), rel=1e-4)

    cache = sorted((tmp_path / "out" / ".swudi-work" / "evaluations").glob("*.json"))
    assert len(cache) == 3  # base and two experts
    # the stored records are what a second run returns (planted value proves it reads them)
    for path in cache:
        record = json.loads(path.read_text())
        record["metrics"]["wiki"]["loss"] = 123.0
        path.write_text(json.dumps(record))
    again = relative_evaluations(cfg, {entry.function: merged})[entry.function]
    assert again["base"]["wiki"]["loss"] == 123.0 and again["experts"][1]["wiki"]["loss"] == 123.0
    # new bytes of an expert: a new key, evaluated again; other options: a new key too
    shutil.copyfile(lm["base"] + "/model.safetensors", experts[1] + "/model.safetensors")
    assert cached_evaluation(entry, experts[1], cfg.resolved_work_dir)["wiki"]["loss"] == pytest.approx(
        base_loss, rel=1e-5
    )
    other = EvaluatorConfig(function=entry.function, options={"files": files, "block_size": 8}, relative=True)
    assert cached_evaluation(other, lm["base"], cfg.resolved_work_dir)["wiki"]["loss"] != 123.0
    assert len(list((tmp_path / "out" / ".swudi-work" / "evaluations").glob("*.json"))) == 5


def test_relative_inputs_must_be_model_folders(lm: dict[str, str], tmp_path: Path) -> None:
    """A relative built-in evaluator also runs on every expert: a bare safetensors expert is refused
    before any merge work, naming it; without relative: true it is not the evaluator's concern."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(lm["expert1"] + "/model.safetensors", bare / "model.safetensors")
    entry = {"function": "swudi.evaluators:causal_lm_loss", "options": {"files": ["x.jsonl"]}}
    data = {"base": lm["base"], "experts": [lm["expert0"], str(bare)], "output": str(tmp_path / "out")}
    with pytest.raises(InputError, match=rf"{bare}: no config\.json; the built-in evaluators run on"):
        check_relative_inputs(config_from_mapping({**data, "evaluators": [{**entry, "relative": True}]}))
    check_relative_inputs(config_from_mapping({**data, "evaluators": [entry]}))
    check_relative_inputs(
        config_from_mapping(
            {**data, "experts": [lm["expert0"], lm["expert1"]], "evaluators": [{**entry, "relative": True}]}
        )
    )


def test_relative_config_is_checked(tmp_path: Path) -> None:
    data = {"base": "/m/base", "experts": ["/m/a", "/m/b"], "output": "/m/out"}
    entry = {"function": "swudi.evaluators:causal_lm_loss", "options": {"files": ["x.jsonl"]}}
    with pytest.raises(ConfigError, match="task_experts is only used with relative: true"):
        config_from_mapping({**data, "evaluators": [{**entry, "task_experts": {"x": 0}}]})
    with pytest.raises(ConfigError, match=r"task_experts\.x is 2, not an expert index \(0 to 1\)"):
        config_from_mapping({**data, "evaluators": [{**entry, "relative": True, "task_experts": {"x": 2}}]})
    with pytest.raises(ConfigError, match=r"task_experts\.x '/m/c' is not one of experts"):
        config_from_mapping({**data, "evaluators": [{**entry, "relative": True, "task_experts": {"x": "/m/c"}}]})


@pytest.mark.slow
def test_merge_report_and_card_carry_relative_metrics(prefect_api: str, lm: dict[str, str], tmp_path: Path) -> None:
    """The real merge flow with a relative built-in evaluator: gap closed in the report and the card,
    base and expert runs reused by the next merge of the same inputs."""
    from flows.merge import run_merge

    files = [str(Path(lm["root"]) / "wiki.jsonl")]
    fn = "swudi.evaluators:causal_lm_loss"
    data = {
        "base": lm["base"],
        "experts": [lm["expert0"], lm["expert1"]],
        "output": str(tmp_path / "out"),
        "method": "swudi_a",
        "device": "cpu",
        "workers": 1,
        "evaluators": [
            {
                "function": fn,
                "options": {"files": files, "block_size": 16},
                "relative": True,
                "task_experts": {"wiki": 1},
            }
        ],
    }
    result = run_merge(config_from_mapping(data))
    version = Path(result["url"])
    report = json.loads((version / "merge_report.json").read_text())
    merged_loss, _ = expected_lm_loss(str(version), SENTENCES, block=16)
    base_loss, _ = expected_lm_loss(lm["base"], SENTENCES, block=16)
    expert_loss, _ = expected_lm_loss(lm["expert1"], SENTENCES, block=16)
    assert report["evaluations"][fn]["wiki"]["loss"] == pytest.approx(merged_loss, rel=1e-5)
    wiki = report["relative_evaluations"][fn]["tasks"]["wiki"]["loss"]
    expected = (base_loss - merged_loss) / (base_loss - expert_loss)
    assert wiki["expert_index"] == 1 and wiki["gap_closed"] == pytest.approx(expected, rel=1e-4)
    card = (version / "README.md").read_text()
    assert "## Against the base and the experts" in card
    assert f"| wiki | loss (gap closed) | {wiki['merged']:.4f} | {wiki['base']:.4f} | 1: {wiki['expert']:.4f} |" in card

    cache = tmp_path / "out" / ".swudi-work" / "evaluations"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")}
    assert len(stamps) == 3
    second = run_merge(config_from_mapping({**data, "scale": 0.5}))
    assert second["url"] != result["url"]
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.json")} == stamps  # reused, not re-run
    again = json.loads((Path(second["url"]) / "merge_report.json").read_text())["relative_evaluations"][fn]
    assert again["base"] == report["relative_evaluations"][fn]["base"]
