"""Tests of intriguing_jax.adversarial_training on a tiny synthetic problem (no real MNIST needed).

One pool configuration is shared by every training test, so the (large) attack program compiles once per
file: the epoch function is cached on the settings.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from intriguing_jax import adversarial_training as at
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

EPOCHS = 4
BATCH = 32
NUM_TRAIN = 256
STEPS = NUM_TRAIN // BATCH  # 8 steps per epoch
CONFIG = train.TrainConfig(epochs=EPOCHS, batch_size=BATCH, learning_rate=1e-2, weight_decay=(1e-4,))
POOL = at.PoolConfig(layers=("input", "hidden_1"), pool_size=32, refresh_every=3, refresh_fraction=0.25,
                     mix_ratio=0.5, warmup_steps=2, maxiter=5, c_grid=(0.1, 1.0))


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
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
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


def test_mlp_head_is_the_network_above_the_layer(tiny):
  x, y, _, _ = tiny
  model = _model()
  variables = model.init(jax.random.PRNGKey(0), x[:4])
  logits, feats = model.apply(variables, x[:4], return_features=True)
  for name in ("hidden_0", "hidden_1"):
    head = at.mlp_head_fn(model, name)
    np.testing.assert_allclose(head(variables["params"], feats[name]), logits, rtol=1e-5, atol=1e-5)
  # Pool examples of hidden_1 train only the output layer.
  head = at.mlp_head_fn(model, "hidden_1")
  grads = jax.grad(lambda p: jnp.sum(at.softmax_cross_entropy(head(p, feats["hidden_1"]), y[:4])))(
      variables["params"])
  assert not np.any(np.asarray(grads["hidden_0"]["kernel"])) and not np.any(np.asarray(grads["hidden_1"]["kernel"]))
  assert np.any(np.asarray(grads["output"]["kernel"]))
  with pytest.raises(ValueError, match="no feature"):
    at.mlp_head_fn(model, "hidden_7")
  with pytest.raises(ValueError, match="not\\s+supported|supported"):
    at.mlp_head_fn(models.get_model("mnist_conv"), "pool1")


def test_pool_schedule():
  cfg = at.PoolConfig(warmup_steps=2, refresh_every=3)
  assert [at.pool_schedule(s, cfg) for s in range(9)] == [
      "none", "none", "fill", "none", "none", "refresh", "none", "none", "refresh"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=()), "at least one"), (dict(layers=("input", "input")), "duplicates"),
    (dict(pool_size=0), "pool_size"), (dict(refresh_fraction=0.0), "refresh_fraction"),
    (dict(mix_ratio=1.0), "mix_ratio"), (dict(c_grid=()), "c_grid"), (dict(maxiter=0), "maxiter"),
    (dict(warmup_steps=-1), "warmup_steps")])
def test_pool_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    at.PoolConfig(**kwargs)


def test_train_with_pool_rejects_bad_input_before_compiling(tiny, tmp_path):
  x, y, _, _ = tiny
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    at.train_with_pool(_model(), x * 2.0, y, CONFIG, POOL)
  bad = x.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    at.train_with_pool(_model(), bad, y, CONFIG, POOL)
  with pytest.raises(ValueError, match="dropout"):  # dropout + hand-written layers: not supported
    at.train_with_pool(models.get_model("fc16-16-10", dropout_rate=0.5), x, y, CONFIG, POOL,
                       layers=at.model_pool_layers(_model(), POOL.layers))
  with pytest.raises(ValueError, match="dropout_rate"):
    at.mlp_head_fn(_model(), "hidden_0", dropout_rate=1.0)
  with pytest.raises(ValueError, match="labels"):
    at.train_with_pool(_model(), x, y + 10, CONFIG, POOL)
  with pytest.raises(ValueError, match="no feature"):
    at.train_with_pool(_model(), x, y, CONFIG, at.PoolConfig(layers=("hidden_9",)))


# ----------------------------------------------------------------------------------------------------
# Training (one compiled program shared by the tests below).


def test_pools_are_refreshed_as_configured(full_run):
  res, _ = full_run
  total = EPOCHS * STEPS
  schedule = [at.pool_schedule(s, POOL) for s in range(total)]
  events = [s for s, what in enumerate(schedule) if what != "none"]
  assert int(res.state.num_refreshes) == len(events) and bool(res.state.filled)
  assert [h["num_refreshes"] for h in res.history] == [
      sum(1 for s in events if e * STEPS <= s < (e + 1) * STEPS) for e in range(EPOCHS)]
  r = POOL.refresh_size
  assert r == 8
  for name in POOL.layers:
    born = np.asarray(res.state.pool_born[name])
    assert born.min() >= POOL.warmup_steps  # the fill covered every slot
    assert set(np.unique(born)) <= set(events)
    # The latest refresh replaced exactly refresh_size entries (nothing has overwritten them since).
    assert np.sum(born == events[-1]) == r
    # The fill wrote the whole pool; later refreshes replaced random subsets, so some fill entries remain
    # only if fewer than pool_size slots were drawn since (here 11 refreshes x 8 > 32: some may remain).
    assert np.sum(born > events[0]) <= r * (len(events) - 1)
    labels = np.asarray(res.state.pool_labels[name])
    assert labels.min() >= 0 and labels.max() < 10 and len(np.unique(labels)) > 1


def test_training_with_the_pool_reduces_the_loss(full_run, tiny):
  res, _ = full_run
  losses = [h["loss"] for h in res.history]
  assert losses[-1] < 0.9 * losses[0], losses
  assert res.history[-1]["clean_error"] < res.history[0]["clean_error"]
  assert res.history[-1]["eval_error"] < 0.5
  # The pools hold perturbed values: the attack succeeded on some of them and they differ from the clean
  # features of their source examples (a pool of clean copies would make adversarial training a no-op).
  for name in POOL.layers:
    succ = [h[f"{name}/attack_success"] for h in res.history if h["num_refreshes"]]
    assert max(succ) > 0, (name, succ)
  model = _model()
  pools = np.asarray(res.state.pools["hidden_1"])
  logits = at.mlp_head_fn(model, "hidden_1")(res.state.params, jnp.asarray(pools))
  assert np.all(np.isfinite(np.asarray(logits)))
  assert np.all((pools >= 0) & (pools <= 1))
  x_pool = np.asarray(res.state.pools["input"])
  assert x_pool.min() >= 0 and x_pool.max() <= 1
  for h in res.history:
    for name in POOL.layers:
      assert np.isnan(h[f"{name}/attack_distortion"]) or h[f"{name}/attack_distortion"] >= 0


def test_resume_mid_run_matches_the_uninterrupted_run(full_run, tiny, tmp_path):
  res, _ = full_run
  x, y, xt, yt = tiny
  workdir = str(tmp_path / "adv_resume")
  hits = at._cached_epoch_fn.cache_info().hits  # pylint: disable=protected-access
  part = at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=0, workdir=workdir, eval_data=(xt, yt),
                            stop_after_epoch=2)
  assert int(part.state.epoch) == 2 and int(part.state.step) == 2 * STEPS
  assert os.path.exists(os.path.join(workdir, "ckpt", "LAST"))
  # A fresh call restores params, optimiser, pools and rng from the checkpoint and finishes the run.
  rest = at.train_with_pool(_model(), x, y, CONFIG, POOL, seed=0, workdir=workdir, eval_data=(xt, yt))
  assert [h["epoch"] for h in rest.history] == [3, 4]
  _trees_equal(rest.state, res.state)
  assert at._cached_epoch_fn.cache_info().hits >= hits + 2  # pylint: disable=protected-access
  # Other settings in the same workdir are refused.
  with pytest.raises(ValueError, match="different settings"):
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


def test_late_knobs_are_stored_only_when_set():
  assert "perturbation_scale" not in at.PoolConfig().to_dict()  # earlier runs' stored settings still match
  d = at.PoolConfig(perturbation_scale=1.5, pool_loss_weight=0.25).to_dict()
  assert d["perturbation_scale"] == 1.5 and d["pool_loss_weight"] == 0.25


def test_perturbation_scale_moves_the_stored_example_along_the_attack_direction():
  params, x, y = _lin_problem()
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0))
  key = jax.random.PRNGKey(3)
  cfgs = [at.PoolConfig(maxiter=5, c_grid=(0.1, 1.0), perturbation_scale=s) for s in (1.0, 0.5, 2.0)]

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


def test_perturbation_rms_puts_the_stored_example_at_a_fixed_distance_along_the_attack_direction():
  params, x, y = _lin_problem()
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0))
  key = jax.random.PRNGKey(3)
  e = 0.02
  cfgs = [at.PoolConfig(maxiter=5, c_grid=(0.1, 1.0)), at.PoolConfig(maxiter=5, c_grid=(0.1, 1.0), perturbation_rms=e)]

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


def test_perturbation_rms_is_validated_and_stored_only_when_set():
  for bad in (0.0, -0.1, float("nan"), float("inf"), True, "0.1"):
    with pytest.raises(ValueError, match="perturbation_rms"):
      at.PoolConfig(perturbation_rms=bad)
  with pytest.raises(ValueError, match="not both"):
    at.PoolConfig(perturbation_rms=0.03, perturbation_scale=0.5)
  assert "perturbation_rms" not in at.PoolConfig().to_dict()
  assert at.PoolConfig(perturbation_rms=0.03).to_dict()["perturbation_rms"] == 0.03


def test_pool_loss_weight_weights_the_pool_examples_in_the_loss():
  params, x, y = _lin_problem(256)
  w = 3.0
  cfg = at.PoolConfig(layers=("input",), pool_size=16, refresh_every=2, refresh_fraction=0.5, mix_ratio=0.5,
                      maxiter=3, c_grid=(1.0,), pool_loss_weight=w)
  # Training-time logits (train_head_fn / train_apply_fn, e.g. dropout) scaled by 0.5: the logged losses must
  # come from them, not from the attack's deterministic head.
  layer = at.PoolLayer("input", lambda p, v: v, _lin_apply, (0.0, 1.0),
                       train_head_fn=lambda p, v, k: 0.5 * _lin_apply(p, v))
  tx = optax.sgd(0.0)
  batch = 32
  epoch_fn = at.make_epoch_fn(_lin_apply, [layer], tx, cfg, batch_size=batch, num_train=256,
                              num_classes=LIN_CLASSES, train_apply_fn=lambda p, v, k: 0.5 * _lin_apply(p, v))
  state = at.init_state([layer], jax.tree.map(jnp.copy, params), tx, x[:1], cfg, jax.random.PRNGKey(0))  # donated
  state, stats = epoch_fn(state, x, y, jax.random.PRNGKey(1))
  stats = np.asarray(stats)
  names = list(at.STEP_STATS)
  data_loss, clean, pool = (stats[:, names.index(k)] for k in ("data_loss", "clean_loss", "pool_loss"))
  m = at.mixed_batch_sizes(batch, cfg)["input"]
  want = (batch * clean + w * m * pool) / (batch + w * m)
  np.testing.assert_allclose(data_loss, want, rtol=1e-5)
  assert not np.allclose(data_loss, (batch * clean + m * pool) / (batch + m), rtol=1e-4)  # the weight matters
  # Step 0 (lr 0: params fixed): the clean loss is that of the halved logits of the step's batch.
  perm = jax.random.permutation(jax.random.PRNGKey(1), 256)[:batch]
  want0 = float(jnp.mean(at.softmax_cross_entropy(0.5 * _lin_apply(params, x[perm]), y[perm])))
  np.testing.assert_allclose(clean[0], want0, rtol=1e-5)
  pools = state.pools["input"]
  full = float(jnp.mean(at.softmax_cross_entropy(_lin_apply(params, pools), state.pool_labels["input"])))
  half = float(jnp.mean(at.softmax_cross_entropy(0.5 * _lin_apply(params, pools), state.pool_labels["input"])))
  assert abs(np.mean(pool[-4:]) - half) < abs(np.mean(pool[-4:]) - full)  # pool examples: train_head_fn


def test_dropout_heads_and_training_with_dropout(tiny):
  x, y, _, _ = tiny
  model = models.get_model("fc16-16-10", dropout_rate=0.5, input_dropout_rate=0.2)
  variables = model.init(jax.random.PRNGKey(0), x[:8])
  layers = at.model_pool_layers(model, ("input", "hidden_0", "hidden_1"))
  assert all(l.train_head_fn is not None for l in layers)
  assert at.model_pool_layers(_model(), ("input", "hidden_0"))[0].train_head_fn is None
  feats = model.apply(variables, x[:8], return_features=True)[1]
  head = at.mlp_head_fn(model, "hidden_0", dropout_rate=0.5)
  det = head(variables["params"], feats["hidden_0"])
  np.testing.assert_allclose(det, model.apply(variables, x[:8]), rtol=1e-5, atol=1e-5)  # no key: no dropout
  k = jax.random.PRNGKey(4)
  assert not np.allclose(head(variables["params"], feats["hidden_0"], k), det)
  # No pool in epoch 1 (warm-up of a whole epoch): the clean training is train.train_model's (same batches,
  # loss, optimiser) -- with dropout only if the dropout model's training logits are used.
  cfg = dataclasses.replace(POOL, warmup_steps=STEPS)
  cfg1 = dataclasses.replace(CONFIG, epochs=1)
  ref = train.train_model(_model(), x, y, cfg1, seed=0)
  drop = at.train_with_pool(model, x, y, cfg1, cfg, seed=0)
  plain = float(ref.history[0]["data_loss"])
  assert np.isfinite(drop.history[0]["loss"])
  assert drop.history[0]["clean_loss"] > plain + 0.02, (drop.history[0]["clean_loss"], plain)


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


def test_sweep_refresh_stays_a_branch_taken_on_refresh_steps_only(tiny):
  # vmap turns a cond on a per-member predicate into a select that evaluates both branches, i.e. the attack
  # on every step. The stacked epoch keeps one cond (on the shared step) and every L-BFGS loop inside it.
  x, y, _, _ = tiny
  epoch_fn = at._build_sweep_epoch_fn(_model(), CONFIG, POOL, x.shape[1:], NUM_TRAIN, 10)  # pylint: disable=protected-access
  model = _model()
  params = jax.vmap(lambda k: model.init(k, jnp.asarray(x[:1]))["params"])(jax.random.split(jax.random.PRNGKey(0), 2))
  layers = at.model_pool_layers(model, POOL.layers)
  tx = train.make_optimizer(CONFIG, STEPS, jax.tree.map(lambda a: a[0], params))
  rngs = jax.random.split(jax.random.PRNGKey(1), 2)
  state = jax.vmap(lambda p, r: at.init_state(layers, p, tx, jnp.asarray(x[:1]), POOL, r))(params, rngs)
  jaxpr = jax.make_jaxpr(epoch_fn)(state, x, y, jax.random.PRNGKey(0), jnp.ones((2, 3)) * 1e-4).jaxpr
  body = _scan_body(jaxpr)
  assert body is not None, "no scan in the epoch"
  top = [e.primitive.name for e in body.eqns]
  assert top.count("cond") == 1, top
  assert "while" not in top, top


def test_sweep_resumes_mid_run_and_checks_its_inputs(sweep_run, tiny, tmp_path):
  res, _ = sweep_run
  x, y, xt, yt = tiny
  workdir = str(tmp_path / "sweep_resume")
  kw = dict(seeds=SWEEP_SEEDS, weight_decays=SWEEP_DECAYS, data_seed=0, workdir=workdir, eval_data=(xt, yt))
  part = at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, stop_after_epoch=2, **kw)
  assert [int(e) for e in part.state.epoch] == [2, 2, 2]
  rest = at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, **kw)
  assert [h["epoch"] for h in rest.history] == [3, 4]
  _trees_equal(rest.state, res.state)
  with pytest.raises(ValueError, match="different settings"):  # other seeds, same workdir
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, **{**kw, "seeds": (0, 1, 2)})
  with pytest.raises(ValueError, match=r"weight_decays \(2\) and seeds \(3\)"):
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, seeds=(0, 1, 2), weight_decays=(1e-4, 1e-3))
  with pytest.raises(ValueError, match="weight_decays\\[1\\]"):
    at.train_with_pool_sweep(_model(), x, y, CONFIG, POOL, seeds=(0, 1), weight_decays=(1e-4, [1e-4, 1e-4]))
  with pytest.raises(ValueError, match="NaN"):
    at.train_with_pool_sweep(_model(), np.full_like(x, np.nan), y, CONFIG, POOL, seeds=(0, 1))
