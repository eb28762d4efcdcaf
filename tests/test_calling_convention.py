"""The one calling convention: a plain-JAX ``f(params, x)`` with a params pytree, no Flax anywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import attack
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import spectral
from intriguing_jax import units


def _init(key):
  k1, k2 = jax.random.split(key)
  return {"hidden": {"w": jax.random.normal(k1, (784, 32)) / 28.0, "b": jnp.zeros((1, 32))},
          "out": [jax.random.normal(k2, (32, 10)) / 4.0, jnp.zeros((1, 10))]}


def _features(params, x):
  h = jax.nn.sigmoid(x.reshape(x.shape[0], -1) @ params["hidden"]["w"] + params["hidden"]["b"])
  return {"hidden": h}


def _logits(params, x):
  w, b = params["out"]
  return _features(params, x)["hidden"] @ w + b


@pytest.mark.slow
def test_a_plain_jax_model_goes_through_attack_metrics_units_and_the_lipschitz_bound():
  params = _init(jax.random.PRNGKey(0))
  x, y = data.synthetic_mnist(64, seed=0, image_shape=(28, 28, 1))
  x = np.asarray(x, np.float32)

  pred = metrics.predict(_logits, params, x)
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(_logits(params, x)), -1))
  assert metrics.error_rate(_logits, params, x, y) == np.mean(pred != np.asarray(y))

  x8, p8 = x[:8], pred[:8]
  target = (p8 + 1) % 10
  res = attack.lbfgs_attack(_logits, params, x8, target, attack.AttackOptions(maxiter=30, num_bisection=2))
  ok = np.asarray(res.success)
  assert ok.mean() >= 0.75
  np.testing.assert_array_equal(metrics.predict(_logits, params, np.asarray(res.x_adv))[ok], target[ok])

  analysis = units.analyse(_features, params, x, y, key=0, num_directions=8, k=4, num_permutations=200)
  assert list(analysis) == ["hidden"]

  bound = spectral.empirical_lipschitz(_logits, params, x[:4], num_steps=5)
  w1, w2 = np.asarray(params["hidden"]["w"], np.float64), np.asarray(params["out"][0], np.float64)
  # sigmoid' <= 1/4: the product of the two layers' norms / 4 bounds every local Jacobian norm.
  upper = np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2) / 4
  assert 0 < float(bound.lower_bound) <= upper * (1 + 1e-4)
