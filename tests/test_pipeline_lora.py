"""LoRA adapters as experts, made and saved by PEFT itself: reading, planning, merging, bad inputs.

The independent reference of every adapter is PEFT's own ``merge_and_unload()``: its dense state
dict minus the base is the task vector swudi must see, and ``merge_state_dicts`` on those dense
experts is the dense path the factor-space merge must equal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from swudi import merge_state_dicts
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping
from swudi.errors import CheckpointError, CheckpointMismatchError, ConfigError
from swudi.io.adapter import LoraAdapter, LoraFactors
from swudi.io.checkpoint import Checkpoint
from swudi.pipeline.layer_step import merge_layer
from swudi.pipeline.plan import build_plan, describe_plan, uses_factor_space
from swudi.pipeline.reads import read_task_vectors
from tests.helpers.lora import llama_config, write_adapter, write_base, write_full_expert

CONFIG = llama_config()
#: Three PEFT adapters that differ in target modules, ranks, alphas and scaling rules.
ADAPTERS = {
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"v_proj": 3},
        "modules_to_save": ["lm_head"],
    },
    "rslora": {"r": 3, "lora_alpha": 5, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj"]},
    "plain": {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]},
}



def _named(name: str) -> Callable[[str], str]:
    """An assert_close message that names the tensor."""
    return lambda text: f"{name}: {text}"

@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base + the three adapters on disk, with the dense state dicts PEFT merges them into."""
    root = tmp_path_factory.mktemp("lora")
    base = write_base(root / "base", CONFIG)
    dense = {
        name: write_adapter(root / name, CONFIG, seed=i + 1, **lora)  # type: ignore[arg-type]  # ADAPTERS' kwargs
        for i, (name, lora) in enumerate(ADAPTERS.items())
    }
    return {"root": root, "base": base, "dense": dense}


def _config(root: Path, experts: list[str], out: Path, **extra):
    return config_from_mapping(
        {"base": str(root / "base"), "experts": experts, "output": str(out), "device": "cpu", **extra}
    )


def test_task_vectors_equal_peft_merge_and_unload(lora_inputs, tmp_path: Path) -> None:
    """rank_pattern, alpha_pattern, use_rslora and modules_to_save give PEFT's own dense update."""
    root, base = lora_inputs["root"], lora_inputs["base"]
    cfg = _config(root, [str(root / n) for n in ADAPTERS], tmp_path / "out")
    plan = build_plan(cfg)
    seen = 0
    for job in plan.jobs:
        if job.route == "base":  # no adapter names it: PEFT leaves it unchanged too
            for dense in lora_inputs["dense"].values():
                torch.testing.assert_close(dense[job.name], base[job.name], rtol=0, atol=0)
            continue
        _, tv = read_task_vectors(job, cfg)
        for i, dense in enumerate(lora_inputs["dense"].values()):
            torch.testing.assert_close(tv[i], dense[job.name] - base[job.name], rtol=1e-5, atol=1e-6, msg=job.name)
        seen += 1
    assert seen == 2 * 5 + 1  # q, k, v, up, down in each block + lm_head (modules_to_save)
    adapter = LoraAdapter.open(str(root / "patterns"))
    down = adapter.inputs["model.layers.0.mlp.down_proj.weight"]
    v = adapter.inputs["model.layers.0.self_attn.v_proj.weight"]
    assert isinstance(down, LoraFactors) and down.rank == 2 and down.scaling == pytest.approx(8 / 2)
    assert isinstance(v, LoraFactors) and v.scaling == pytest.approx(3 / 4)
    rs = LoraAdapter.open(str(root / "rslora")).inputs["model.layers.1.mlp.up_proj.weight"]
    assert isinstance(rs, LoraFactors) and rs.scaling == pytest.approx(5 / 3**0.5)


def test_fan_in_fan_out_adapter_of_a_conv1d_model(tmp_path: Path) -> None:
    """GPT-2 stores c_attn as in x out (Conv1D): PEFT's fan_in_fan_out update is (B A)^T."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=40, n_positions=16)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    dense = peft_model.merge_and_unload().state_dict()
    cfg = config_from_mapping(
        {"base": str(tmp_path / "base"), "experts": [str(tmp_path / "ad")], "output": str(tmp_path / "o")}
    )
    jobs = {job.name: job for job in build_plan(cfg).jobs}
    job = jobs["transformer.h.0.attn.c_attn.weight"]
    assert job.shape == (32, 96) and uses_factor_space(job, cfg)
    _, tv = read_task_vectors(job, cfg)
    torch.testing.assert_close(tv[0], dense[job.name] - base[job.name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "params"), [("swudi_a", {}), ("pinv", {}), ("swudi_soft", {"t": 300.0})])
def test_factor_space_merge_equals_the_dense_path(lora_inputs, tmp_path: Path, method, params) -> None:
    """Each layer merged in factor space equals merge_state_dicts on PEFT's dense experts."""
    root = lora_inputs["root"]
    cfg = _config(root, [str(root / n) for n in ADAPTERS], tmp_path / "out", method=method, params=params)
    plan = build_plan(cfg)
    want = merge_state_dicts(lora_inputs["base"], list(lora_inputs["dense"].values()), method, **params)
    layers = [job for job in plan.layer_jobs if uses_factor_space(job, cfg)]
    assert {job.name.split(".")[-2] for job in layers} == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    for job in layers:
        if method == "swudi_a" and sum(r or 0 for r in job.lora_ranks) < 4:
            # one adapter of rank <= 3 alone: the rank rule asks for more directions than C has; the
            # dense path fills them with float32 noise over a floored eigenvalue, factor space with 0
            continue
        record = merge_layer(job, cfg)
        assert record.decomposed and record.bytes_read[0] == job.base.nbytes
        assert sum(record.bytes_read[1:]) == sum(x.nbytes for x in job.experts if x is not None)
        got = Checkpoint.open(record.url).read(job.name)
        # float32 tolerance on the scale of the merged update (the dense path's exponential filter
        # takes t x float32 noise on the directions beyond sum r_i; factor space has none there)
        tol = 1e-4 * float((want[job.name] - lora_inputs["base"][job.name]).abs().max())
        torch.testing.assert_close(
            got, want[job.name], atol=tol, rtol=1e-4, msg=_named(job.name)
        )


def test_plan_names_ranks_and_the_path_of_every_target_weight(lora_inputs, tmp_path: Path) -> None:
    root = lora_inputs["root"]
    full = write_full_expert(tmp_path / "full", lora_inputs["base"], seed=9, config=CONFIG)
    assert full
    cfg = _config(root, [str(root / "patterns"), str(root / "plain")], tmp_path / "out")
    rows = {row["name"]: row for row in describe_plan(cfg, build_plan(cfg))["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["adapter_ranks"] == [4, 2] and q["path"] == "factor space" and q["decomposition_gflop"] > 0
    assert rows["model.layers.0.mlp.down_proj.weight"]["adapter_ranks"] == [2, 0]
    assert rows["model.layers.0.mlp.gate_proj.weight"]["treatment"] == "base (no expert changes it)"
    assert rows["lm_head.weight"]["adapter_ranks"] == [None, 0]  # modules_to_save: a full tensor

    mixed = _config(root, [str(root / "plain"), str(tmp_path / "full")], tmp_path / "out2")
    row = {r["name"]: r for r in describe_plan(mixed, build_plan(mixed))["tensors"]}[
        "model.layers.1.self_attn.v_proj.weight"
    ]
    assert row["adapter_ranks"] == [2, None] and row["path"] == "dense" and "full checkpoint" in row["path_reason"]

    capped = _config(root, [str(root / n) for n in ADAPTERS], tmp_path / "o3", decomposition={"max_rank": 8})
    row = {r["name"]: r for r in describe_plan(capped, build_plan(capped))["tensors"]}[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    assert row["path"] == "dense" and "max_rank 8 < sum of ranks 9" in row["path_reason"]

    result = CliRunner().invoke(
        app, ["plan", str(_write_yaml(tmp_path, cfg.model_dump(include={"base", "experts", "output"})))]
    )
    assert result.exit_code == 0, result.output
    assert "factor space" in result.output and "4+2" in result.output


def test_ranks_summing_past_min_m_d_take_the_dense_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Adapters whose ranks add up to min(m, d) or more are merged densely (and the plan says so)."""
    small = llama_config(hidden=16, intermediate=24, layers=1, vocab=20)
    base = write_base(tmp_path / "base", small)
    dense = [
        write_adapter(tmp_path / f"a{i}", small, seed=i, r=6, lora_alpha=6, target_modules=["o_proj"]) for i in range(3)
    ]
    cfg = config_from_mapping(
        {
            "base": str(tmp_path / "base"),
            "experts": [str(tmp_path / f"a{i}") for i in range(3)],
            "output": str(tmp_path / "out"),
            "device": "cpu",
            "method": "pinv",
        }
    )
    plan = build_plan(cfg)
    (job,) = plan.layer_jobs
    assert job.factor_rank is None and not uses_factor_space(job, cfg)
    (row,) = [r for r in describe_plan(cfg, plan)["tensors"] if r["name"] == job.name]
    assert row["path"] == "dense" and row["path_reason"] == "sum of ranks 18 >= min(m, d) = 16"
    with caplog.at_level("INFO", logger="swudi.pipeline"):
        record = merge_layer(job, cfg)
    assert f"{job.name}: LoRA experts merged on the dense path: sum of ranks 18 >= min(m, d) = 16" in caplog.text
    want = merge_state_dicts(base, dense, "pinv")[job.name]
    torch.testing.assert_close(Checkpoint.open(record.url).read(job.name), want, atol=1e-5, rtol=1e-4)


def _write_yaml(folder: Path, data: dict) -> Path:
    import yaml

    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_adapters_are_named_before_any_tensor_is_read(lora_inputs, tmp_path: Path) -> None:
    root = lora_inputs["root"]
    # an adapter of another model size: every factor whose shape does not fit is named
    other = llama_config(hidden=32, intermediate=96, layers=2, vocab=48)
    write_adapter(tmp_path / "other", other, seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = _config(root, [str(root / "plain"), str(tmp_path / "other")], tmp_path / "out")
    with pytest.raises(CheckpointMismatchError) as error:
        build_plan(cfg)
    assert len(error.value.problems) == 2
    assert "'model.layers.0.self_attn.q_proj.weight' give shape [32, 32], the base" in str(error.value)
    assert str(tmp_path / "other") in error.value.problems[0]

    # rank_pattern that contradicts the stored factors
    bad = _copy(root / "plain", tmp_path / "bad-rank")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 5}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointMismatchError, match=r"v_proj.lora_A.weight has rank 2, but adapter_config.json gives r = 5"
    ):
        build_plan(_config(root, [str(bad)], tmp_path / "o2"))

    # pickle weights are refused, never loaded
    pickled = _copy(root / "plain", tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle checkpoint \(adapter_model\.bin\) refused"):
        build_plan(_config(root, [str(pickled)], tmp_path / "o3"))

    # DoRA is not a B A update
    dora = _copy(root / "plain", tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora is true"):
        build_plan(_config(root, [str(dora)], tmp_path / "o4"))

    # the CLI: one line naming the fault, exit code 2
    data = {"base": str(root / "base"), "experts": [str(dora)], "output": str(tmp_path / "o5")}
    result = CliRunner().invoke(app, ["plan", str(_write_yaml(tmp_path, data))])
    assert result.exit_code == 2 and "use_dora" in result.output


def test_adapters_on_s3(lora_inputs, s3_bucket, tmp_path: Path) -> None:
    """An adapter folder at an s3:// URL is opened from its header and merged like a local one."""
    root = lora_inputs["root"]
    fs = s3_bucket.fs
    for name in ("base", "patterns", "plain"):
        fs.put(str(root / name), f"{s3_bucket.name}/{name}", recursive=True)
    cfg = config_from_mapping(
        {
            "base": f"{s3_bucket.url}/base",
            "experts": [f"{s3_bucket.url}/patterns", f"{s3_bucket.url}/plain"],
            "output": f"{s3_bucket.url}/out",
            "device": "cpu",
            "method": "pinv",
            "storage_options": s3_bucket.storage_options,
        }
    )
    plan = build_plan(cfg)
    (job,) = [j for j in plan.layer_jobs if j.name == "model.layers.1.self_attn.q_proj.weight"]
    assert uses_factor_space(job, cfg)
    record = merge_layer(job, cfg)
    dense = lora_inputs["dense"]
    want = merge_state_dicts(lora_inputs["base"], [dense["patterns"], dense["plain"]], "pinv")[job.name]
    got = Checkpoint.open(record.url, s3_bucket.storage_options).read(job.name)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _published(url: str) -> dict[str, torch.Tensor]:
    return Checkpoint.open(url).state_dict()


def _flow_merge_of_adapters(lora_inputs, out: Path):
    """Merge the three adapters with pinv through Prefect; check the published model against the
    dense path and the stored decompositions (factored: no m x d matrix)."""
    from flows.merge import run_merge

    root, base, dense = lora_inputs["root"], lora_inputs["base"], list(lora_inputs["dense"].values())
    cfg = _config(root, [str(root / n) for n in ADAPTERS], out, method="pinv")
    first = run_merge(cfg)
    want = merge_state_dicts(base, dense, "pinv")
    got = _published(first["url"])
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert first["decompositions_computed"] == first["layers"] == 2 * 5
    assert first["io"]["input_tensor_bytes"] <= sum(t.numel() * 4 for t in base.values()) + sum(
        (root / n / "adapter_model.safetensors").stat().st_size for n in ADAPTERS
    )
    decompositions = list((out / ".swudi-work" / "decompositions").iterdir())
    assert len(decompositions) == 2 * 5
    for path in decompositions:
        artefact = Checkpoint.open(str(path))
        assert artefact.metadata["factored"] == "true" and "sum_tv" not in artefact.tensors
    return cfg


def test_flow_merges_adapters_in_factor_space(prefect_api: str, lora_inputs, tmp_path: Path) -> None:
    _flow_merge_of_adapters(lora_inputs, tmp_path / "out")


@pytest.mark.slow
def test_a_sweep_point_reads_no_adapter(prefect_api: str, lora_inputs, tmp_path: Path) -> None:
    """A new method setting reuses every factored decomposition: no expert byte is read."""
    from flows.merge import run_merge

    base, dense = lora_inputs["base"], list(lora_inputs["dense"].values())
    cfg = _flow_merge_of_adapters(lora_inputs, tmp_path / "out")
    sweep = run_merge(cfg.model_copy(update={"method": "swudi_soft", "params": {"t": 300.0, "init": "sum"}}))
    assert sweep["decompositions_computed"] == 0 and sweep["decompositions_reused"] == 2 * 5
    assert sum(c["tensor_bytes"] for c in sweep["io"]["per_checkpoint"][1:]) == 0
    want = merge_state_dicts(base, dense, "swudi_soft", t=300.0)
    got = _published(sweep["url"])
    for name, tensor in want.items():
        scale = float((tensor - base[name]).abs().max()) or 1.0
        torch.testing.assert_close(got[name], tensor, atol=1e-4 * scale, rtol=1e-4, msg=name)


def test_flow_merges_adapters_mixed_with_a_full_checkpoint(prefect_api: str, lora_inputs, tmp_path: Path) -> None:
    from flows.merge import run_merge

    root, base = lora_inputs["root"], lora_inputs["base"]
    full = write_full_expert(tmp_path / "full", base, seed=11, config=CONFIG)
    cfg = _config(
        root, [str(root / "patterns"), str(tmp_path / "full"), str(root / "rslora")], tmp_path / "out", method="swudi_a"
    )
    result = run_merge(cfg)
    dense = lora_inputs["dense"]
    want = merge_state_dicts(base, [dense["patterns"], full, dense["rslora"]], "swudi_a")
    got = _published(result["url"])
    for name, tensor in want.items():
        # the dense path on both sides; PEFT's merged weights carry W0 + tau rounding (~1e-8 of W0)
        scale = float((tensor - base[name]).abs().max()) or 1.0
        torch.testing.assert_close(
            got[name], tensor, atol=1e-4 * scale, rtol=1e-4, msg=_named(name)
        )
    report = json.loads((Path(result["url"]) / "merge_report.json").read_text())
    per_task = report["diagnostics"]["per_layer"]["model.layers.0.self_attn.o_proj.weight"]
    assert len(per_task["interference_vs_sum_per_task"]) == 3


def test_merged_adapter_loads_with_peft_and_reproduces_the_dense_model(
    prefect_api: str, lora_inputs, tmp_path: Path
) -> None:
    """output_format: adapter writes VERSION/adapter/; PEFT loads it onto the base and its merged
    weights are the published dense model's."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from flows.merge import run_merge

    root = lora_inputs["root"]
    cfg = _config(root, [str(root / n) for n in ADAPTERS], tmp_path / "out", scale=0.7, output_format="adapter")
    result = run_merge(cfg)
    version = Path(result["url"])
    published = _published(str(version))
    adapter_config = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["lm_head"] and len(adapter_config["target_modules"]) == 10
    ranks = {m: adapter_config["rank_pattern"].get(m, adapter_config["r"]) for m in adapter_config["target_modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] <= 4 + 3 + 2 and ranks["model.layers.1.mlp.down_proj"] <= 2
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), version / "adapter")
    loaded = model.merge_and_unload().state_dict()
    for name, tensor in published.items():
        torch.testing.assert_close(loaded[name], tensor, atol=1e-6, rtol=1e-5, msg=_named(name))
    assert json.loads((version / "merge_report.json").read_text())["adapter"]["target_modules"] == 10


def test_adapter_output_is_refused_where_the_merge_is_not_low_rank(lora_inputs, tmp_path: Path) -> None:
    root = lora_inputs["root"]
    write_full_expert(tmp_path / "full", lora_inputs["base"], seed=5, config=CONFIG)
    mixed = _config(root, [str(root / "plain"), str(tmp_path / "full")], tmp_path / "o1", output_format="adapter")
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj.weight: merged on the dense path"):
        build_plan(mixed)
    ties = _config(root, [str(root / "plain")], tmp_path / "o2", output_format="adapter", method="ties")
    with pytest.raises(ConfigError, match=r"method 'ties' is not spectral"):
        build_plan(ties)


def test_adapters_naming_different_base_models_are_warned_about(lora_inputs, tmp_path: Path) -> None:
    root = lora_inputs["root"]
    experts = []
    for name, base_name in (("plain", "org/llama-a"), ("rslora", "org/llama-b")):
        copy = _copy(root / name, tmp_path / name)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_name}))
        experts.append(str(copy))
    plan = build_plan(_config(root, experts, tmp_path / "out"))
    assert any("different base models (org/llama-a, org/llama-b)" in w for w in plan.warnings)
