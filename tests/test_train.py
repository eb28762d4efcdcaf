"""Tests of intriguing_jax.train on tiny synthetic data (no real MNIST needed)."""

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


def _dropout_mlp():
  return models.get_model("fc16-16-10", dropout_rate=0.2)


def _tree_allclose(a, b, **kw):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


@pytest.mark.slow
def test_training_reduces_loss_resumes_exactly_and_falls_back_past_a_corrupted_checkpoint(tiny, tmp_path):
  x, y = tiny
  model = _dropout_mlp()   # dropout exercises the stored rng
  cfg = train.TrainConfig(weight_decay=(1e-4,), **_CFG)
  init = model.init(jax.random.PRNGKey(0), x[:1])
  full = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "full"))
  losses = [h["loss"] for h in full.history]
  assert losses[-1] < 0.9 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
  assert metrics.error_rate(model.apply, init, x, y) > 0.5 > 0.1 > metrics.error_rate(model.apply, full.variables, x, y)
  assert int(full.state.step) == 4 * (256 // 32)
  part = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "resumed"), stop_after_epoch=2)
  assert int(part.state.epoch) == 2 and checkpoint.latest_step(tmp_path / "resumed" / "ckpt") == 2
  resumed = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "resumed"))
  # Epochs 3-4 ran; 1-2 are read back from metrics.jsonl: the whole history, as in the uninterrupted run.
  no_time = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
  assert no_time(resumed.history) == no_time(full.history) and len(resumed.history) == 4
  _tree_allclose(resumed.state, full.state, rtol=0, atol=0)        # bit-for-bit on the same machine
  # A corrupted latest checkpoint: the run resumes from the previous one (with a warning) and ends the same.
  train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "fallback"), stop_after_epoch=3)
  (tmp_path / "fallback" / "ckpt" / "ckpt_00000003.msgpack").write_bytes(b"IJXCKPT1" + b"0" * 40)
  again = train.train_model(model, x, y, cfg, seed=1, workdir=str(tmp_path / "fallback"))
  assert no_time(again.history) == no_time(full.history)          # epoch 3 ran twice: the newest record
  _tree_allclose(again.state, full.state, rtol=0, atol=0)
  restored, step = checkpoint.restore_checkpoint(tmp_path / "full" / "ckpt", target=full.state)
  assert step == 4
  _tree_allclose(restored, full.state, rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"other settings \(config"):  # a workdir of other settings
    train.train_model(model, x, y, train.TrainConfig(epochs=4, batch_size=16), seed=1, workdir=str(tmp_path / "full"))


@pytest.mark.slow
def test_weight_decay_changes_gradient_as_documented(tiny):
  """One full-batch SGD step: params(λ) - params(0) = -lr · λ_l · W_l on kernels (½ λ Σ w²), 0 on biases."""
  x, y = tiny
  model = _small_mlp()
  lams = (1e-1, 2e-1, 3e-1)
  lr = 0.5
  base = dict(epochs=1, batch_size=x.shape[0], optimizer="sgd", schedule="constant", learning_rate=lr)
  with_wd = train.train_model(model, x, y, train.TrainConfig(weight_decay=lams, **base), seed=3)
  without = train.train_model(model, x, y, train.TrainConfig(weight_decay=(0.0,), **base), seed=3)
  init = model.init(jax.random.split(jax.random.PRNGKey(3))[0], x[:1])["params"]
  for lam, name in zip(lams, ["hidden_0", "hidden_1", "output"]):
    w0 = np.asarray(init[name]["kernel"])
    diff = np.asarray(with_wd.variables["params"][name]["kernel"]) - np.asarray(without.variables["params"][name]["kernel"])
    np.testing.assert_allclose(diff, -lr * lam * w0, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(with_wd.variables["params"][name]["bias"], without.variables["params"][name]["bias"],
                               atol=1e-7)


def test_weight_decay_penalty_value():
  params = {"hidden_0": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones((4,))},
            "output": {"kernel": jnp.full((4, 2), 1.0), "bias": jnp.ones((2,))}}
  paths = [("hidden_0",), ("output",)]
  lam = jnp.asarray([0.5, 3.0])
  # ½ 0.5 (12 · 4) + ½ 3 · 8; a frozen layer is not decayed
  assert float(train.weight_decay_penalty(params, lam, paths)) == pytest.approx(12.0 + 12.0)
  assert float(train.weight_decay_penalty(params, lam, paths, trainable=("output",))) == pytest.approx(12.0)
  model = _small_mlp()
  assert train.decay_layer_paths(model, (28, 28, 1)) == [("hidden_0",), ("hidden_1",), ("output",)]
  assert train.decay_layer_paths(model, (28, 28, 1), "autoencode") == [("encoder",), ("decoder",)]


@pytest.mark.slow
def test_sweep_equals_separate_runs(tiny):
  x, y = tiny
  model = _dropout_mlp()
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


@pytest.mark.slow
def test_get_or_train_restores_and_checks_settings_data_and_shapes(tiny, tmp_path):
  x, y = tiny
  kw = dict(workdir=str(tmp_path), model_kwargs={"dropout_rate": 0.2}, epochs=4, batch_size=32, learning_rate=1e-2)
  model, variables = train.get_or_train("fc16-16-10", x, y, **kw)
  run_dirs = os.listdir(tmp_path)
  assert len(run_dirs) == 1
  result = json.loads((tmp_path / run_dirs[0] / "result.json").read_text())
  assert 0.0 <= result["train_error"] <= 1.0 and result["settings"]["config"]["epochs"] == 4
  _, again = train.get_or_train("fc16-16-10", x, y, **kw)
  _tree_allclose(again, variables, rtol=0, atol=0)
  # A corrupted final.msgpack or result.json is reported and the run finished again from its intact
  # checkpoints: the same variables (it was a CheckpointError traceback).
  flip_last_bit = lambda b: b[:-1] + bytes([b[-1] ^ 1])
  for name, damage in (("final.msgpack", flip_last_bit), ("result.json", lambda b: b[:9])):
    path = tmp_path / run_dirs[0] / name
    path.write_bytes(damage(path.read_bytes()))
    _, recovered = train.get_or_train("fc16-16-10", x, y, **kw)
    _tree_allclose(recovered, variables, rtol=0, atol=0)
    checkpoint.load_pytree(tmp_path / run_dirs[0] / "final.msgpack")   # intact again
  kw["run_name"] = run_dirs[0]
  with pytest.raises(ValueError, match=r"other settings \(data_fingerprint\)"):
    train.get_or_train("fc16-16-10", x[:128], y[:128], **kw)
  with pytest.raises(ValueError, match=r"other settings \(config\)"):
    train.get_or_train("fc16-16-10", x, y, **{**kw, "batch_size": 64})
  with pytest.raises(ValueError, match="unknown TrainConfig overrides"):
    train.get_or_train("fc16-16-10", x, y, workdir=str(tmp_path), lr=1.0)
  # A final.msgpack of another architecture is refused at restore, naming the shapes.
  checkpoint.save_pytree(tmp_path / run_dirs[0] / "final.msgpack",
                         models.get_model("fc8-16-10").init(jax.random.PRNGKey(0), x[:1]))
  with pytest.raises(checkpoint.CheckpointError, match=r"\['hidden_0'\]\['kernel'\]: \(784, 8\) in the file"):
    train.get_or_train("fc16-16-10", x, y, **kw)
  with pytest.raises(checkpoint.CheckpointError, match="another architecture"):
    train.load_run(str(tmp_path / run_dirs[0]), model)


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
  # Labels outside the model's classes (trained to NaN losses or quietly before); the train/eval sets.
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
    train.train_model(model, x, y + 1, cfg)
  with pytest.raises(ValueError, match="eval_data labels"):
    train.train_model(model, x, y, cfg, eval_data=(x, y - 1))
  with pytest.raises(ValueError, match=r"labels must lie"):
    train.train_sweep(model, x, y + 1, cfg, weight_decays=[1e-4], seeds=[0])
  # A batch larger than the data: named, not the cosine schedule's "decay_steps=0".
  with pytest.raises(ValueError, match="larger than the"):
    train.train_model(model, x[:16], y[:16], cfg)
  for name in ("fc16-10", "fc16-16-16-10", "fc16-16-5"):   # a recipe only for "fc<w1>-<w2>-10"
    with pytest.raises(ValueError, match="no training recipe"):
      train.recipe(name)
  assert train.recipe("fc16-16-10")["model"] == "fc16-16-10"
  with pytest.raises(ValueError, match="list of param names"):   # was split into characters
    train.TrainConfig(trainable="output")
  with pytest.raises(ValueError, match="epochs"):
    train.TrainConfig(epochs=True)
  with pytest.raises(ValueError, match="init_params do not fit"):   # was Flax's ScopeParamShapeError
    other = models.get_model("fc8-10").init(jax.random.PRNGKey(0), x[:1])
    train.train_model(model, x, y, cfg, init_params=other)
  with pytest.raises(ValueError, match="warmup_epochs"):   # was silently ignored
    train.TrainConfig(schedule="constant", warmup_epochs=1.0)


def _set_ae_recipe(monkeypatch, *, pretrain_epochs, epochs):
  """A tiny two-stage (autoencoder pre-training, then softmax) recipe registered as "ae32-10"."""
  monkeypatch.setitem(train.RECIPES, "ae32-10", {
      "model": "ae32-10",
      "pretrain": dict(task="autoencode", epochs=pretrain_epochs, batch_size=64, weight_decay=(1e-3, 1e-3)),
      "config": dict(epochs=epochs, batch_size=64, learning_rate=1e-2, weight_decay=(1e-6,))})


@pytest.mark.slow
def test_get_or_train_two_stage_autoencoder_recipe(tiny, tmp_path, monkeypatch):
  """The AE recipe: sparse-AE pre-training, softmax on the frozen code, merged variables, restorable; an
  ``epochs`` override shortens both stages."""
  x, y = tiny
  _set_ae_recipe(monkeypatch, pretrain_epochs=3, epochs=3)
  model, variables = train.get_or_train("ae32-10", x, y, workdir=str(tmp_path), epochs=2, run_name="ae")
  assert set(variables["params"]) == {"encoder", "decoder", "output"}
  pre, last_epoch = checkpoint.restore_checkpoint(tmp_path / "ae" / "pretrain" / "ckpt")
  assert last_epoch == 2  # the recipe's 3 pre-training epochs were cut to 2
  np.testing.assert_array_equal(variables["params"]["encoder"]["kernel"], pre["params"]["encoder"]["kernel"])
  assert model.apply(variables, x[:4]).shape == (4, 10)
  result = json.loads((tmp_path / "ae" / "result.json").read_text())
  assert result["train_error"] < 0.9
  assert result["settings"]["pretrain_config"]["epochs"] == 2 and result["settings"]["config"]["epochs"] == 2
  _, again = train.get_or_train("ae32-10", x, y, workdir=str(tmp_path), epochs=2, run_name="ae")
  _tree_allclose(again, variables, rtol=0, atol=0)
  # The classifier stage with trainable=("output",) on the whole model keeps the encoder frozen.
  cfg = train.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-2, weight_decay=(0.0, 1e-6),
                          trainable=("output",))
  clf = train.train_model(model, x, y, cfg, init_params=pre["params"])   # bare params (or {"params": ...})
  np.testing.assert_array_equal(clf.variables["params"]["encoder"]["kernel"], pre["params"]["encoder"]["kernel"])
  assert not np.allclose(clf.variables["params"]["output"]["kernel"], pre["params"]["output"]["kernel"])


def test_reported_errors_use_float32_matmuls():
  # Reported errors must not depend on the backend's default float32 matmul (TF32 on a GPU): the counting
  # programs (train's, also used by adversarial_training, single and stacked) trace the model under "highest",
  # whatever the ambient setting.
  model = models.get_model("fc16-16-10")
  config = train.TrainConfig(epochs=1, batch_size=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  x, y = jnp.zeros((3, 28, 28, 1)), jnp.zeros((3,), jnp.int32)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  for fn, p in ((train.count_errors_fn(model), params),
                (train.count_errors_fn(model, stacked=True), stacked)):
    with jax.default_matmul_precision("default"):
      jaxpr = jax.make_jaxpr(fn)(p, x, y)
    precisions = dot_precisions(jaxpr.jaxpr)
    hi = jax.lax.Precision.HIGHEST
    assert len(precisions) == 3 and all(p == (hi, hi) for p in precisions), precisions


@pytest.mark.slow
def test_run_experiment_trains_restores_and_sweeps(synthetic_idx_dir, tmp_path):
  from intriguing_jax.configs import train as train_configs  # pylint: disable=g-import-not-at-top
  config = train_configs.get_config("fc16-16-10")
  # P1 = 256 of the 512 synthetic training images: the compiled programs of the tests above are reused.
  config.split, config.epochs, config.model_kwargs.dropout_rate = "p1", 4, 0.2
  config.overrides.batch_size, config.overrides.learning_rate = 32, 1e-2
  out = train.run_experiment(config, str(tmp_path), synthetic_idx_dir)
  (row,) = out["rows"]
  assert set(row) == {"train_error", "test_error", "p1_error", "p2_error"} and row["train_error"] == row["p1_error"]
  assert json.loads((tmp_path / os.path.basename(out["run_dir"]) / "errors.json").read_text())["rows"] == [row]
  assert train.run_experiment(config, str(tmp_path), synthetic_idx_dir)["rows"] == [row]  # restored
  config.sweep_weight_decays = (1e-4, 1.0)
  out = train.run_experiment(config, str(tmp_path), synthetic_idx_dir)
  assert out["run_dir"].endswith("_sweep") and [r["weight_decay"][0] for r in out["rows"]] == pytest.approx([1e-4, 1])
  config.overrides.optimizer = "rmsprop"
  with pytest.raises(ValueError, match="optimizer"):
    train.run_experiment(config, str(tmp_path), "/nonexistent")  # validated before the data are read
