"""Tests for intriguing_jax.units: streaming top-k, directions, coherence, statistics, the detector toy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from intriguing_jax import models
from intriguing_jax import units


def _linear(p, x):
  return x.reshape(x.shape[0], -1) @ p


def _linear_params(dim_in, dim_out, seed=0):
  return np.random.default_rng(seed).normal(size=(dim_in, dim_out)).astype(np.float32) / math.sqrt(dim_in)


def _top_k_one_shot(scores, k):
  """The non-streaming reference: lax.top_k over all images at once (ties keep the earlier image)."""
  s, i = jax.lax.top_k(jnp.asarray(scores).T, k)
  return units.TopK(np.asarray(s), np.asarray(i, np.int32))


def _no_params(fn):
  """A feature function fn(params, x) that ignores params."""
  return lambda p, x: fn(x)


def _data(n, shape=(6, 6, 1), seed=0):
  return np.random.default_rng(seed).uniform(size=(n,) + shape).astype(np.float32)


def test_top_k_matches_brute_force_sort():
  x = _data(257)
  w = _linear_params(36, 12)
  dirs = units.random_directions(1, 7, 12)
  top = units.top_k_images(_linear, w, x, dirs, k=5, batch_size=64)  # 257 = 4 * 64 + 1: ragged last batch
  scores = np.asarray(_linear(w, jnp.asarray(x))) @ np.asarray(dirs).T  # [N, D]
  expected = np.argsort(-scores, axis=0, kind="stable")[:5].T  # [D, k]
  np.testing.assert_array_equal(top.indices, expected)
  # float32 matmul order differs between the two paths: 1e-5 relative is ample for O(1) scores.
  np.testing.assert_allclose(top.scores, np.take_along_axis(scores.T, expected, axis=1), rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(top.scores, axis=1) <= 0)


@pytest.mark.parametrize("batch_size", [pytest.param(1, marks=pytest.mark.slow), 7, 50, 1000])
def test_streaming_equals_one_shot_including_ties(batch_size):
  x = _data(50)
  # Integer-valued features: many exact ties, so the tie order (earlier image first) is tested too.
  phi = lambda x: jnp.round(3.0 * x.reshape(x.shape[0], -1)[:, :8])
  dirs = units.natural_directions(8)
  streamed = units.top_k_images(_no_params(phi), None, x, dirs, k=6, batch_size=batch_size)
  one_shot = _top_k_one_shot(phi(jnp.asarray(x)) @ dirs.T, 6)
  np.testing.assert_array_equal(streamed.indices, one_shot.indices)
  np.testing.assert_array_equal(streamed.scores, one_shot.scores)


def test_dict_valued_phi_from_flax_model():
  # 16x16 inputs keep the test fast: conv1 12x12, pool1 6x6, conv2 2x2, pool2 1x1.
  model = models.get_model("mnist_conv", channels=(2, 3), hidden=8, image_shape=(16, 16, 1))
  x = _data(40, (16, 16, 1))
  variables = random_variables(model, (16, 16, 1))
  phi = models.feature_fn(model)
  dims = units.feature_dims(phi, variables, x[:1])
  # The model's own layer order survives (jax returns dicts with sorted keys).
  assert list(dims) == ["conv1", "pool1", "conv2", "pool2", "fc1"]
  assert dims["fc1"] == 8 and dims["conv1"] == 12 * 12 * 2
  dirs = {"conv1": units.random_directions(0, 5, dims["conv1"]), "fc1": units.natural_directions(8, [1, 5])}
  top = units.top_k_images(phi, variables, x, dirs, k=4, batch_size=16)
  assert list(top) == ["conv1", "fc1"]
  feats = jax.jit(phi)(variables, x)
  for name in dirs:
    scores = feats[name].reshape(40, -1) @ dirs[name].T
    ref = _top_k_one_shot(scores, 4)
    np.testing.assert_array_equal(top[name].indices, ref.indices)
  with pytest.raises(ValueError, match="directions for layer 'nope'"):
    units.top_k_images(phi, variables, x, {"nope": dirs["fc1"]}, k=4)


def test_no_retrace_for_new_directions_of_same_shape():
  traces = []
  w = np.eye(36, 10, dtype=np.float32)

  def phi(p, x):
    if x.shape[0] == 8:  # the compiled step's batch (feature_dims traces one example, compiling nothing)
      traces.append(1)  # runs only while tracing
    return x.reshape(x.shape[0], -1) @ p

  x = _data(30)
  units.top_k_images(phi, w, x, units.random_directions(0, 4, 10), k=3, batch_size=8)
  n = len(traces)
  units.top_k_images(phi, w, x, units.random_directions(1, 4, 10), k=3, batch_size=8)
  units.top_k_images(phi, 2 * w, x, units.random_directions(1, 4, 10), k=3, batch_size=8)  # new params
  assert len(traces) == n


def test_random_directions_unit_norm_and_reproducible():
  a = units.random_directions(3, 100, 64)
  assert a.shape == (100, 64)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(a, units.random_directions(3, 100, 64))
  np.testing.assert_array_equal(a, units.random_directions(jax.random.PRNGKey(3), 100, 64))
  assert not np.allclose(a, units.random_directions(4, 100, 64))
  # Isotropic: the mean direction of many unit vectors is near zero (|mean| ~ 1/sqrt(num) = 0.1 here).
  assert np.linalg.norm(np.asarray(a).mean(axis=0)) < 0.3


def test_natural_directions_and_sample_units():
  e = units.natural_directions(5, [0, 3])
  np.testing.assert_array_equal(e, [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]])
  u = units.sample_units(0, 1000, 20)
  assert len(set(u.tolist())) == 20 and u.min() >= 0 and u.max() < 1000
  np.testing.assert_array_equal(u, units.sample_units(0, 1000, 20))
  np.testing.assert_array_equal(units.sample_units(0, 8, 20), np.arange(8))
  with pytest.raises(ValueError, match="units must lie"):
    units.natural_directions(5, [5])
  with pytest.raises(ValueError, match="integer indices"):   # was numpy's IndexError
    units.natural_directions(5, [1.0, 3.0])


def test_coherence_known_values():
  labels = np.array([[1, 1, 1, 1], [0, 1, 2, 3], [2, 2, 0, 0]])
  img = np.zeros((3, 4, 2, 2), np.float32)
  img[0] = 1.0                       # identical images: cosine 1
  for j in range(4):                 # mutually orthogonal images: cosine 0
    img[1, j].flat[j] = 1.0
  img[2, :, 0, 0] = 1.0
  coh = units.coherence(labels, images=img, num_classes=4)
  np.testing.assert_allclose(coh.majority_share, [1.0, 0.25, 0.5])
  np.testing.assert_array_equal(coh.majority_label, [1, 0, 0])
  np.testing.assert_allclose(coh.label_entropy, [0.0, 2.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(coh.pixel_similarity, [1.0, 0.0, 1.0], atol=1e-6)
  assert np.all(np.isnan(units.coherence(labels, num_classes=4).pixel_similarity))
  with pytest.raises(ValueError, match="labels must lie"):
    units.coherence(labels, num_classes=3)


def test_compare_distributions_known_answers():
  # Fully separated samples of 5 and 5: exact two-sided Mann-Whitney p = 2 / C(10, 5) = 2/252, A = 1, and
  # the permutation p estimates the same exact probability (binomial s.e. ~ 0.0006 at 20000 draws).
  a, b = np.arange(5, 10, dtype=float), np.arange(5, dtype=float)
  c = units.compare_distributions(a, b, num_permutations=20000, seed=0)
  assert c.effect_a == 1.0 and c.magnitude == "large"
  np.testing.assert_allclose(c.p_mannwhitney, 2 / 252, rtol=1e-6)
  assert abs(c.p_permutation - 2 / 252) < 0.003
  assert c.significant and c.verdict.startswith("distinguishable") and "natural more coherent" in c.verdict
  # Lower is better (entropy): the same separation makes b ("random") the more coherent one.
  assert "random more coherent" in units.compare_distributions(a, b, higher_is_better=False).verdict
  # The same distribution twice: nothing to find.
  x = np.random.default_rng(0).normal(size=200)
  same = units.compare_distributions(x, x.copy(), num_permutations=2000)
  assert same.effect_a == 0.5 and same.p_permutation == 1.0 and same.verdict == "not distinguishable"
  const = units.compare_distributions(np.ones(4), np.ones(6), num_permutations=100)
  assert const.p_mannwhitney == 1.0 and not const.significant
  # Reproducible by seed.
  y = np.random.default_rng(1).normal(size=50) + 0.3
  assert (units.compare_distributions(x[:50], y, seed=5).p_permutation
          == units.compare_distributions(x[:50], y, seed=5).p_permutation)


def test_holm_adjust_known_answer():
  base = units.compare_distributions([1.0, 2.0], [3.0, 4.0], num_permutations=10)
  fam = {name: base._replace(p_value=p, p_adjusted=p) for name, p in
         [("majority_share", 0.01), ("label_entropy", 0.04), ("pixel_similarity", 0.03)]}
  adj = units.holm_adjust(fam, alpha=0.05)
  # Sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06.
  np.testing.assert_allclose([adj[n].p_adjusted for n in fam], [0.03, 0.06, 0.06])
  assert [adj[n].significant for n in fam] == [True, False, False]
  assert list(adj) == list(fam)
  assert adj["label_entropy"].verdict == "not distinguishable"


def test_label_detector_unit_is_found():
  rng = np.random.default_rng(0)
  n, detector_label = 400, 3
  labels = rng.integers(0, 5, n).astype(np.int32)
  x = rng.uniform(0.0, 0.5, size=(n, 8, 8, 1)).astype(np.float32)
  x[labels == detector_label, 2, 5, 0] = 1.0  # unit 2*8+5 = 21 fires for label 3 only
  phi = lambda x: x.reshape(x.shape[0], -1)  # natural basis = pixels
  res = units.analyse(_no_params(phi), None, x, labels, key=0, num_directions=64, k=10, num_classes=5, num_permutations=500)
  r = res["features"]
  np.testing.assert_array_equal(r.units, np.arange(64))
  best = int(np.argmax(r.natural_coherence.majority_share))
  assert r.units[best] == 21
  assert r.natural_coherence.majority_share[best] == 1.0
  assert r.natural_coherence.majority_label[best] == detector_label
  assert r.natural_coherence.label_entropy[best] == 0.0
  assert np.all(labels[r.natural.indices[best]] == detector_label)
  # Every other pixel is pure noise: near chance (majority of 10 labels out of 5: ~0.3-0.4).
  others = np.delete(r.natural_coherence.majority_share, best)
  assert others.max() < 1.0
  assert set(r.comparisons) == set(units.MEASURES)
  rows = units.summary_rows(res)
  assert len(rows) == 3 and rows[0]["layer"] == "features"
  (row,) = units.verdict_rows(res, prefix={"model": "toy"})
  assert row["model"] == "toy" and row["units n"] == 64
  # One detector among 63 noise pixels: the natural units as a whole are not above chance.
  assert row["above chance"] in ("neither", "random only")


@pytest.mark.slow
def test_analyse_natural_better_when_units_are_detectors():
  # Every unit detects one label (units i, i+5, ... for label i) under noise. A random mixture's top images
  # mostly come from the label with the largest total weight (coherent too -- the paper's point), but
  # near-ties between labels make many rows mixed: the natural basis must come out significantly more
  # coherent. This is the test that the verdict can say "distinguishable" (measured with these settings:
  # majority share 0.975 vs 0.78, A = 0.86, Holm p = 0.0015, the permutation floor for 3 x 2000 draws).
  rng = np.random.default_rng(1)
  n = 600
  labels = rng.integers(0, 5, n).astype(np.int32)
  onehot = np.eye(5, dtype=np.float32)[labels]
  x = (np.tile(onehot, (1, 4)) + 0.5 * rng.normal(size=(n, 20))).astype(np.float32)
  phi = lambda x: jnp.maximum(x, 0.0)
  res = units.analyse(_no_params(phi), None, x, labels, key=0, num_directions=20, k=10, num_classes=5, num_permutations=2000)
  for measure, c in res["features"].comparisons.items():
    assert c.significant and c.magnitude == "large" and "natural more coherent" in c.verdict, measure
  c = res["features"].comparisons["majority_share"]
  assert c.mean_a > c.mean_b and c.effect_a > 0.71
  (row,) = units.verdict_rows(res)
  assert row["above chance"] == "both" and row["claim"] == "natural basis more coherent on 3/3 measures"


@pytest.mark.slow
def test_analyse_rotated_detectors_support_the_claim():
  # The same label detectors seen through a random rotation: each unit is now itself a random mixture,
  # so natural and random directions have the same distribution -- both above chance, indistinguishable.
  rng = np.random.default_rng(1)
  n = 600
  labels = rng.integers(0, 5, n).astype(np.int32)
  x = np.tile(np.eye(5, dtype=np.float32)[labels], (1, 4)) + 0.5 * rng.normal(size=(n, 20))
  q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  x, q = (x @ q).astype(np.float32), np.eye(20, dtype=np.float32)  # phi = a plain-JAX f(params, x)
  res = units.analyse(lambda p, x: x @ p, q, x @ q.T, labels, key=0, num_directions=20, k=10, num_classes=5,
                      num_permutations=2000)
  (row,) = units.verdict_rows(res)
  assert row["above chance"] == "both"
  assert row["natural vs random"] == "not distinguishable" and row["claim"] == "supported"


def test_bad_inputs_raise_value_error():
  x = _data(10)
  w = _linear_params(36, 4)
  dirs = units.random_directions(0, 3, 4)
  with pytest.raises(ValueError, match="k must be"):
    units.top_k_images(_linear, w, x, dirs, k=11)
  with pytest.raises(ValueError, match=r"must be \[D, 4\]"):
    units.top_k_images(_linear, w, x, units.random_directions(0, 3, 5), k=2)
  bad = x.copy()
  bad[3, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    units.top_k_images(_linear, w, bad, dirs, k=2)
  with pytest.raises(ValueError, match="non-finite scores"):
    units.top_k_images(lambda p, x: jnp.log(x.reshape(x.shape[0], -1) - 0.5), None, x,
                       units.random_directions(0, 3, 36), k=2)
  with pytest.raises(ValueError, match="batch_size"):
    units.top_k_images(_linear, w, x, dirs, k=2, batch_size=0)
  with pytest.raises(ValueError, match="labels"):
    units.analyse(_linear, w, x, np.zeros(9, np.int32), key=0)
  with pytest.raises(ValueError, match="layers"):
    units.analyse(_linear, w, x, np.zeros(10, np.int32), key=0, layers=["conv9"], num_directions=2, k=2)
  with pytest.raises(ValueError, match="num_permutations"):
    units.compare_distributions([1.0], [2.0], num_permutations=0)


@pytest.mark.slow
def test_run_experiment_on_synthetic_mnist(tmp_path, synthetic_idx_dir):
  from intriguing_jax.configs import unit_analysis as unit_config
  config = unit_config.get_config("smoke")
  config.num_train, config.num_images, config.num_show = 512, 128, 1
  out = units.run_experiment(config, str(tmp_path), synthetic_idx_dir)
  assert [row["layer"] for row in out["claim"]] == ["hidden_0", "hidden_1"]
  assert 0 <= out["models"]["fc100-100-10"]["test_error"] <= 1
  for name in ("report.md", "results.json", "fig_fc100-100-10_hidden_0.png", "hist_fc100-100-10_hidden_1.png"):
    assert (tmp_path / name).exists(), name
  config.num_show = 100
  with pytest.raises(ValueError, match="num_show"):
    units.run_experiment(config, str(tmp_path), synthetic_idx_dir)
