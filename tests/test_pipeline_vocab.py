"""Vocab-extended experts: experts whose tokenizers append tokens and whose embeddings / lm_head
have more rows than the base (padded to a multiple of 8 or 16, as `resize_token_embeddings` does).

Made with transformers and tokenizers themselves (tests/helpers/vocab.py), merged with the library
steps the flow runs, and checked against an independent float64 computation of every vocab row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from swudi.cli.app import app
from swudi.config.merge_config import MergeConfig, config_from_mapping
from swudi.errors import CheckpointMismatchError, ConfigError, InputError
from swudi.io.checkpoint import Checkpoint
from swudi.pipeline.plan import build_plan, describe_plan
from tests.helpers.steps import merge_without_prefect
from tests.helpers.vocab import write_base, write_expert

BASE_VOCAB = 100
#: expert -> (appended tokens, pad_to_multiple_of): rows 104, 112 and the base's 100
EXPERTS = {"two": (["<a>", "<b>"], 8), "four": (["<a>", "<b>", "<c>", "<d>"], 16), "same": ([], None)}
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _build(root: Path, tied: bool) -> dict[str, Any]:
    base = write_base(root / "base", BASE_VOCAB, tied)
    experts = {
        name: write_expert(root / name, root / "base", seed=i + 1, tokens=tokens, pad_to=pad)
        for i, (name, (tokens, pad)) in enumerate(EXPERTS.items())
    }
    return {"root": root, "base": base, "experts": experts, "tied": tied}


_BUILT: dict[bool, dict[str, Any]] = {}


def _built(tmp_path_factory: pytest.TempPathFactory, tied: bool) -> dict[str, Any]:
    """The models of one kind, built once per session (each build saves four tiny models)."""
    if tied not in _BUILT:
        _BUILT[tied] = _build(tmp_path_factory.mktemp("vocab"), tied)
    return _BUILT[tied]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _built(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _built(tmp_path_factory, False)


def _config(root: Path, experts: list[str], out: Path, **extra: Any) -> MergeConfig:
    return config_from_mapping(
        {"base": str(root / "base"), "experts": experts, "output": str(out), "device": "cpu", **extra}
    )


def _expected_rows(base: torch.Tensor, experts: list[torch.Tensor], theta_of: Any) -> torch.Tensor:
    """Independent float64 reference of a vocab tensor: base rows W0 + theta(tau[:100]); row 100..103
    the mean over the experts whose tokenizer has the token (rows 100-101: 'two' and 'four'; 102-103:
    'four' only); padding rows 104..111 from 'four', the first (only) expert that has them."""
    b = base.double()
    two, four, same = (e.double() for e in experts)
    taus = torch.stack([e[:BASE_VOCAB] - b for e in (two, four, same)])
    top = b + theta_of(taus)
    appended = torch.stack([(two[100] + four[100]) / 2, (two[101] + four[101]) / 2, four[102], four[103]])
    return torch.cat([top, appended, four[104:112]])


@pytest.mark.parametrize(
    ("method", "params", "theta_of"),
    [
        ("swudi_a", {}, lambda taus: 0.8 * taus.mean(0)),  # embeddings: the mean route (default exclude), scale 0.8
        ("task_arithmetic", {"scale": 0.5}, lambda taus: 0.8 * 0.5 * taus.sum(0)),
    ],
)
def test_vocab_extended_experts_merge_load_and_generate(models, tmp_path: Path, method, params, theta_of) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    root, base = models["root"], models["base"]
    cfg = _config(root, [str(root / n) for n in EXPERTS], tmp_path / "out", method=method, params=params, scale=0.8)
    result = merge_without_prefect(cfg)
    version = Path(result["url"])
    got = Checkpoint.open(str(version)).state_dict()
    saved = Checkpoint.open(str(root / "base")).tensors  # tied: lm_head is not saved, as the family does
    names = [n for n in VOCAB_NAMES if n in saved]
    assert sorted(got) == sorted(saved) and len(names) == (1 if models["tied"] else 2)
    for name in names:
        want = _expected_rows(base[name], [models["experts"][e][name] for e in EXPERTS], theta_of)
        assert got[name].shape == (112, 32)
        torch.testing.assert_close(got[name].double(), want, atol=2e-6, rtol=1e-5, msg=name)
    assert json.loads((version / "config.json").read_text())["vocab_size"] == 112
    tokenizer = AutoTokenizer.from_pretrained(version)
    assert len(tokenizer) == 104 and tokenizer.convert_tokens_to_ids(["<a>", "<d>"]) == [100, 103]
    loaded: Any = LlamaForCausalLM.from_pretrained(version, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.get_input_embeddings().weight.shape[0] == 112
    if models["tied"]:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    inputs = tokenizer("w5 <a> w7 <d>", return_tensors="pt")
    assert inputs["input_ids"].tolist()[0][-3:] == [100, 7, 103]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    io = result["io"]["per_checkpoint"]
    assert [c["tensor_bytes"] for c in io] == [c["tensor_bytes_needed"] for c in io]


def test_plan_reports_rows_merged_appended_and_padding(models, tmp_path: Path) -> None:
    root = models["root"]
    cfg = _config(root, [str(root / n) for n in EXPERTS], tmp_path / "out")
    summary = describe_plan(cfg, build_plan(cfg))
    vocab = summary["vocab"]
    assert (vocab["rows_merged"], vocab["rows_appended"], vocab["rows_padding"], vocab["rows"]) == (100, 4, 8, 112)
    assert vocab["tokenizer_from"] == str(root / "four")
    per_expert = [(e["rows"], e["appended_tokens"], e["padding_rows_taken"]) for e in vocab["experts"]]
    assert per_expert == [(104, 2, 0), (112, 4, 8), (100, 0, 0)]
    rows = {row["name"]: row for row in summary["tensors"]}
    assert rows["model.embed_tokens.weight"]["rows"] == {"merged": 100, "appended": 4, "padding": 8}
    assert rows["model.embed_tokens.weight"]["shape"] == [112, 32]
    config = tmp_path / "merge.yaml"
    config.write_text(
        json.dumps(
            {"base": str(root / "base"), "experts": [str(root / n) for n in EXPERTS], "output": str(tmp_path / "out")}
        )
    )
    printed = CliRunner().invoke(app, ["plan", str(config)], terminal_width=400)
    assert printed.exit_code == 0, printed.output
    assert "vocab: 100 -> 112 rows (100 merged, 4 appended" in " ".join(printed.output.split())


def _retokenized(src: Path, dst: Path, change: Any) -> Path:
    """A copy of expert ``src`` whose tokenizer.json is edited by ``change`` (a function of its JSON)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    change(data)
    (dst / "tokenizer.json").write_text(json.dumps(data))
    config = dst / "tokenizer_config.json"
    tok_config = json.loads(config.read_text())
    tok_config.pop("added_tokens_decoder", None)  # tokenizer.json alone names the tokens
    config.write_text(json.dumps(tok_config))
    return dst


def _set_added(token_id: int, content: str):
    def change(data: dict) -> None:
        for entry in data["added_tokens"]:
            if entry["id"] == token_id:
                entry["content"] = content

    return change


def test_conflicting_and_foreign_tokenizers_are_refused_before_any_work(untied, tmp_path: Path) -> None:
    root = untied["root"]
    out = tmp_path / "out"
    conflict = _retokenized(root / "four", tmp_path / "conflict", _set_added(101, "<zzz>"))
    with pytest.raises(InputError) as error:
        build_plan(_config(root, [str(root / "two"), str(conflict)], out))
    message = str(error.value)
    assert "\n" not in message and str(conflict) in message and "id 101" in message
    assert "'<zzz>'" in message and "'<b>'" in message
    config = tmp_path / "conflict.yaml"
    config.write_text(
        json.dumps({"base": str(root / "base"), "experts": [str(root / "two"), str(conflict)], "output": str(out)})
    )
    printed = CliRunner().invoke(app, ["plan", str(config)], terminal_width=400)
    assert printed.exit_code == 2 and "id 101" in printed.output, printed.output
    moved = _retokenized(root / "four", tmp_path / "moved", lambda d: d["model"]["vocab"].update({"w5": 6, "w6": 5}))
    with pytest.raises(InputError, match=r"moved: token id 5 is 'w6', the base's is 'w5'"):
        build_plan(_config(root, [str(root / "two"), str(moved)], out))
    # the same token string at another id
    swapped = _retokenized(
        root / "four", tmp_path / "swapped", lambda d: [_set_added(100, "<b>")(d), _set_added(101, "<a>")(d)]
    )
    with pytest.raises(InputError, match=r"swapped: appended token id 100 is '<b>', but .*two has '<a>' there"):
        build_plan(_config(root, [str(root / "two"), str(swapped)], out))
    notoken = tmp_path / "notoken"
    shutil.copytree(root / "two", notoken)
    (notoken / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"notoken: has 104 vocab rows \(the base 100\) but no tokenizer.json"):
        build_plan(_config(root, [str(notoken)], out))
    assert not out.exists()


def test_no_tokenizer_holding_every_appended_token_is_refused(untied, tmp_path: Path) -> None:
    root = untied["root"]
    # 'three' (<a> <b> <c>) has the most tokens but lacks <d>, which 'dee' appends at id 103
    three = _retokenized(
        root / "four",
        tmp_path / "three",
        lambda d: d.update({"added_tokens": [t for t in d["added_tokens"] if t["content"] != "<d>"]}),
    )
    dee = _retokenized(
        root / "four",
        tmp_path / "dee",
        lambda d: d.update({"added_tokens": [t for t in d["added_tokens"] if t["content"] not in ("<b>", "<c>")]}),
    )
    with pytest.raises(
        InputError,
        match=r"no single expert tokenizer holds every appended token: .*three .* lacks "
        r"'<d>' at id 103 \(appended by .*dee\)",
    ):
        build_plan(_config(root, [str(three), str(dee)], tmp_path / "out"))


def test_other_tensors_with_more_rows_and_adapter_output_are_still_refused(untied, tmp_path: Path) -> None:
    root = untied["root"]
    cfg = _config(root, [str(root / "two")], tmp_path / "out", output_format="adapter")
    with pytest.raises(ConfigError, match=r"vocab-extended experts: the merged model has 104 vocab rows"):
        build_plan(cfg)
    bigger = tmp_path / "bigger"
    shutil.copytree(root / "base", bigger)
    config = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "vocab_size": 96}))  # tensors are not the vocab
    with pytest.raises(CheckpointMismatchError, match=r"'lm_head.weight' has shape \[104, 32\]"):
        build_plan(
            config_from_mapping({"base": str(bigger), "experts": [str(root / "two")], "output": str(tmp_path / "o2")})
        )


def test_vocab_extended_experts_on_s3(untied, s3_bucket, tmp_path: Path) -> None:
    """Tokenizers and rows past the base's are read through fsspec from s3:// URLs."""
    root = untied["root"]
    for name in ("base", "two", "four"):
        s3_bucket.fs.put(str(root / name), f"{s3_bucket.name}/{name}", recursive=True)
    cfg = config_from_mapping(
        {
            "base": f"{s3_bucket.url}/base",
            "experts": [f"{s3_bucket.url}/two", f"{s3_bucket.url}/four"],
            "output": f"{s3_bucket.url}/out",
            "device": "cpu",
            "storage_options": s3_bucket.storage_options,
        }
    )
    result = merge_without_prefect(cfg)
    got = Checkpoint.open(result["url"], s3_bucket.storage_options).read("lm_head.weight")
    two, four = (untied["experts"][n]["lm_head.weight"].double() for n in ("two", "four"))
    torch.testing.assert_close(got[100:].double(), torch.cat([(two[100:102] + four[100:102]) / 2, four[102:]]))
    fs = s3_bucket.fs
    assert json.loads(fs.cat_file(f"{s3_bucket.name}/out/{result['path']}/config.json"))["vocab_size"] == 112
    assert (
        fs.cat_file(f"{s3_bucket.name}/out/{result['path']}/tokenizer.json")
        == (root / "four" / "tokenizer.json").read_bytes()
    )
