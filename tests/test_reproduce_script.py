"""Smoke test of scripts/reproduce_mnist.py: --quick on tiny synthetic data, then a resumed rerun.

The attack is replaced by a cheap iterative gradient attack (the real L-BFGS attack compiles for ~35 s per
architecture on a loaded 2-core CPU), and ``train.train_model`` by one returning initialised parameters
(``train.get_or_train``'s run directories, result files and restore logic stay real); both are counted, so
the rerun proves that finished models and attack chunks are reused.
"""

import functools
import importlib.util
import json
import os
import pathlib
from typing import NamedTuple

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import pytest

from intriguing_jax import train
from intriguing_jax import transfer

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "reproduce_mnist.py"


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("reproduce_mnist_under_test", _SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)  # defines the flags once per test session
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["reproduce_mnist"])
  return mod


class _Result(NamedTuple):
  x_adv: jax.Array
  success: jax.Array
  c: jax.Array
  distortion: jax.Array


class CheapAttack:
  """20 signed-gradient steps of 0.03 towards the target, keeping each example's first success."""

  def __init__(self):
    self.calls = 0

  def __call__(self, logits_fn, x, target, *, params=None, **unused):
    self.calls += 1
    return _cheap_attack(logits_fn, params, x, target)


@functools.partial(jax.jit, static_argnums=0)
def _cheap_attack(logits_fn, params, x, target):
  """The jitted body of CheapAttack (one compile per architecture)."""
  fn = lambda v: logits_fn(params, v)

  def loss(v):
    logp = jax.nn.log_softmax(fn(v))
    return -jnp.sum(jnp.take_along_axis(logp, target[:, None], axis=1))

  def step(carry, _):
    v, best, done = carry
    v = jnp.clip(v - 0.03 * jnp.sign(jax.grad(loss)(v)), 0.0, 1.0)
    hit = jnp.argmax(fn(v), -1) == target
    new = hit & ~done
    best = jnp.where(new[:, None, None, None], v, best)
    return (v, best, done | hit), None

  done0 = jnp.argmax(fn(x), -1) == target
  (_, best, done), _ = jax.lax.scan(step, (x, x, done0), None, length=20)
  best = jnp.where(done[:, None, None, None], best, x)
  d = jnp.sqrt(jnp.mean((best - x).reshape(x.shape[0], -1) ** 2, axis=1))
  return _Result(best, done, jnp.ones_like(d), d)


def test_quick_main_on_synthetic_data_and_resume(script, tmp_path, monkeypatch):
  attack = CheapAttack()
  monkeypatch.setattr(transfer, "_default_attack_fn", lambda: attack)
  trained = []

  def fake_train_model(model, images, labels, config, *, seed=0, init_params=None, **unused):
    """Initialised, untrained parameters: get_or_train's run/restore logic stays real, no step compiles."""
    trained.append(config.task)
    variables = init_params or model.init(jax.random.PRNGKey(seed), jnp.asarray(images[:1]))
    return train.TrainResult(variables=variables, state=None, history=[])

  monkeypatch.setattr(train, "train_model", fake_train_model)
  workdir = str(tmp_path / "run")
  args = dict(workdir=workdir, quick=True, synthetic_data=300, num_train=300, num_examples=12, epochs=1,
              chunk_size=6, seeds=["0"])
  with flagsaver.flagsaver(**args):
    script.main(["reproduce_mnist"])
  assert attack.calls == 9 * 2  # 6 Table 1 + 3 Table 3 models, 2 chunks each
  assert len(trained) == 10  # 9 models + the autoencoder's unsupervised stage
  res = json.load(open(os.path.join(workdir, "results.json")))
  assert [r["model"] for r in res["table1"]] == [n for n, _ in transfer.TABLE1_MODELS]
  assert len(res["table2"]) == 8 and len(res["table3"]) == 3 and len(res["table4"]) == 8
  assert all(r["num_attacked"] == 12 for r in res["table1"])
  assert res["claims"] and res["readings"] and res["timings"]["total"] > 0
  text = open(os.path.join(workdir, "report.md")).read()
  for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "Readings"):
    assert heading in text
  for line in [ln for ln in text.splitlines() if ln.startswith("![")]:
    rel = line[line.index("](") + 2:line.rindex(")")]
    assert os.path.isfile(os.path.join(workdir, rel)), rel
  assert os.path.isfile(os.path.join(workdir, "report.html"))
  # Rerun: every model and every attack chunk is restored, nothing is recomputed.
  with flagsaver.flagsaver(**dict(args, figures=False)):
    script.main(["reproduce_mnist"])
  assert attack.calls == 18 and len(trained) == 10
  assert json.load(open(os.path.join(workdir, "results.json")))["table1"] == res["table1"]


def test_bad_flags_fail_clearly(script, tmp_path):
  from absl import app
  with flagsaver.flagsaver(workdir=str(tmp_path), tables=["5"], synthetic_data=20):
    with pytest.raises(app.UsageError, match="tables"):
      script.main(["reproduce_mnist"])
  with flagsaver.flagsaver(workdir=str(tmp_path), attack_option=["maxiter"], synthetic_data=20):
    with pytest.raises(app.UsageError, match="key=value"):
      script.main(["reproduce_mnist"])
  with pytest.raises(flags.IllegalFlagValueError):
    flags.FLAGS["num_examples"].parse("0")
