"""Tests of the attack benchmark's pieces (intriguing_jax.attack.bench) that its figures rest on."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import models
from intriguing_jax.attack import bench
from intriguing_jax.attack.engine import AttackOptions, lbfgs_attack
from intriguing_jax.configs import bench_attack

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pareto_keeps_exactly_the_undominated_points():
  points = [("a", 1.0, 5.0), ("b", 2.0, 4.0), ("c", 2.0, 6.0), ("d", 3.0, 4.0), ("e", 0.5, 9.0),
            ("f", 1.0, 5.0)]
  # c is dominated by a and b; d by b (same distortion, slower); a and f tie, neither dominates the other.
  assert bench.pareto(points) == ["a", "b", "e", "f"]
  # A method without successes (mean distortion nan) is never on the front and dominates nothing.
  assert bench.pareto(points + [("no_success", 0.1, float("nan"))]) == ["a", "b", "e", "f"]
  assert bench.reference_budget({"b": 1, "default": 2}) == "default"
  assert bench.reference_budget({"b": 1}) == "b"


def test_a_bad_budget_is_refused_before_any_work(tmp_path):
  config = bench_attack.get_config("tiny")
  config.budgets = {"defaults": {}, "broken": {"num_bisection": -1}}
  with pytest.raises(ValueError, match="budget 'broken'.*num_bisection"):
    bench.run(config, str(tmp_path), data_dir=str(tmp_path / "no_data_here"))


def test_refinement_evals_follow_the_options():
  opts = AttackOptions(refine_rounds=3, refine_steps=10)
  assert bench.refinement_evals(opts) == dict(forward=3 * 12 + 11 + 1, jacobians=3)
  assert bench.refinement_evals(AttackOptions(refine=False)) == dict(forward=1, jacobians=0)


def test_figures_report_the_mean_and_the_most_evaluations():
  res = types.SimpleNamespace(distortion=np.array([0.1, 0.3]), success=np.array([True, False]),
                              num_evals=np.array([40, 120]), x_adv=np.zeros((2, 3)))
  f = bench._figures(res, AttackOptions(refine=False), 2, time_first=3.0, time_warm=0.5)
  assert f["evals_per_example"] == 80.0 and f["evals_max"] == 120     # all in flight: trips follow the most
  assert f["s_per_example"] == 0.25 and f["examples_per_s"] == 4.0 and f["success"] == 0.5
  assert f["mean_rms"] == pytest.approx(0.2)


def _problem(name, n, seed):
  """A freshly initialised model, n random images in the box and targets it does not predict yet."""
  model = models.get_model(name)
  x = np.random.RandomState(seed).uniform(0, 1, size=(n, 28, 28, 1)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
  return model, variables, x, (np.argmax(np.asarray(model.apply(variables, x)), -1) + 1) % 10


@pytest.mark.slow
def test_reference_engine_runs_on_the_same_inputs_and_weights():
  # This checkout as its own reference: the subprocess gets the same weights and inputs, so it returns
  # what the attack returns here.
  model, variables, x, target = _problem("fc100-100-10", 6, seed=3)
  here = lbfgs_attack(model.apply, variables, x, target)
  calls = []
  ref = bench.reference_attack(_REPO, "fc100-100-10", variables, x, target, repeats=2,
                               here=lambda: calls.append(1))
  np.testing.assert_array_equal(ref["success"], np.asarray(here.success))
  np.testing.assert_allclose(ref["distortion"], np.asarray(here.distortion), rtol=1e-4)
  # One call here before each of the reference's warm calls, each timed.
  assert len(calls) == 2 and ref["times_here"].shape == ref["times_warm"].shape == (2,)
  assert np.all(ref["times_warm"] > 0) and ref["time_first"] > ref["times_warm"].min()


@pytest.mark.slow
def test_first_call_is_timed_in_fresh_processes_stage_by_stage():
  _, variables, x, target = _problem("fc10", 4, seed=0)
  f = bench.first_call(_REPO, "fc10", variables, x, target, programs=True)
  assert list(f["stages_s"]) == ["check", "trace", "lower", "compile", "run"]
  assert all(v > 0 for v in f["stages_s"].values()) and f["time_s"] > 0 and f["time_cached_s"] > 0
  # Compiling the whole program dominates a cold first call; the program has many fusion kernels.
  assert f["stages_s"]["compile"] > f["stages_s"]["run"] and f["fusions"] > 50, f
  # The nested programs, smallest first: each holds the one before; the last is the attack's own program.
  assert list(f["programs"]) == list(bench.PROGRAMS) and all(s > 0 for s, _ in f["programs"].values())
  kernels = [k for _, k in f["programs"].values()]
  assert kernels == sorted(set(kernels)), f["programs"]
  assert f["programs"]["attack"] == (f["stages_s"]["compile"], f["fusions"])


def test_first_call_part_alternates_the_checkouts_in_rounds_and_keeps_medians(monkeypatch):
  calls = []

  def fake_first_call(tree, model_name, variables, x, target, programs):
    calls.append(tree)
    t = float(len(calls) ** 2)   # 1, 4, 9, 16, ...: this checkout 1, 9, 25; the reference 4, 16, 36
    out = dict(time_s=t, time_cached_s=t / 10, fusions=7, stages_s=dict(check=t, compile=2 * t))
    return dict(out, programs={"a": (t / 2, 3), "b": (t, 7)}) if programs else out

  monkeypatch.setattr(bench, "first_call", fake_first_call)
  config = bench_attack.get_config()
  config.reference, config.first_call_rounds, config.num_compare = "/ref", 3, 4
  x, y = np.zeros((6, 28, 28, 1), np.float32), np.arange(6) % 10
  figures = bench._part_first_call(config, None, lambda name: (None, {}), x, y)
  here = calls[0]
  assert calls == [here, "/ref"] * 3                 # one of each per round, in turn
  assert figures["this checkout"]["time_s"] == 9.0 and figures["reference"]["time_s"] == 16.0   # medians
  assert figures["reference"]["stages_s"] == dict(check=16.0, compile=32.0)
  assert figures["this checkout"]["time_cached_s"] == pytest.approx(0.9)
  assert len(figures["reference"]["rounds"]) == 3 and figures["reference"]["fusions"] == 7
  # The nested programs (engine internals) are measured for this checkout only.
  assert figures["this checkout"]["programs"] == {"a": (4.5, 3), "b": (9.0, 7)}
  assert "programs" not in figures["reference"]
