import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_precisions
from intriguing_jax import metrics


def _linear(w, x):
  return x.reshape(x.shape[0], -1) @ w


def test_rms_distortion_matches_numpy():
  rng = np.random.RandomState(0)
  x = rng.rand(4, 3, 3, 1).astype(np.float32)
  y = rng.rand(4, 3, 3, 1).astype(np.float32)
  want = np.sqrt(((y - x) ** 2).reshape(4, -1).mean(1))
  np.testing.assert_allclose(metrics.rms_distortion(x, y), want, rtol=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.rms_distortion(x, y[:, :2])


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_error_rate_any_batch_size(batch_size):
  rng = np.random.RandomState(1)
  w = jnp.asarray(rng.randn(9, 4).astype(np.float32))
  x = rng.rand(7, 3, 3, 1).astype(np.float32)
  fn = functools.partial(_linear, w)
  pred = np.argmax(np.asarray(_linear(w, jnp.asarray(x))), -1)
  labels = pred.copy()
  labels[:2] = (labels[:2] + 1) % 4
  assert metrics.error_rate(fn, x, labels, batch_size=batch_size) == pytest.approx(2 / 7)
  with pytest.raises(ValueError, match="labels shape"):
    metrics.error_rate(fn, x, labels[:3])


@pytest.mark.parametrize("precision, expected", [("highest", jax.lax.Precision.HIGHEST),
                                                 (None, jax.lax.Precision.DEFAULT)])
def test_predict_traces_under_the_requested_matmul_precision(precision, expected):
  # The evaluation of adversarial examples must classify them as the (float32) attack did, also where the
  # ambient float32 matmul is TF32 (GPU); None keeps the ambient setting, here "default".
  w = jnp.ones((9, 4), jnp.float32)
  fn = functools.partial(_linear, w)
  with jax.default_matmul_precision("default"):
    jaxpr = jax.make_jaxpr(metrics._argmax_fn(fn, precision))(jnp.zeros((2, 3, 3, 1)))  # pylint: disable=protected-access
  precisions = dot_precisions(jaxpr.jaxpr)
  assert precisions and all(p == (expected, expected) for p in precisions), precisions
  x = np.random.RandomState(0).rand(5, 3, 3, 1).astype(np.float32)
  np.testing.assert_array_equal(metrics.predict(fn, x, precision=precision),
                                np.argmax(np.asarray(_linear(w, jnp.asarray(x))), -1))
  with pytest.raises(ValueError, match="precision"):
    metrics.error_rate(fn, x, np.zeros(5, np.int32), precision="fastest")
