"""Tests of reproduce.run_experiment and scripts/reproduce_mnist.py on tiny synthetic data.

In the in-process test the attack is replaced by a cheap signed-gradient attack and ``train.get_or_train``
by one returning initialised parameters (its restore logic is tested in test_train.py); both are recorded,
so the test checks the run names of every model and that a rerun reuses every attack chunk.
The slow test runs the script itself, with the real training and the real attack, on the "smoke" preset.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from intriguing_jax import attack
from intriguing_jax import models
from intriguing_jax import reproduce
from intriguing_jax import train
from intriguing_jax import types
from intriguing_jax.configs import reproduce_mnist

_REPO = pathlib.Path(__file__).resolve().parents[1]


class _Result(NamedTuple):
  x_adv: jax.Array
  success: jax.Array
  c: jax.Array


@functools.partial(jax.jit, static_argnums=0)
def _cheap_attack(apply_fn, params, x, target):
  """20 signed-gradient steps of 0.03 toward the target, keeping each example's first success."""
  def loss(v):
    logp = jax.nn.log_softmax(apply_fn(params, v))
    return -jnp.sum(jnp.take_along_axis(logp, target[:, None], axis=1))

  def step(carry, _):
    v, best, done = carry
    v = jnp.clip(v - 0.03 * jnp.sign(jax.grad(loss)(v)), 0.0, 1.0)
    hit = jnp.argmax(apply_fn(params, v), -1) == target
    best = jnp.where((hit & ~done)[:, None, None, None], v, best)
    return (v, best, done | hit), None

  done0 = jnp.argmax(apply_fn(params, x), -1) == target
  (_, best, done), _ = jax.lax.scan(step, (x, x, done0), None, length=20)
  return _Result(jnp.where(done[:, None, None, None], best, x), done, jnp.ones(x.shape[:1]))


def _smoke_config(**overrides):
  config = reproduce_mnist.get_config("smoke")
  config.update(overrides)
  return config


@pytest.mark.slow
def test_run_experiment_on_synthetic_data_and_resume(tmp_path, monkeypatch):
  calls, runs, trained = [], [], {}

  def cheap(apply_fn, params, x, target, options=attack.AttackOptions()):
    calls.append(options)
    return _cheap_attack(types.static_fn(apply_fn), params, jnp.asarray(x), jnp.asarray(target))

  def fake_get_or_train(name, images, labels, *, workdir, seed, epochs, run_name):
    """Random parameters of the recipe's model, recorded (get_or_train is tested in test_train.py)."""
    runs.append((name, run_name, seed, epochs, images.shape[0], workdir))
    if run_name not in trained:
      rec = train.recipe(name)
      model = models.get_model(rec["model"], **rec.get("model_kwargs", {}))
      trained[run_name] = model, random_variables(model, images.shape[1:], seed=len(trained), scale=0.1)
    return trained[run_name]

  monkeypatch.setattr(attack, "lbfgs_attack", cheap)
  monkeypatch.setattr(train, "get_or_train", fake_get_or_train)
  workdir = str(tmp_path / "run")
  res = reproduce.run_experiment(_smoke_config(figures=False), workdir)
  assert len(calls) == 9 * 2 and calls[0].maxiter == 10  # 6 Table 1 + 3 Table 3 models, 2 chunks each
  # The run names of scripts/train.py, tagged with the data (synthetic, first 300; P1/P2 halves of them).
  tag = train.default_run_name
  assert [r[:3] for r in runs] == (
      [(rcp, tag(rcp, epochs=1, data_tag="synthetic_first300"), 0) for _, rcp, *_ in reproduce.TABLE1_MODELS]
      + [(rcp, tag(rcp, seed=off, epochs=1, data_tag=f"{part}_synthetic_first300"), off)
         for _, rcp, part, off in reproduce.TABLE3_MODELS])
  assert [r[4] for r in runs] == [300] * 6 + [150] * 3 and runs[0][5] == os.path.join(workdir, "models")
  assert [r["model"] for r in res["table1"]] == [n for n, *_ in reproduce.TABLE1_MODELS]
  assert len(res["table2"]) == 8 and len(res["table3"]) == 3 and len(res["table4"]) == 11
  assert len(res["table4_diagonal"]) == 3 * 2 * 2  # models x readings x clipping
  assert "av_min_distortion_unrefined" not in res["table1"][0]  # the smoke attack does not refine
  assert all(r["num_attacked"] == 12 for r in res["table1"])
  assert res["claims"] and res["readings"] and res["timings"]["total"] > 0
  assert res["config"]["attack"] == {"maxiter": 10, "num_bisection": 2, "refine": False}
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert json.dumps(saved["table4"]) == json.dumps(res["table4"])  # (NaN != NaN: compare the texts)
  text = open(os.path.join(workdir, "report.md")).read()
  assert all(heading in text for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Readings",
                                             "Table 4's magnified diagonal", "one factor per set"))
  assert "Transfer between the two P1 models in both directions (ours / paper): at the original distortion: " \
         "FC100-100-10 -> FC123-456-10 " in text and "(ours / paper)" in text
  # Rerun: every attack chunk is reused.
  again = reproduce.run_experiment(_smoke_config(figures=False), workdir)
  assert len(calls) == 18 and json.dumps(again["table4"]) == json.dumps(res["table4"])
  # A refining attack: every set attacked again with refine=False (the paper's method alone), reported beside.
  config = _smoke_config(figures=False, tables=(1, 3))
  config.attack.refine = True
  both = reproduce.run_experiment(config, str(tmp_path / "both"))
  assert [c.refine for c in calls[18:]] == [True] * 12 + [False] * 12 + [True] * 6 + [False] * 6
  for t, key in (("table1", "av_min_distortion"), ("table3", "min_av_distortion")):
    assert all(np.isfinite(r[key + "_unrefined"]) and 0 <= r["success_rate_unrefined"] <= 1 for r in both[t])
  assert "paper's method (refine=False)" in open(tmp_path / "both" / "report.md").read()


def test_equal_modules_of_train_models_share_one_compiled_attack(monkeypatch, tmp_path):
  """Each restore builds its own module; the attack's compile key (``types.static_fn``) still equates the
  ``apply`` of equal modules, so the three FC10s compile one attack."""
  fake = lambda name, *unused, **kw: (models.get_model(train.recipe(name)["model"]), {"run": kw["run_name"]})
  monkeypatch.setattr(train, "get_or_train", fake)
  ms = reproduce.train_models(reproduce.TABLE1_MODELS[:4], {"train": (np.zeros((4, 28, 28, 1)), np.zeros(4))},
                              workdir=str(tmp_path))
  keys = [types.static_fn(m.apply_fn) for m in ms.values()]
  assert keys[0] == keys[1] == keys[2] and keys[0] != keys[3]  # the FC10s: one compiled attack
  assert len({hash(k) for k in keys[:3]}) == 1
  assert [m.params["run"] for m in ms.values()] == ["fc10-1e-4", "fc10-1e-2", "fc10-1", "fc100-100-10"]


@pytest.mark.parametrize("field, value, match", [
    ("tables", (5,), "tables"), ("seeds", (0, 0), "seeds"), ("num_examples", 0, "num_examples"),
    ("chunk_size", 0, "chunk_size")])
def test_bad_config_fails_before_any_work(tmp_path, field, value, match):
  config = _smoke_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    reproduce.run_experiment(config, str(tmp_path))
  config = _smoke_config()
  config.attack.maxiter = 0
  with pytest.raises(ValueError, match="config.attack: maxiter"):
    reproduce.run_experiment(config, str(tmp_path))
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="preset"):
    reproduce_mnist.get_config("bogus")


def _script(*args, timeout=600):
  return subprocess.run([sys.executable, str(_REPO / "scripts" / "reproduce_mnist.py"), *args], cwd=_REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_script_smoke_end_to_end(tmp_path):
  """The script with the real training and attack on synthetic data; --help exits 0."""
  assert _script("--help", timeout=120).returncode == 0
  workdir = str(tmp_path / "run")
  proc = _script("--config=intriguing_jax/configs/reproduce_mnist.py:smoke", f"--workdir={workdir}",
                 "--config.tables=(3,4)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.load(open(os.path.join(workdir, "results.json")))
  assert [r["model"] for r in res["table3"]] == [n for n, *_ in reproduce.TABLE3_MODELS]
  assert len(res["table4"]) == 11 and len(res["bracket_test"]) == 3
  assert all(r["violations"] == 0 for r in res["bracket_test"])  # the real attack never beats the certificate
  assert all(r["success_rate"] > 0 for r in res["table3"]), res["table3"]
  assert len(os.listdir(os.path.join(workdir, "models"))) == 3  # trained and saved
  assert "config:" not in proc.stderr  # the config is logged at --v=1 only
  text = open(os.path.join(workdir, "report.md")).read()
  images = [ln[ln.index("](") + 2:ln.rindex(")")] for ln in text.splitlines() if ln.startswith("![")]
  assert len(images) == 5 and all(os.path.isfile(os.path.join(workdir, rel)) for rel in images)
