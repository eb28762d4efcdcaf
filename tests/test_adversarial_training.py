"""Tests of intriguing_jax.adversarial_training on a tiny synthetic problem (no real MNIST needed).

One pool configuration is shared by every training test (and the in-process experiment), so the (large)
attack program compiles once per file: the epoch function is cached on the settings.
"""

import dataclasses
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import random_variables
from intriguing_jax import adversarial_training as at
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import models
from intriguing_jax import train

_xent = optax.softmax_cross_entropy_with_integer_labels
EPOCHS = 4
BATCH = 32
NUM_TRAIN = 256
STEPS = NUM_TRAIN // BATCH  # 8 steps per epoch
CONFIG = train.TrainConfig(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-2, weight_decay=(1e-4,))
POOL = at.PoolConfig(layers=("input", "hidden_1"), pool_size=32, refresh_every=3, refresh_fraction=0.25,
                     mix_ratio=0.5, warmup_steps=2, attack=dataclasses.replace(at.POOL_ATTACK, maxiter=5, refine=False))


def _model():
  return models.get_model("fc16-16-10")


@pytest.fixture(scope="module")
def tiny():
  x, y = data.synthetic_mnist(NUM_TRAIN, seed=0)
  xt, yt = data.synthetic_mnist(128, seed=1)
  return np.asarray(x), np.asarray(y), np.asarray(xt), np.asarray(yt)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
  """The uninterrupted reference run (EPOCHS epochs, written to a workdir)."""
  x, y, xt, yt = tiny
  workdir = str(tmp_path_factory.mktemp("adv_full"))
  return at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=0, workdir=workdir, eval_data=(xt, yt)), workdir


def pool_schedule(step, config):
  """What happens to the pools before step ``step`` (0-based): "fill", "refresh" or "none"."""
  if step == config.warmup_steps:
    return "fill"
  due = step >= config.warmup_steps and (step - config.warmup_steps) % config.refresh_every == 0
  return "refresh" if due else "none"


def _trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ----------------------------------------------------------------------------------------------------
# Pure pieces.


def test_mixed_batch_sizes_give_the_configured_ratio():
  for ratio, layers, batch in [(0.5, ("input",), 128), (0.25, ("input", "hidden_0", "hidden_1"), 96),
                               (0.8, ("input", "hidden_0"), 10)]:
    cfg = at.PoolConfig(layers=layers, mix_ratio=ratio)
    sizes = at.mixed_batch_sizes(batch, cfg)
    assert tuple(sizes) == layers
    total = sum(sizes.values())
    assert abs(total / (total + batch) - ratio) <= 0.5 / (total + batch)  # rounding of one example
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_mixed_batch_sizes_reject_an_empty_pool_share():
  with pytest.raises(ValueError, match="mix_ratio"):
    at.mixed_batch_sizes(4, at.PoolConfig(layers=("input", "hidden_0", "hidden_1"), mix_ratio=0.2))


def test_sample_mixed_batch_draws_from_each_pool(tiny):
  x, y, _, _ = tiny
  model = _model()
  params = random_variables(model, x.shape[1:], scale=0.1)["params"]
  layers = at.model_pool_layers(model, POOL.layers)
  state = at.init_state(layers, params, train.make_optimizer(CONFIG, STEPS, params), jnp.asarray(x[:1]), POOL,
                        jax.random.PRNGKey(1))
  assert state.pools["input"].shape == (32, 28, 28, 1) and state.pools["hidden_1"].shape == (32, 16)
  # Mark every stored example with its slot so that samples can be traced back to the pool.
  pools = {k: v + jnp.arange(32, dtype=v.dtype).reshape((32,) + (1,) * (v.ndim - 1)) for k, v in state.pools.items()}
  state = state.replace(pools=pools, pool_labels={k: jnp.arange(32, dtype=jnp.int32) % 10 for k in pools})
  sizes = at.mixed_batch_sizes(BATCH, POOL)
  batch = at.sample_mixed_batch(state, jax.random.PRNGKey(2), sizes)
  for name, (h, lab) in batch.items():
    assert h.shape[0] == sizes[name] == lab.shape[0]
    slot = np.asarray(h).reshape(h.shape[0], -1)[:, 0].astype(int)
    np.testing.assert_array_equal(np.asarray(lab), slot % 10)


def test_pool_layers_are_the_network_above_the_layer(tiny):
  x, y, _, _ = tiny
  model = _model()
  variables = random_variables(model, x.shape[1:], scale=0.1)
  logits = model.apply(variables, x[:4])
  layers = {l.name: l for l in at.model_pool_layers(model, ("input", "hidden_0", "hidden_1"))}
  for layer in layers.values():
    h = layer.feature_fn(variables["params"], x[:4])
    np.testing.assert_allclose(layer.head_fn(variables["params"], h), logits, rtol=1e-5, atol=1e-5)
  # Pool examples of hidden_1 train only the output layer.
  h1 = layers["hidden_1"].feature_fn(variables["params"], x[:4])
  grads = jax.grad(lambda p: jnp.sum(_xent(layers["hidden_1"].head_fn(p, h1), y[:4])))(
      variables["params"])
  assert not np.any(np.asarray(grads["hidden_0"]["kernel"])) and not np.any(np.asarray(grads["hidden_1"]["kernel"]))
  assert np.any(np.asarray(grads["output"]["kernel"]))
  conv = models.get_model("mnist_conv")   # no head/features: only an input pool, through model.apply
  with pytest.raises(ValueError, match="head"):
    at.model_pool_layers(conv, ("input", "hidden_0"))
  (layer,) = at.model_pool_layers(conv, ("input",))
  conv_vars = random_variables(conv, x.shape[1:], scale=0.1)
  np.testing.assert_allclose(layer.head_fn(conv_vars["params"], layer.feature_fn(conv_vars["params"], x[:2])),
                             conv.apply(conv_vars, x[:2]), rtol=1e-5, atol=1e-5)


def test_pool_schedule():
  cfg = at.PoolConfig(warmup_steps=2, refresh_every=3)
  assert [pool_schedule(s, cfg) for s in range(9)] == [
      "none", "none", "fill", "none", "none", "refresh", "none", "none", "refresh"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=()), "at least one"), (dict(layers=("input", "input")), "duplicates"),
    (dict(pool_size=0), "pool_size"), (dict(refresh_fraction=0.0), "refresh_fraction"),
    (dict(mix_ratio=1.0), "mix_ratio"), (dict(attack=dict(c_grid=())), "c_grid"),
    (dict(attack=dict(maxiter=0)), "maxiter"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(layers="input"), "list of layer names")])
def test_pool_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    at.PoolConfig(**kwargs)


def test_train_with_pool_rejects_bad_input_before_compiling(tiny):
  x, y, _, _ = tiny
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    at.train_with_pool(_model(), x * 2.0, y, CONFIG, POOL)
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    at.train_with_pool(_model(), bad, y, CONFIG, POOL)
  with pytest.raises(ValueError, match="labels"):
    at.train_with_pool(_model(), x, y + 10, CONFIG, POOL)
  with pytest.raises(ValueError, match=r"no feature \['hidden_9'\]"):
    at.train_with_pool(_model(), x, y, CONFIG, at.PoolConfig(layers=("hidden_9",)))
  with pytest.raises(ValueError, match="task"):
    at.train_with_pool(_model(), x, y, dataclasses.replace(CONFIG, task="autoencode"), POOL)
  # A model with only __call__ takes an input pool (it failed on its missing features method).
  input_pool = at.PoolConfig(layers=("input",))
  assert at._check_inputs(_Plain(), x, y, CONFIG, input_pool, "t")[2] == 10  # pylint: disable=W0212
  with pytest.raises(ValueError, match=r"weight_decays \(2\) and seeds \(3\)"):
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, seeds=(0, 1, 2), weight_decays=(1e-4, 1e-3))
  with pytest.raises(ValueError, match="weight_decays\\[1\\]"):
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, seeds=(0, 1), weight_decays=(1e-4, [1e-4, 1e-4]))


class _Plain(nn.Module):
  """Logits only: no head or features methods."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


# ----------------------------------------------------------------------------------------------------
# Training (one compiled program shared by the tests below).


@pytest.mark.slow
def test_pools_are_refreshed_as_configured(full_run):
  res, _ = full_run
  events = [s for s in range(EPOCHS * STEPS) if pool_schedule(s, POOL) != "none"]
  assert int(res.state.num_refreshes) == len(events) and bool(res.state.filled)
  assert [h["num_refreshes"] for h in res.history] == [
      sum(1 for s in events if e * STEPS <= s < (e + 1) * STEPS) for e in range(EPOCHS)]
  r = POOL.refresh_size
  assert r == 8
  for i, name in enumerate(POOL.layers):
    # Replay the schedule: the fill writes every slot at the warm-up step; the refresh at step s writes
    # the r slots drawn from fold_in(fold_in(fold_in(fold_in(rng, 1), s), 1_000_003), pool index).
    want = np.full((POOL.pool_size,), POOL.warmup_steps)
    for s in events[1:]:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(res.state.rng, 1), s), 1_000_003)
      want[np.asarray(jax.random.choice(jax.random.fold_in(key, i), POOL.pool_size, (r,), replace=False))] = s
    np.testing.assert_array_equal(np.asarray(res.state.pool_born[name]), want)
    labels = np.asarray(res.state.pool_labels[name])
    assert labels.min() >= 0 and labels.max() < 10 and len(np.unique(labels)) > 1


@pytest.mark.slow
def test_training_with_the_pool_reduces_the_loss(full_run, tiny):
  res, _ = full_run
  losses = [h["loss"] for h in res.history]
  assert losses[-1] < 0.9 * losses[0], losses
  assert res.history[-1]["clean_error"] < res.history[0]["clean_error"]
  assert res.history[-1]["eval_error"] < 0.5
  # The attack succeeded on some examples of each pool; the distortion is the mean RMS over the successes
  # (at most 1 in the [0, 1] box, 0 without a success), and the hidden pool's successes moved their examples.
  for name in POOL.layers:
    rows = [(h[f"{name}/attack_success"], h[f"{name}/attack_distortion"]) for h in res.history if h["num_refreshes"]]
    assert max(s for s, _ in rows) > 0, (name, rows)
    for success, distortion in rows:
      assert 0 <= distortion <= 1 and (success > 0 or distortion == 0), (name, rows)
    if name == "hidden_1":
      assert min(d for s, d in rows if s > 0) > 0, rows
  layer = at.model_pool_layers(_model(), ("hidden_1",))[0]
  pools = np.asarray(res.state.pools["hidden_1"])
  assert np.all(np.isfinite(np.asarray(layer.head_fn(res.state.params, jnp.asarray(pools)))))
  assert np.all((pools >= 0) & (pools <= 1))
  x_pool = np.asarray(res.state.pools["input"])
  assert x_pool.min() >= 0 and x_pool.max() <= 1


@pytest.mark.slow
def test_resume_mid_run_matches_the_uninterrupted_run(full_run, tiny, tmp_path):
  res, _ = full_run
  x, y, xt, yt = tiny
  workdir = str(tmp_path / "adv_resume")
  hits = at._compiled.cache_info().hits  # pylint: disable=protected-access
  part = at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=0, workdir=workdir, eval_data=(xt, yt),
                            stop_after_epoch=2)
  assert int(part.state.epoch) == 2 and int(part.state.step) == 2 * STEPS
  assert os.path.exists(os.path.join(workdir, "ckpt", "LAST"))
  # A fresh call restores params, optimiser, pools and rng from the checkpoint and finishes the run.
  rest = at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=0, workdir=workdir, eval_data=(xt, yt))
  assert [h["epoch"] for h in rest.history] == [1, 2, 3, 4]   # 1-2 read back from metrics.jsonl
  _trees_equal(rest.state, res.state)
  assert at._compiled.cache_info().hits >= hits + 2  # pylint: disable=protected-access
  # Other settings in the same workdir are refused.
  with pytest.raises(ValueError, match="other settings"):
    at.train_with_pool(_model(), x, y, CONFIG, at.PoolConfig(layers=("input",), pool_size=16), workdir=workdir)


# ----------------------------------------------------------------------------------------------------
# perturbation_scale and pool_loss_weight, on a small linear softmax model (a cheap attack to compile).

LIN_DIM, LIN_CLASSES = 16, 4


def _lin_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None, :]


def _lin_problem(n=64):
  kw, kx = jax.random.split(jax.random.PRNGKey(5))
  params = {"w": jax.random.normal(kw, (LIN_DIM, LIN_CLASSES)), "b": jnp.zeros((LIN_CLASSES,))}
  x = jax.random.uniform(kx, (n, LIN_DIM))
  y = jnp.argmax(_lin_apply(params, x), -1).astype(jnp.int32)  # labels the model gets right
  return params, x, y


@pytest.mark.parametrize("kwargs,match", [
    (dict(perturbation_scale=0.0), "perturbation_scale"), (dict(perturbation_scale=float("inf")), "perturbation_scale"),
    (dict(perturbation_scale=-1.0), "perturbation_scale"), (dict(pool_loss_weight=0.0), "pool_loss_weight"),
    (dict(pool_loss_weight=float("nan")), "pool_loss_weight"), (dict(pool_loss_weight="1"), "pool_loss_weight")])
def test_pool_config_rejects_bad_scale_and_weight(kwargs, match):
  with pytest.raises(ValueError, match=match):
    at.PoolConfig(**kwargs)


@pytest.mark.slow
def test_perturbation_scale_moves_the_stored_example_along_the_attack_direction():
  params, x, y = _lin_problem()
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0))
  key = jax.random.PRNGKey(3)
  attack = dataclasses.replace(at.POOL_ATTACK, maxiter=5)
  cfgs = [at.PoolConfig(attack=attack, perturbation_scale=s) for s in (1.0, 0.5, 2.0)]

  @jax.jit
  def gen(params, x, y):
    return [at.generate_adversarial(layer, params, x, y, key, c, LIN_CLASSES) for c in cfgs]

  (h1, r1), (h_half, r_half), (h2, r2) = gen(params, x, y)
  assert float(jnp.mean(r1.success)) > 0.5
  _trees_equal(r1, r_half)  # the engine's result is the same; only the stored point moves
  np.testing.assert_allclose(h_half, x + 0.5 * (h1 - x), atol=1e-6)
  np.testing.assert_allclose(h2, jnp.clip(x + 2.0 * (h1 - x), 0.0, 1.0), atol=1e-6)
  ok = np.asarray(r1.success)
  # The logit margin of the target over the true label is linear along the segment (linear model): it
  # grows from the clean point through the half-way point to the boundary point and beyond.
  tgt = np.asarray(r1.pred)

  def margin(h):
    z = np.asarray(_lin_apply(params, h))
    return (np.take_along_axis(z, tgt[:, None], 1) - np.take_along_axis(z, np.asarray(y)[:, None], 1))[:, 0]

  m0, m_half, m1, m2 = margin(x), margin(h_half), margin(h1), margin(h2)
  assert np.all(m0[ok] < m_half[ok]) and np.all(m_half[ok] < m1[ok]) and np.all(m1[ok] < m2[ok])
  np.testing.assert_allclose(m_half[ok], 0.5 * (m0[ok] + m1[ok]), rtol=1e-4, atol=1e-4)
  assert np.all(m_half[ok] < 0.5 * m1[ok])  # half-way: well short of the target's side


@pytest.mark.slow
def test_perturbation_rms_puts_the_stored_example_at_a_fixed_distance_along_the_attack_direction():
  params, x, y = _lin_problem()
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0))
  key = jax.random.PRNGKey(3)
  e = 0.02
  attack = dataclasses.replace(at.POOL_ATTACK, maxiter=5)
  cfgs = [at.PoolConfig(attack=attack), at.PoolConfig(attack=attack, perturbation_rms=e)]

  @jax.jit
  def gen(params, x, y):
    return [at.generate_adversarial(layer, params, x, y, key, c, LIN_CLASSES) for c in cfgs]

  (h1, r1), (he, re_) = gen(params, x, y)
  # The same solves; with perturbation_rms the engine skips the refinement (it only slides x_adv along the
  # direction), so the stored points below must still follow the REFINED direction h1 - x exactly.
  assert cfgs[0].attack_options((0.0, 1.0)).refine and not cfgs[1].attack_options((0.0, 1.0)).refine
  _trees_equal((r1.success, r1.c, r1.num_iter), (re_.success, re_.c, re_.num_iter))
  ok = np.asarray(r1.success)
  assert np.all(np.asarray(re_.distortion)[ok] >= np.asarray(r1.distortion)[ok] - 1e-7)  # unrefined: farther
  assert np.any(np.asarray(re_.distortion)[ok] > 1.01 * np.asarray(r1.distortion)[ok])
  assert ok.mean() > 0.5
  d1, de = np.asarray(h1 - x).reshape(len(x), -1), np.asarray(he - x).reshape(len(x), -1)
  rms1, rmse = np.sqrt(np.mean(d1 ** 2, 1)), np.sqrt(np.mean(de ** 2, 1))
  # Unclipped rows: exactly e along the attack's direction; clipped ones: shorter, never longer.
  expected = np.asarray(x).reshape(len(x), -1) + (e / rms1)[:, None] * d1
  inside = np.all((expected >= 0) & (expected <= 1), axis=1) & ok
  assert inside.sum() > 0.3 * len(x)
  np.testing.assert_allclose(rmse[inside], e, rtol=1e-4)
  np.testing.assert_allclose(de[inside], (e / rms1[inside])[:, None] * d1[inside], atol=1e-6)
  assert np.all(rmse <= e * (1 + 1e-4)) and np.all((np.asarray(he) >= 0) & (np.asarray(he) <= 1))
  # Near and far boundaries differ: rows whose boundary lies closer than e are pushed past it (the
  # target wins or ties), the farther ones stop short (the true label still wins).
  z = np.asarray(_lin_apply(params, he))
  tgt, yy = np.asarray(r1.pred), np.asarray(y)
  margin = np.take_along_axis(z, tgt[:, None], 1)[:, 0] - np.take_along_axis(z, yy[:, None], 1)[:, 0]
  near, far = inside & (rms1 < 0.9 * e), inside & (rms1 > 1.1 * e)
  assert far.sum() > 0 and np.all(margin[far] < 0)
  assert near.sum() > 0 and np.all(margin[near] > 0)


def test_perturbation_rms_is_validated():
  for bad in (0.0, -0.1, float("nan"), float("inf"), True, "0.1"):
    with pytest.raises(ValueError, match="perturbation_rms"):
      at.PoolConfig(perturbation_rms=bad)
  with pytest.raises(ValueError, match="not both"):
    at.PoolConfig(perturbation_rms=0.03, perturbation_scale=0.5)
  assert at.PoolConfig(perturbation_rms=0.03).to_dict()["perturbation_rms"] == 0.03


@pytest.mark.slow
def test_pool_loss_weight_weights_the_pool_examples_in_the_loss():
  params, x, y = _lin_problem(256)
  w = 3.0
  cfg = at.PoolConfig(layers=("input",), pool_size=16, refresh_every=2, refresh_fraction=0.5, mix_ratio=0.5,
                      pool_loss_weight=w, attack=dataclasses.replace(at.POOL_ATTACK, maxiter=3, c_grid=(1.0,)))
  # Training-time logits (train_head_fn / make_epoch_fn's apply_fn, e.g. dropout) scaled by 0.5: the logged losses must
  # come from them, not from the attack's deterministic head.
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0),
                       train_head_fn=lambda p, v, k: 0.5 * _lin_apply(p, v))
  tx = optax.sgd(0.0)
  batch = 32
  epoch_fn = at.make_epoch_fn(lambda p, v, k: 0.5 * _lin_apply(p, v), [layer], tx, cfg, batch_size=batch,
                              num_train=256, num_classes=LIN_CLASSES)
  state = at.init_state([layer], jax.tree.map(jnp.copy, params), tx, x[:1], cfg, jax.random.PRNGKey(0))  # donated
  state, stats = epoch_fn(state, x, y, jax.random.PRNGKey(1), jnp.int32(0), None)
  stats = np.asarray(stats)
  names = list(at.STEP_STATS)
  data_loss, clean, pool = (stats[:, names.index(k)] for k in ("data_loss", "clean_loss", "pool_loss"))
  m = at.mixed_batch_sizes(batch, cfg)["input"]
  want = (batch * clean + w * m * pool) / (batch + w * m)
  np.testing.assert_allclose(data_loss, want, rtol=1e-5)
  assert not np.allclose(data_loss, (batch * clean + m * pool) / (batch + m), rtol=1e-4)  # the weight matters
  # Step 0 (lr 0: params fixed): the clean loss is that of the halved logits of the step's batch.
  perm = jax.random.permutation(jax.random.PRNGKey(1), 256)[:batch]
  want0 = float(jnp.mean(_xent(0.5 * _lin_apply(params, x[perm]), y[perm])))
  np.testing.assert_allclose(clean[0], want0, rtol=1e-5)
  pools = state.pools["input"]
  full = float(jnp.mean(_xent(_lin_apply(params, pools), state.pool_labels["input"])))
  half = float(jnp.mean(_xent(0.5 * _lin_apply(params, pools), state.pool_labels["input"])))
  assert abs(np.mean(pool[-4:]) - half) < abs(np.mean(pool[-4:]) - full)  # pool examples: train_head_fn


DROPOUT = dict(dropout_rate=0.5, input_dropout_rate=0.2)


@pytest.mark.slow
def test_training_with_dropout(full_run, tiny):
  x, y, xt, yt = tiny
  model = models.get_model("fc16-16-10", **DROPOUT)
  variables = model.init(jax.random.PRNGKey(0), x[:8])
  layer = at.model_pool_layers(model, ("hidden_0",))[0]
  h = layer.feature_fn(variables["params"], x[:8])
  det = layer.head_fn(variables["params"], h)
  np.testing.assert_allclose(det, model.apply(variables, x[:8]), rtol=1e-5, atol=1e-5)  # attacked: no dropout
  assert not np.allclose(layer.train_head_fn(variables["params"], h, jax.random.PRNGKey(4)), det)
  # The reference run's setting with dropout (the experiment's adversarial run: same compiled program):
  # dropout reaches the clean examples' loss, and the network is evaluated without it.
  drop = at.train_with_pool(model, x, y, CONFIG, POOL, seed=0, eval_data=(xt, yt))
  assert drop.history[0]["clean_loss"] > full_run[0].history[0]["clean_loss"] + 0.02
  assert drop.history[-1]["eval_error"] == pytest.approx(
      metrics.error_rate(_model().apply, drop.variables, xt, yt))


# ----------------------------------------------------------------------------------------------------
# train_with_pool_sweep: k members as one vmapped program.

SWEEP_SEEDS = (0, 1, 0)
SWEEP_DECAYS = (None, None, 1e-2)  # member 2: seed 0 with a 100x larger λ


@pytest.fixture(scope="module")
def sweep_run(tiny, tmp_path_factory):
  x, y, xt, yt = tiny
  workdir = str(tmp_path_factory.mktemp("adv_sweep"))
  res = at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, seeds=SWEEP_SEEDS, weight_decays=SWEEP_DECAYS,
                                 data_seed=0, workdir=workdir, eval_data=(xt, yt))
  return res, workdir


def _trees_close(a, b, atol):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=0, atol=atol)


@pytest.mark.slow
def test_sweep_members_end_where_the_single_runs_end(sweep_run, full_run, tiny):
  res, _ = sweep_run
  x, y, xt, yt = tiny
  assert res.weight_decays.shape == (3, 3) and list(res.seeds) == list(SWEEP_SEEDS)
  np.testing.assert_allclose(res.weight_decays[2], 1e-2)
  member = lambda i: jax.tree.map(lambda a: a[i], res.state)  # pylint: disable=unnecessary-lambda-assignment
  # Member 0 is the reference run (seed 0, data seed 0, the config's λ); member 1 is seed 1 on the same batches.
  _trees_close(member(0), full_run[0].state, atol=1e-5)
  single1 = at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=1, data_seed=0, eval_data=(xt, yt))
  _trees_close(member(1), single1.state, atol=1e-5)
  assert res.history[-1]["eval_error"][:2] == pytest.approx(
      [full_run[0].history[-1]["eval_error"], single1.history[-1]["eval_error"]])
  # Every member refreshed its own pools on the same steps; seeds give different pools.
  assert [int(n) for n in res.state.num_refreshes] == [int(full_run[0].state.num_refreshes)] * 3
  assert not np.allclose(res.state.pools["input"][0], res.state.pools["input"][1])
  # λ reaches its member: same seed and batches, 100x the decay -> smaller weights.
  def norm(params):
    return sum(float(jnp.sum(jnp.square(layer["kernel"]))) for layer in params.values())

  assert norm(res.variables[2]["params"]) < 0.9 * norm(res.variables[0]["params"])
  assert set(res.history[-1]) >= {"loss", "clean_error", "input/attack_success", "eval_error", "seconds"}
  assert all(len(v) == 3 for k, v in res.history[-1].items() if k not in ("epoch", "seconds"))


def _scan_body(jaxpr):
  """The body of the first scan in ``jaxpr`` (searched through jit/pjit wrappers)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      return eqn.params["jaxpr"].jaxpr
    sub = eqn.params.get("jaxpr")
    if sub is not None:
      found = _scan_body(getattr(sub, "jaxpr", sub))
      if found is not None:
        return found
  return None


@pytest.mark.slow
def test_sweep_refresh_stays_a_branch_taken_on_refresh_steps_only(tiny):
  # vmap turns a cond on a per-member predicate into a select that evaluates both branches, i.e. the attack
  # on every step. The stacked epoch keeps one cond (on the shared step) and every L-BFGS loop inside it.
  x, y, _, _ = tiny
  program = at._compiled(  # pylint: disable=protected-access
      _model(), train.static_config(CONFIG), POOL, x.shape[1:], NUM_TRAIN, 10, True)
  params = program.init(jax.random.split(jax.random.PRNGKey(0), 2))
  state = jax.vmap(program.make_state)(params, jax.random.split(jax.random.PRNGKey(1), 2))
  hyper = train.Hyper(jnp.ones((2, 3)) * 1e-4, jnp.zeros((2,)))
  jaxpr = jax.make_jaxpr(program.epoch_fn)(state, x, y, jax.random.PRNGKey(0), jnp.int32(0), hyper).jaxpr
  body = _scan_body(jaxpr)
  assert body is not None, "no scan in the epoch"
  top = [e.primitive.name for e in body.eqns]
  assert top.count("cond") == 1, top
  assert "while" not in top, top


@pytest.mark.slow
def test_sweep_resumes_mid_run_and_checks_its_inputs(sweep_run, tiny, tmp_path):
  res, _ = sweep_run
  x, y, xt, yt = tiny
  workdir = str(tmp_path / "sweep_resume")
  kw = dict(seeds=SWEEP_SEEDS, weight_decays=SWEEP_DECAYS, data_seed=0, workdir=workdir, eval_data=(xt, yt))
  part = at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, stop_after_epoch=2, **kw)
  assert [int(e) for e in part.state.epoch] == [2, 2, 2]
  rest = at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, **kw)
  assert [h["epoch"] for h in rest.history] == [1, 2, 3, 4]
  _trees_equal(rest.state, res.state)
  with pytest.raises(ValueError, match="other settings"):  # other seeds, same workdir
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, **{**kw, "seeds": (0, 1, 2)})


# ----------------------------------------------------------------------------------------------------
# The experiment (configs/adversarial_training.py + run_experiment).


def _experiment_config():
  """The tests' CONFIG and POOL as an experiment config (their compiled epochs are reused)."""
  from intriguing_jax.configs import adversarial_training as configs  # pylint: disable=g-import-not-at-top
  c = configs.get_config("smoke")
  c.model, c.num_train, c.num_attack, c.chunk_size, c.dropout = "fc16-16-10", NUM_TRAIN, 4, 4, DROPOUT
  c.train.update(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-2, weight_decay=(1e-4,))
  c.pool.update(layers=POOL.layers, pool_size=POOL.pool_size, refresh_every=POOL.refresh_every,
                refresh_fraction=POOL.refresh_fraction, mix_ratio=POOL.mix_ratio,
                warmup_epochs=POOL.warmup_steps / STEPS, perturbation_rms=0.0)
  c.pool.attack.update(untargeted=False, maxiter=5, refine=False)
  c.eval_attack.update(maxiter=5, num_bisection=1, refine=False)
  c.lipschitz.strengths = (0.5,)
  return c


@pytest.mark.parametrize("preset", [None, "smoke", "paper", "conv"])
def test_every_preset_validates(preset):
  from intriguing_jax.configs import adversarial_training as configs  # pylint: disable=g-import-not-at-top
  exp = at.validate(configs.get_config(preset))
  assert list(exp.train) == ["weight_decay", "dropout", "adversarial", "lipschitz_0.03", "lipschitz_0.1"]
  assert exp.train["lipschitz_0.1"].lipschitz_penalty == "log" and exp.model_kwargs["lipschitz_0.1"] == {}
  assert exp.train["weight_decay"].lipschitz_penalty == "none"


def test_experiment_config_is_checked_before_any_work(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from intriguing_jax import configs  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(configs.__file__), "adversarial_training.py")

  def parse(*args):
    fv, argv = flags.FlagValues(), ["prog", *args]
    config_flags.DEFINE_config_file("config", path, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  exp = at.validate(parse(f"--config={path}:smoke", "--config.pool.attack.maxiter=7", "--config.sweep_seeds=(0,1)"))
  assert exp.pool.attack.maxiter == 7 and exp.pool.attack.untargeted and exp.seeds == [0, 1]
  assert exp.pool.perturbation_rms == 0.035 and exp.train["adversarial"].epochs == 2
  assert exp.model_kwargs["adversarial"] == {"dropout_rate": 0.1, "input_dropout_rate": 0.05}
  # The default pool attack is POOL_ATTACK (untargeted): the published setting's examples.
  assert dataclasses.replace(exp.pool.attack, maxiter=10) == dataclasses.replace(at.POOL_ATTACK, untargeted=True)
  for bad in ("--config.pool.attack.bogus=1", "--config.train.bogus=1"):
    with pytest.raises((flags.Error, AttributeError, KeyError), match="bogus"):
      parse(bad)
  config = _experiment_config()
  config.lipschitz.penalty = "spectral"
  with pytest.raises(ValueError, match="lipschitz_penalty"):
    at.run_experiment(config, str(tmp_path), data_dir=str(tmp_path / "missing"))
  config.lipschitz.update(penalty="log", strengths=(0.1, 0.1))
  with pytest.raises(ValueError, match="strengths"):
    at.run_experiment(config, str(tmp_path), data_dir=str(tmp_path / "missing"))
  config = _experiment_config()
  config.runs = ("weight_decay", "nope")
  with pytest.raises(ValueError, match="runs"):
    at.run_experiment(config, str(tmp_path), data_dir=str(tmp_path / "missing"))
  config = _experiment_config()
  config.pool.attack.solver = "newton"
  with pytest.raises(ValueError, match="solver"):
    at.run_experiment(config, str(tmp_path), data_dir=str(tmp_path / "missing"))
  assert not os.listdir(tmp_path)


def test_lipschitz_verdict_compares_each_strength_with_weight_decay():
  row = lambda err, dist, cert, prod, secs: {
      "eval_error": err, "eval_error_sd": 0.001, "av_min_distortion": dist, "certified_accuracy_0.3": cert,
      "lipschitz_product": prod, "train_seconds": secs}
  mean = {"weight_decay": row(0.017, 0.06, 0.0, 120.0, 100.0), "dropout": row(0.014, 0.07, 0.0, 90.0, 100.0),
          "lipschitz_0.01": row(0.018, 0.09, 0.2, 40.0, 130.0),
          "lipschitz_0.1": row(0.022, 0.12, 0.86, 7.0, 130.0)}
  lines = at.lipschitz_verdict(mean)
  assert len(lines) == 4 and lines[0].startswith("lipschitz_0.01: test error 1.80 % ± 0.10 (weight decay 1.70 %")
  assert "= 2.00x weight decay's" in lines[1] and "certified accuracy at L2 0.3 86.00 %" in lines[1]
  assert "product of layer bounds 7 (weight decay 120)" in lines[1] and "training time 1.30x" in lines[1]
  assert lines[2].startswith("Lower test error than weight decay: no (best strength lipschitz_0.01: 1.80 %")
  assert lines[3].startswith("Larger minimum distortion than weight decay: yes (largest: lipschitz_0.1, 2.00x")
  mean["lipschitz_0.01"]["eval_error"] = 0.015
  assert at.lipschitz_verdict(mean)[2].startswith("Lower test error than weight decay: yes")
  assert at.lipschitz_verdict({"weight_decay": mean["weight_decay"]}) == []
  # An attack without a success (mean distortion NaN) leaves the distortion claims undetermined, not false.
  mean["lipschitz_0.1"]["av_min_distortion"] = float("nan")
  assert at.lipschitz_verdict(mean)[3].startswith("Larger minimum distortion than weight decay: undetermined")
  claims = at._claims(mean, "")   # pylint: disable=protected-access
  assert claims["lipschitz_0.1_distortion_at_least_1.5x_weight_decay"] is None
  assert claims["lipschitz_0.1_meets_the_goal"] is False                 # its error, 2.2 %, misses anyway
  assert claims["lipschitz_0.01_distortion_at_least_1.5x_weight_decay"] is True
  mean["lipschitz_0.1"]["eval_error"] = 0.015
  mean["lipschitz_0.1"]["certified_accuracy_0.3"] = 0.95
  assert at._claims(mean, "")["lipschitz_0.1_meets_the_goal"] is None   # pylint: disable=protected-access


def test_evaluation_attacks_are_cached_per_seed(tmp_path, monkeypatch):
  # Two seeds' models, each attacked in two chunks: a rerun reuses all four chunks (one cache directory per
  # seed; in a shared one each seed's chunks overwrote the other's, and a rerun attacked everything again).
  from intriguing_jax import attack  # pylint: disable=g-import-not-at-top
  model = models.get_model("fc16-16-10")
  x = np.random.RandomState(0).uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
  y = np.arange(4, dtype=np.int32)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *(random_variables(model, x.shape[1:], seed=s, scale=0.1)
                                                     for s in (0, 1)))
  exp = types.SimpleNamespace(seeds=[0, 1], eval_attack=attack.AttackOptions(maxiter=3, num_bisection=0,
                                                                             refine=False))
  config = types.SimpleNamespace(model="fc16-16-10", chunk_size=2)
  calls = []

  def fake_attack(apply_fn, params, xb, tb, options):   # counts the examples attacked; no compile
    calls.append(len(xb))
    return types.SimpleNamespace(x_adv=xb, success=np.zeros(len(xb), bool), c=np.full(len(xb), np.nan))

  monkeypatch.setattr(attack, "lbfgs_attack", fake_attack)
  runs = []
  for _ in range(2):
    runs.append([{}, {}])
    at._add_robustness(runs[-1], "weight_decay", stacked, exp, config, (x, y), (x, y, (y + 1) % 10),
                       str(tmp_path))
  assert calls == [2, 2, 2, 2], calls          # the first pass only
  assert json.dumps(runs[0]) == json.dumps(runs[1]) and runs[0][0] != runs[0][1]   # (nan: no success)


@pytest.mark.slow
def test_run_experiment_trains_attacks_restores_and_sweeps(full_run, sweep_run, synthetic_idx_dir, tmp_path):
  config = _experiment_config()
  out = at.run_experiment(config, str(tmp_path / "one"), synthetic_idx_dir)
  runs = ["weight_decay", "dropout", "adversarial", "lipschitz_0.5"]
  assert list(out["per_seed"]) == runs and out["seeds"] == [0] and out["num_attacked"] == 4
  for (row,) in out["per_seed"].values():
    assert 0 <= row["eval_error"] <= 1 and row["attack_success"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert row["attack_success"] == 0 or row["av_min_distortion"] > 0
    assert row["bracket_violations"] == 0 and 0 <= row["certified_over_attack"] <= 1
    assert 0 <= row["certified_accuracy_1"] <= row["certified_accuracy_0.3"] <= 1 - row["eval_error"] + 1e-9
  # The penalty lowers the product of the layer bounds (mu = 0.5 on log sigma; else the same run).
  assert out["per_seed"]["lipschitz_0.5"][0]["lipschitz_product"] < 0.5 * out["per_seed"]["weight_decay"][0][
      "lipschitz_product"]
  lip = json.load(open(tmp_path / "one" / "lipschitz_0.5" / "result.json"))["settings"]["train_config"]
  assert lip["lipschitz_penalty"] == "log" and lip["lipschitz_strength"] == 0.5
  assert set(out["claims"]) == {"adversarial_error_at_most_1.2%", "adversarial_error_below_both_baselines",
                                "adversarial_distortion_above_weight_decay", "lipschitz_0.5_meets_the_goal",
                                "lipschitz_0.5_error_below_weight_decay",
                                "lipschitz_0.5_distortion_at_least_1.5x_weight_decay",
                                "lipschitz_0.5_certified_accuracy_0.3_at_least_90%"}
  adv = json.load(open(tmp_path / "one" / "adversarial" / "result.json"))
  assert len(adv["history"]) == EPOCHS and adv["history"][-1]["num_refreshes"] > 0
  assert adv["settings"]["pool_config"]["warmup_steps"] == POOL.warmup_steps
  assert (tmp_path / "one" / "report.md").is_file() and (tmp_path / "one" / "report.html").is_file()
  assert "Does penalising the Lipschitz bounds help?" in (tmp_path / "one" / "report.md").read_text()
  # Rerun: restored, the same figures; a finished run with other settings is refused, naming them.
  again = at.run_experiment(config, str(tmp_path / "one"), synthetic_idx_dir)["per_seed"]
  assert json.dumps(again) == json.dumps(out["per_seed"])
  config.pool.refresh_every = 2
  with pytest.raises(ValueError, match=r"adversarial holds a finished run with other settings \(pool_config\)"):
    at.run_experiment(config, str(tmp_path / "one"), synthetic_idx_dir)
  # Three seeds of the adversarial run as one sweep; seed 0 (batch order of config.seed = 0) is the single
  # run. Without dropout, so that both reuse the compiled programs of full_run and sweep_run.
  config = _experiment_config()
  config.runs, config.num_attack, config.adversarial_dropout = ("adversarial",), 0, False
  single = at.run_experiment(config, str(tmp_path / "single"), synthetic_idx_dir)["per_seed"]["adversarial"]
  config.sweep_seeds = (0, 1, 2)
  sweep = at.run_experiment(config, str(tmp_path / "sweep"), synthetic_idx_dir)
  assert list(sweep["per_seed"]) == ["adversarial"] and len(sweep["per_seed"]["adversarial"]) == 3
  assert abs(sweep["per_seed"]["adversarial"][0]["eval_error"] - single[0]["eval_error"]) <= 1 / 128 + 1e-9
  assert sweep["mean"]["adversarial"]["eval_error"] == pytest.approx(
      np.mean([r["eval_error"] for r in sweep["per_seed"]["adversarial"]]))


def test_pool_figures_exist_only_once_the_pool_is_filled():
  # Before the fill the pool holds placeholder entries (label 0) with weight 0: their loss and error are
  # no data (they were logged as ~2.5 and 100 %), so they are NaN and an epoch's means skip them.
  layer = at.PoolLayer("input", lambda p, x: x, lambda p, h: h @ p)
  args = (tuple([layer]), POOL, optax.softmax_cross_entropy_with_integer_labels,
          lambda p, x, key: x @ p, None, jnp.eye(3), jnp.eye(3), jnp.arange(3))
  pool_batch = {"input": (jnp.eye(3), jnp.zeros(3, jnp.int32))}
  key = jax.random.PRNGKey(0)
  for weight, finite in ((0.0, False), (1.0, True)):
    _, stats = at._mixed_loss(*args, pool_batch, weight, key, None)   # pylint: disable=protected-access
    assert np.isfinite(np.asarray(stats)[[2, 4]]).tolist() == [finite, finite]
  cols = [at.STEP_STATS.index("pool_loss"), at.STEP_STATS.index("pool_error")]
  stats = np.zeros((4, len(at.STEP_STATS) + len(at.POOL_STATS)))
  stats[:2, cols] = np.nan                        # steps 1-2 before the fill
  stats[2:, cols[0]], stats[2:, cols[1]] = [1.0, 3.0], 0.5
  out = at._summarise(["input"], stats)           # pylint: disable=protected-access
  assert out["pool_loss"] == 2.0 and out["pool_error"] == 0.5 and out["loss"] == 0.0
  stats[2:, cols] = np.nan
  assert np.isnan(at._summarise(["input"], stats)["pool_loss"])   # pylint: disable=protected-access
