"""Tests of intriguing_jax.metrics: RMS distortion, predict / error_rate with traced params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_precisions
from intriguing_jax import metrics


def _linear(w, x):
  return x.reshape(x.shape[0], -1) @ w


def _tree_model(params, x):  # a plain-JAX model with a nested params pytree
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params["layer"]["w"]) @ params["out"]


def test_rms_distortion_matches_numpy():
  rng = np.random.RandomState(0)
  x = rng.rand(4, 3, 3, 1).astype(np.float32)
  y = rng.rand(4, 3, 3, 1).astype(np.float32)
  want = np.sqrt(((y - x) ** 2).reshape(4, -1).mean(1))
  np.testing.assert_allclose(metrics.rms_distortion(x, y), want, rtol=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.rms_distortion(x, y[:, :2])
  # Integer images count by their values (uint8 arithmetic would wrap: 0 vs 16 gave 0, 0 vs 255 gave 1).
  zeros = np.zeros((2, 4), np.uint8)
  np.testing.assert_allclose(metrics.rms_distortion(zeros, np.array([[16] * 4, [255] * 4], np.uint8)),
                             [16.0, 255.0])


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_error_rate_any_batch_size(batch_size):
  rng = np.random.RandomState(1)
  w = jnp.asarray(rng.randn(9, 4).astype(np.float32))
  x = rng.rand(7, 3, 3, 1).astype(np.float32)
  pred = np.argmax(np.asarray(_linear(w, jnp.asarray(x))), -1)
  labels = pred.copy()
  labels[:2] = (labels[:2] + 1) % 4
  assert metrics.error_rate(_linear, w, x, labels, batch_size=batch_size) == pytest.approx(2 / 7)
  with pytest.raises(ValueError, match="labels shape"):
    metrics.error_rate(_linear, w, x, labels[:3])
  with pytest.raises(ValueError, match="labels must be integers"):
    metrics.error_rate(_linear, w, x, labels + 0.5)
  with pytest.raises(ValueError, match="batch_size"):
    metrics.predict(_linear, w, x, batch_size=0)


def test_params_are_traced_one_program_serves_every_model():
  rng = np.random.RandomState(2)
  x = rng.rand(6, 4).astype(np.float32)
  traces = []

  def model(params, xb):
    traces.append(1)
    return _tree_model(params, xb)

  for seed in range(3):
    r = np.random.RandomState(seed)
    params = {"layer": {"w": r.randn(4, 5).astype(np.float32)}, "out": r.randn(5, 3).astype(np.float32)}
    want = np.argmax(np.asarray(_tree_model(params, jnp.asarray(x))), -1)
    np.testing.assert_array_equal(metrics.predict(model, params, x, batch_size=4), want)
  assert len(traces) == 1   # other parameter values: same compiled program


@pytest.mark.parametrize("precision, expected", [("highest", jax.lax.Precision.HIGHEST),
                                                 (None, jax.lax.Precision.DEFAULT)])
def test_predict_traces_under_the_requested_matmul_precision(precision, expected):
  # The evaluation of adversarial examples must classify them as the (float32) attack did, also where the
  # ambient float32 matmul is TF32 (GPU); None keeps the ambient setting, here "default".
  w = jnp.ones((9, 4), jnp.float32)
  with jax.default_matmul_precision("default"):
    jaxpr = jax.make_jaxpr(metrics.argmax_fn(_linear, precision))(w, jnp.zeros((2, 3, 3, 1)))
  precisions = dot_precisions(jaxpr.jaxpr)
  assert precisions and all(p == (expected, expected) for p in precisions), precisions
  x = np.random.RandomState(0).rand(5, 3, 3, 1).astype(np.float32)
  np.testing.assert_array_equal(metrics.predict(_linear, w, x, precision=precision),
                                np.argmax(np.asarray(_linear(w, jnp.asarray(x))), -1))
  with pytest.raises(ValueError, match="precision"):
    metrics.error_rate(_linear, w, x, np.zeros(5, np.int32), precision="fastest")


def test_equal_modules_share_one_compiled_program():
  """Two equal Flax modules built separately: their ``apply`` methods are one compilation key."""
  import jax
  from intriguing_jax import models
  from intriguing_jax import types
  a, b = models.get_model("fc10"), models.get_model("fc10")
  assert a.apply != b.apply                       # Python compares bound methods by identity...
  assert types.static_fn(a.apply) == types.static_fn(b.apply)   # ...the key compares the modules
  assert hash(types.static_fn(a.apply)) == hash(types.static_fn(b.apply))
  assert types.static_fn(a.apply) != types.static_fn(models.get_model("fc100-100-10").apply)
  assert metrics.argmax_fn(a.apply) is metrics.argmax_fn(b.apply)
  v = a.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 28, 28, 1)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
  np.testing.assert_array_equal(types.static_fn(a.apply)(v, x), a.apply(v, x))
