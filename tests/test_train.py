"""Tests of intriguing_jax.train on tiny synthetic data (no real MNIST needed)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_precisions
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import models
from intriguing_jax import train


@pytest.fixture(scope="module")
def tiny():
  x, y = data.synthetic_mnist(256, seed=0)
  return np.asarray(x, np.float32), np.asarray(y, np.int32)


# One static config shared by several tests, so its compiled epoch is reused (λ and seeds are traced).
_CFG = dict(epochs=4, batch_size=32, learning_rate=1e-2)


def _small_mlp():
  return models.get_model("fc16-16-10")


def _tree_allclose(a, b, **kw):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def test_tiny_training_reduces_loss_and_error(tiny):
  x, y = tiny
  model = _small_mlp()
  init = model.init(jax.random.PRNGKey(0), x[:1])
  err0 = metrics.error_rate(functools.partial(model.apply, init), x, y)
  cfg = train.TrainConfig(weight_decay=(1e-4,), **_CFG)
  res = train.train_model(model, x, y, cfg, seed=0)
  losses = [h["loss"] for h in res.history]
  assert losses[-1] < 0.9 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
  err1 = metrics.error_rate(functools.partial(model.apply, res.variables), x, y)
  assert err0 > 0.5 and err1 < 0.1
  assert int(res.state.step) == 4 * (256 // 32)


@pytest.mark.parametrize("form,data_term,scale", [("per_unit", "mean", None), ("half_sum", "sum", 0.5)])
def test_weight_decay_changes_gradient_as_documented(tiny, form, data_term, scale):
  """One full-batch SGD step: params(λ) - params(0) = -lr · 2 λ_l · scale_l · W_l on kernels, 0 on biases.

  scale_l = 1/k_l (k_l = output units) for "per_unit"; divided by N for data_term="sum".
  """
  x, y = tiny
  model = _small_mlp()
  lams = (1e-1, 2e-1, 3e-1)
  lr = 0.5
  base = dict(epochs=1, batch_size=x.shape[0], optimizer="sgd", schedule="constant", learning_rate=lr,
              decay_form=form, data_term=data_term)
  with_wd = train.train_model(model, x, y, train.TrainConfig(weight_decay=lams, **base), seed=3)
  without = train.train_model(model, x, y, train.TrainConfig(weight_decay=(0.0,), **base), seed=3)
  init = model.init(jax.random.split(jax.random.PRNGKey(3))[0], x[:1])["params"]
  for lam, (name, k) in zip(lams, [("hidden_0", 16), ("hidden_1", 16), ("output", 10)]):
    s = (1.0 / k) if scale is None else scale
    if data_term == "sum":
      s /= x.shape[0]
    w0 = np.asarray(init[name]["kernel"])
    diff = np.asarray(with_wd.variables["params"][name]["kernel"]) - np.asarray(without.variables["params"][name]["kernel"])
    np.testing.assert_allclose(diff, -lr * 2 * lam * s * w0, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(with_wd.variables["params"][name]["bias"], without.variables["params"][name]["bias"],
                               atol=1e-7)


def test_weight_decay_penalty_value():
  params = {"hidden_0": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones((4,))},
            "output": {"kernel": jnp.full((4, 2), 1.0), "bias": jnp.ones((2,))}}
  specs = [(("hidden_0",), 4), (("output",), 2)]
  lam = jnp.asarray([0.5, 3.0])
  cfg = train.TrainConfig(decay_form="per_unit")
  # 0.5 * (12 * 4) / 4 + 3 * 8 / 2 = 6 + 12
  assert float(train.weight_decay_penalty(params, lam, specs, cfg)) == pytest.approx(18.0)
  cfg_b = train.TrainConfig(decay_bias=True, decay_form="half_sum")
  # 0.5*0.5*(48+4) + 0.5*3*(8+2)
  assert float(train.weight_decay_penalty(params, lam, specs, cfg_b)) == pytest.approx(13.0 + 15.0)


def test_sweep_equals_separate_runs(tiny):
  x, y = tiny
  model = _small_mlp()
  cfg = train.TrainConfig(**_CFG)
  lams = [(1e-3, 1e-3, 1e-4), (1e-1, 1e-1, 1e-1)]
  seeds = [0, 5]
  sweep = train.train_sweep(model, x, y, cfg, weight_decays=lams, seeds=seeds, data_seed=7)
  assert jax.tree_util.tree_leaves(sweep.stacked_variables)[0].shape[0] == 2
  for lam, seed, got in zip(lams, seeds, sweep.variables):
    single = train.train_model(model, x, y, train.TrainConfig(**{**cfg.to_dict(), "weight_decay": lam}),
                               seed=seed, data_seed=7)
    # vmapped matmuls may round differently; 32 Adam steps keep the difference at float noise.
    _tree_allclose(got, single.variables, rtol=1e-4, atol=1e-5)
  # The members really differ (different λ and seeds).
  assert not np.allclose(sweep.variables[0]["params"]["output"]["kernel"],
                         sweep.variables[1]["params"]["output"]["kernel"])


def test_checkpoint_resume_equals_uninterrupted_run(tiny, tmp_path):
  x, y = tiny
  model = models.get_model("fc16-16-10", dropout_rate=0.2)   # dropout exercises the stored rng
  cfg = train.TrainConfig(epochs=4, batch_size=32, learning_rate=1e-2, weight_decay=(1e-3,))
  full = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "full"))
  part = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "resumed"), stop_after_epoch=2)
  assert int(part.state.epoch) == 2
  assert checkpoint.latest_step(tmp_path / "resumed" / "ckpt") == 2
  resumed = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "resumed"))
  assert [h["epoch"] for h in resumed.history] == [3, 4]           # only the remaining epochs ran
  assert int(resumed.state.step) == int(full.state.step)
  _tree_allclose(resumed.state, full.state, rtol=0, atol=0)        # bit-for-bit on the same machine
  # Round trip of a whole TrainState through the atomic checkpoint files.
  restored, step = checkpoint.restore_checkpoint(tmp_path / "full" / "ckpt", target=full.state)
  assert step == 4
  _tree_allclose(restored, full.state, rtol=0, atol=0)
  # A workdir holding other settings is refused.
  with pytest.raises(ValueError, match="different settings"):
    train.train_model(model, x, y, train.TrainConfig(epochs=4, batch_size=16), seed=1,
                      workdir=str(tmp_path / "full"))


def test_get_or_train_restores_and_checks_data(tiny, tmp_path):
  x, y = tiny
  model, variables = train.get_or_train("fc16-16-10", x, y, workdir=str(tmp_path), epochs=1, batch_size=64)
  run_dirs = os.listdir(tmp_path)
  assert len(run_dirs) == 1
  result = json.loads((tmp_path / run_dirs[0] / "result.json").read_text())
  assert 0.0 <= result["train_error"] <= 1.0 and result["config"]["epochs"] == 1
  _, again = train.get_or_train("fc16-16-10", x, y, workdir=str(tmp_path), epochs=1, batch_size=64)
  _tree_allclose(again, variables, rtol=0, atol=0)
  with pytest.raises(ValueError, match="another dataset"):
    train.get_or_train("fc16-16-10", x[:128], y[:128], workdir=str(tmp_path), epochs=1, batch_size=64)
  with pytest.raises(ValueError, match="unknown TrainConfig overrides"):
    train.get_or_train("fc16-16-10", x, y, workdir=str(tmp_path), lr=1.0)


def test_get_or_train_accepts_runs_from_before_a_config_field_existed(tiny, tmp_path):
  x, y = tiny
  kw = dict(workdir=str(tmp_path), epochs=1, batch_size=64)
  _, variables = train.get_or_train("fc16-16-10", x, y, **kw)
  (run_dir,) = os.listdir(tmp_path)
  path = tmp_path / run_dir / "result.json"
  result = json.loads(path.read_text())
  # An older run: its stored config lacks a field TrainConfig has now (here "momentum", default 0.9).
  assert result["config"]["momentum"] == train.TrainConfig().momentum
  del result["config"]["momentum"]
  path.write_text(json.dumps(result))
  _, again = train.get_or_train("fc16-16-10", x, y, **kw)  # restored: the run used the default behaviour
  _tree_allclose(again, variables, rtol=0, atol=0)
  # ... but not when this call asks for another value of the missing field.
  with pytest.raises(ValueError, match=r"other settings \(momentum\)"):
    train.get_or_train("fc16-16-10", x, y, run_name=run_dir, momentum=0.5, **kw)
  # A stored key TrainConfig no longer has, or a changed value, always differs.
  cfg = train.TrainConfig(epochs=1, batch_size=64)
  stored = json.loads(json.dumps(cfg.to_dict()))
  assert train.config_mismatch(stored, cfg) == []
  assert train.config_mismatch(dict(stored, gone=1), cfg) == ["gone"]
  assert train.config_mismatch(dict(stored, epochs=2), cfg) == ["epochs"]
  del stored["momentum"]
  assert train.config_mismatch(stored, cfg) == []
  assert train.config_mismatch(stored, train.TrainConfig(epochs=1, batch_size=64, momentum=0.5)) == ["momentum"]


def test_autoencoder_two_stages_freeze_encoder(tiny):
  x, y = tiny
  model = models.get_model("ae32-10")
  pre_cfg = train.TrainConfig(task="autoencode", epochs=2, batch_size=32, weight_decay=(1e-3, 1e-3))
  pre = train.train_model(model, x, y, pre_cfg)
  assert pre.history[-1]["loss"] < pre.history[0]["loss"]
  cfg = train.TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2, weight_decay=(0.0, 1e-6),
                          trainable=("output",))
  clf = train.train_model(model, x, y, cfg, init_params=pre.variables)
  np.testing.assert_array_equal(clf.variables["params"]["encoder"]["kernel"], pre.variables["params"]["encoder"]["kernel"])
  assert not np.allclose(clf.variables["params"]["output"]["kernel"], pre.variables["params"]["output"]["kernel"])


def test_bad_inputs_raise_clear_errors(tiny):
  x, y = tiny
  model = _small_mlp()
  cfg = train.TrainConfig(epochs=1, batch_size=32)
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    train.train_model(model, bad, y, cfg)
  with pytest.raises(ValueError, match="labels shape"):
    train.train_model(model, x, y[:10], cfg)
  with pytest.raises(ValueError, match="weight layers"):
    train.train_model(model, x, y, train.TrainConfig(epochs=1, weight_decay=(1e-3, 1e-3)))
  with pytest.raises(ValueError, match="optimizer"):
    train.TrainConfig(optimizer="rmsprop")
  with pytest.raises(ValueError, match="epochs"):
    train.TrainConfig(epochs=0)
  with pytest.raises(ValueError, match="λ"):
    train.TrainConfig(weight_decay=(-1.0,))


def _set_ae_recipe(monkeypatch, *, pretrain_epochs, epochs):
  """A tiny two-stage (autoencoder pre-training, then softmax) recipe registered as "ae32-10"."""
  monkeypatch.setitem(train.RECIPES, "ae32-10", {
      "model": "ae32-10",
      "pretrain": dict(task="autoencode", epochs=pretrain_epochs, batch_size=64, weight_decay=(1e-3, 1e-3)),
      "config": dict(epochs=epochs, batch_size=64, learning_rate=1e-2, weight_decay=(1e-6,))})


def test_get_or_train_two_stage_autoencoder_recipe(tiny, tmp_path, monkeypatch):
  """The AE recipe path: pre-train, softmax on the frozen code, merged variables, restorable."""
  x, y = tiny
  _set_ae_recipe(monkeypatch, pretrain_epochs=1, epochs=2)
  model, variables = train.get_or_train("ae32-10", x, y, workdir=str(tmp_path))
  assert set(variables["params"]) == {"encoder", "decoder", "output"}
  pre, _ = checkpoint.restore_checkpoint(tmp_path / "ae32-10" / "pretrain" / "ckpt")
  np.testing.assert_array_equal(variables["params"]["encoder"]["kernel"], pre["params"]["encoder"]["kernel"])
  assert model.apply(variables, x[:4]).shape == (4, 10)
  result = json.loads((tmp_path / "ae32-10" / "result.json").read_text())
  assert result["train_error"] < 0.9
  _, again = train.get_or_train("ae32-10", x, y, workdir=str(tmp_path))
  _tree_allclose(again, variables, rtol=0, atol=0)
  assert result["pretrain_config"]["epochs"] == 1


def test_get_or_train_epochs_override_shortens_the_pretraining_too(tiny, tmp_path, monkeypatch):
  x, y = tiny
  _set_ae_recipe(monkeypatch, pretrain_epochs=3, epochs=3)
  train.get_or_train("ae32-10", x, y, workdir=str(tmp_path), epochs=1, run_name="short")
  result = json.loads((tmp_path / "short" / "result.json").read_text())
  assert result["pretrain_config"]["epochs"] == 1 and result["config"]["epochs"] == 1
  _, last_epoch = checkpoint.restore_checkpoint(tmp_path / "short" / "pretrain" / "ckpt")
  assert last_epoch == 1  # the recipe's 3 pre-training epochs were cut to 1


def test_reported_errors_use_float32_matmuls():
  # Reported errors must not depend on the backend's default float32 matmul (TF32 on a GPU): the counting
  # programs (train's, also used by adversarial_training, single and stacked) trace the model under "highest",
  # whatever the ambient setting.
  model = models.get_model("fc16-16-10")
  config = train.TrainConfig(epochs=1, batch_size=4)
  count_fn = train._compiled_fns(model, config, (28, 28, 1), 8, False)[4]  # pylint: disable=protected-access
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  x, y = jnp.zeros((3, 28, 28, 1)), jnp.zeros((3,), jnp.int32)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  for fn, p in ((count_fn, params), (train.count_errors_fn(model), params),
                (train.count_errors_fn(model, stacked=True), stacked)):
    with jax.default_matmul_precision("default"):
      jaxpr = jax.make_jaxpr(fn)(p, x, y)
    precisions = dot_precisions(jaxpr.jaxpr)
    hi = jax.lax.Precision.HIGHEST
    assert len(precisions) == 3 and all(p == (hi, hi) for p in precisions), precisions
