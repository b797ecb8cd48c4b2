"""The library parts of `swudi tune` and the publish gate, without Prefect: the scale search, the
objective, the scores file, the gate's config, the candidates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from swudi.config.merge_config import EvaluatorConfig, config_from_mapping
from swudi.errors import ConfigError, InputError
from swudi.evaluators.objective import Objective, Score, objective_value, parse_objective
from swudi.evaluators.scores import ScoreStore
from swudi.tuning.candidates import prepare_tune
from swudi.tuning.refine import PHI, refine_minimum

EVALUATOR = "tests.helpers.evaluators:distance_to_target"


# ----------------------------------------------------------------------------- the scale search
def _counted(f):
    calls: list[float] = []

    def g(x: float) -> float:
        calls.append(x)
        return f(x)

    return g, calls


def test_golden_section_converges_on_an_interior_minimum() -> None:
    f, calls = _counted(lambda x: (x - 1.37) ** 2)
    grid = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
    probes = refine_minimum(f, {x: (x - 1.37) ** 2 for x in grid}, budget=8)
    assert len(probes) == len(calls) <= 8 and all(x not in grid for x, _ in probes)
    best = min([*grid, *(x for x, _ in probes)], key=lambda x: (x - 1.37) ** 2)
    # the bracket (1, 1.5, 2) of width 1 shrinks by about 1/phi per probe: 8 probes leave ~0.02
    assert abs(best - 1.37) < 1.0 / PHI**8 * 2
    assert abs(best - 1.37) < abs(1.5 - 1.37) / 4  # far better than the best grid point


def test_bracketing_walks_past_the_upper_edge_and_stays_above_zero_at_the_lower() -> None:
    f, _ = _counted(lambda x: abs(x - 5.0))
    probes = refine_minimum(f, {x: abs(x - 5.0) for x in (0.5, 1.0, 2.0)}, budget=10)
    xs = [x for x, _ in probes]
    assert xs[0] == pytest.approx(2.0 + PHI * 1.0, abs=1e-6)  # the first step out is golden
    assert min(abs(x - 5.0) for x in xs) < 0.15
    low, _ = _counted(lambda x: (x - 0.02) ** 2)
    probes = refine_minimum(low, {x: (x - 0.02) ** 2 for x in (0.25, 0.5, 1.0)}, budget=10)
    assert all(x > 0 for x, _ in probes)
    assert min(x for x, _ in probes) < 0.05
    # deterministic: the same scores give the same probes (a resumed tune finds them cached)
    again = refine_minimum(lambda x: (x - 0.02) ** 2, {x: (x - 0.02) ** 2 for x in (0.25, 0.5, 1.0)}, budget=10)
    assert again == probes


def test_search_stops_when_converged_and_needs_a_start() -> None:
    probes = refine_minimum(lambda x: (x - 1.0) ** 2, {0.999: 1e-6, 1.0: 0.0, 1.001: 1e-6}, budget=5)
    assert probes == []
    with pytest.raises(ValueError):
        refine_minimum(lambda x: x, {}, budget=3)


# ------------------------------------------------------------------------------- the objective
def test_objective_names_one_of_the_evaluators() -> None:
    evaluators = [EvaluatorConfig(function=EVALUATOR, options={"target": "t"})]
    objective = parse_objective(f"{EVALUATOR}:all.distance", evaluators, minimize=True)
    assert objective.evaluator.options == {"target": "t"} and objective.target == "all.distance"
    assert objective.better(0.1, 0.2) and not objective.better(0.2, 0.1)
    dotted = parse_objective(f"{EVALUATOR}:valid.jsonl.loss", evaluators)
    assert objective_value(dotted, {"valid.jsonl": {"loss": 2.5}}) == 2.5
    with pytest.raises(ConfigError, match=r"'mypkg.eval:evaluate' is not one of the config's evaluators \(tests"):
        parse_objective("mypkg.eval:evaluate:all.acc", evaluators)
    with pytest.raises(ConfigError, match=r"module:function:TASK\.METRIC"):
        parse_objective(f"{EVALUATOR}:nodot", evaluators)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"all": {"other": 1.0}}, r"returned no 'all.distance' .* \(it returned all.other\)"),
        ({"all": {"distance": "0.3"}}, r"returned '0.3' .* not a finite number"),
        ({"all": {"distance": math.nan}}, r"returned nan .* not a finite number"),
        ({"all": {"distance": True}}, r"returned True .* not a finite number"),
        ([1, 2], r"returned list .* expected a mapping"),
    ],
)
def test_objective_value_refuses_what_is_not_a_number(metrics, message: str) -> None:
    objective = Objective(EvaluatorConfig(function=EVALUATOR), "all.distance")
    with pytest.raises(InputError, match=message) as caught:
        objective_value(objective, metrics, "m")
    assert EVALUATOR in str(caught.value)


def test_scores_file_keys_by_model_and_evaluator_options(tmp_path: Path) -> None:
    store = ScoreStore(str(tmp_path / "work"))
    a = Objective(EvaluatorConfig(function=EVALUATOR, options={"token": "s3cr3t-a"}), "all.distance")
    b = Objective(EvaluatorConfig(function=EVALUATOR, options={"token": "s3cr3t-b"}), "all.distance")
    store.put("v1", a, Score(0.5, {"all": {"distance": 0.5}}, 1.0), "model-1")
    assert store.get("v1", a).value == 0.5
    assert store.get("v1", b) is None and store.get("v2", a) is None
    calls: list[int] = []

    def evaluate(score: Score) -> Score:
        calls.append(1)
        return score

    fresh = store.score("v1", b, "m", lambda: evaluate(Score(0.7, {"all": {"distance": 0.7}}, 2.0)))
    assert fresh.value == 0.7 and calls == [1]
    assert store.score("v1", b, "m", lambda: evaluate(fresh)).value == 0.7 and calls == [1]
    data = json.loads((tmp_path / "work" / "scores.json").read_text())
    assert len(data) == 2 and "s3cr3t" not in json.dumps(data)  # options enter the key as a digest only


# ------------------------------------------------------------------------------ gate and tune
def _config(tmp_path: Path, **extra):
    base, e0, e1 = (tmp_path / n for n in ("base", "e0", "e1"))
    return {
        "base": str(base),
        "experts": [str(e0), str(e1)],
        "output": str(tmp_path / "out"),
        "evaluators": [{"function": EVALUATOR, "options": {"target": "t"}}],
        **extra,
    }


def test_gate_config_is_strict(tmp_path: Path) -> None:
    gate = {"objective": f"{EVALUATOR}:all.closeness", "at_least": 0.9, "no_worse_than": "latest", "tolerance": 0.005}
    cfg = config_from_mapping(_config(tmp_path, gate=gate))
    assert cfg.gate is not None and cfg.gate.no_worse_than == "latest"
    for bad, message in [
        ({**gate, "typo": 1}, "unknown key 'gate.typo'"),
        ({"objective": gate["objective"]}, "at least one of at_least, at_most, no_worse_than"),
        ({**gate, "no_worse_than": "previous"}, "gate.no_worse_than"),
        ({**gate, "minimize": True}, "with minimize: true give at_most"),
        ({**gate, "tolerance": -1}, "gate.tolerance"),
        ({**gate, "objective": "mypkg.eval:evaluate:all.acc"}, "gate.objective .* is not one of the config's"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_mapping(_config(tmp_path, gate=bad))


def test_prepare_tune_checks_everything_before_any_merge(tmp_path: Path) -> None:
    cfg = config_from_mapping(_config(tmp_path))
    objective = f"{EVALUATOR}:all.distance"
    setup = prepare_tune(cfg, objective, ["scale=0.5,1", "params.t=100,200"], refine=2, minimize=True)
    assert [c.label for c in setup.candidates] == [
        "scale-0.5_t-100",
        "scale-0.5_t-200",
        "scale-1_t-100",
        "scale-1_t-200",
    ]
    for c in setup.candidates:  # staged in the work folder; no evaluator, gate, Hub push of their own
        assert c.config.output.startswith(cfg.resolved_work_dir + "/tune/" + setup.tune_id + "/staged/")
        assert (
            c.config.evaluators == [] and c.config.gate is None and c.config.resolved_work_dir == cfg.resolved_work_dir
        )
    assert prepare_tune(cfg, objective, ["scale=0.5,1"]).tune_id != setup.tune_id
    with pytest.raises(ConfigError, match="at least one --grid"):
        prepare_tune(cfg, objective, [])
    with pytest.raises(ConfigError, match="is not one of the config's evaluators"):
        prepare_tune(cfg, "mypkg.eval:evaluate:all.acc", ["scale=1"])
    with pytest.raises(ConfigError, match="grid point scale-0"):
        prepare_tune(cfg, objective, ["scale=0,1"])
