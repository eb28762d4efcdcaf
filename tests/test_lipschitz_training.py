"""Tests of the Lipschitz penalty of the training driver (``train.lipschitz_penalty``, issue 19 item 3).

Oracles: the dense SVD of the kernel and of a strided circular convolution's explicit matrix (the penalty
must be the exact norm, not a bound), ``spectral.lipschitz_table`` (the norms the certificates use), central
finite differences in float64 (the gradient), separate runs (a vmapped μ sweep), the run without the penalty
(μ = 0 changes nothing).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import spectral
from intriguing_jax import train


class _StridedNet(nn.Module):
  """conv 3x3 stride 2 (``padding``) -> ReLU -> flatten -> dense: a strided conv inside a trainable model."""
  padding: str = "CIRCULAR"

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = models.Activation("relu", name="relu")(nn.Conv(3, (3, 3), strides=2, padding=self.padding, name="conv")(x))
    return nn.Dense(10, name="output")(models.Flatten(name="flatten")(h))


def _init(model, shape, seed=0):
  """Random params of the model's shapes, as Flax draws them (kernels N(0, 1 / fan_in), biases 0), drawn by
  numpy: compiling ``model.init`` costs ~1 s per model and the tests need only generic values."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
                                            if len(s.shape) > 1 else np.zeros(s.shape), jnp.float32), shapes)


def _dense_matrix(fn, in_shape):
  """The matrix [out, in] of a linear map ``fn(x [*in_shape]) -> [...]`` from the images of the basis."""
  n = int(np.prod(in_shape))
  basis = jnp.eye(n, dtype=jnp.float64).reshape((n,) + in_shape)
  return np.asarray(jax.vmap(fn)(basis)).reshape(n, -1).T


@pytest.fixture(scope="module")
def tiny():
  x, y = data.synthetic_mnist(256, seed=0)
  return np.asarray(x, np.float32), np.asarray(y, np.int32)


def test_layer_norms_equal_the_exact_norms_dense_and_strided_conv():
  # Strided circular conv: the penalty's σ equals σ_max of the operator's explicit matrix (float64).
  model, shape = _StridedNet(), (8, 8, 2)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _init(model, shape))
    layers = train.penalty_layers(model, shape)
    assert [(l.path, l.kind, l.grid, l.strides) for l in layers] == [
        (("conv",), "conv", (4, 4), (2, 2)), (("output",), "dense", None, None)]
    kernel, w = params["conv"]["kernel"], params["output"]["kernel"]
    op = _dense_matrix(lambda x: spectral.conv_apply(kernel, jnp.asarray(x), (2, 2), "CIRCULAR"), shape)
    want = [np.linalg.svd(op, compute_uv=False)[0], np.linalg.svd(np.asarray(w), compute_uv=False)[0]]
    norms = jax.jit(train.layer_norms, static_argnums=1)   # one compile, not one per op
    np.testing.assert_allclose(np.asarray(norms(params, layers)), want, rtol=1e-10)
  # Zero-padded strided convs: σ equals the certified upper bound spectral.py reports (float32); SAME pads
  # 8 -> 9 here, so its grid is 5, not 4.
  for padding, grid in (("VALID", (4, 4)), ("SAME", (5, 5))):
    model = _StridedNet(padding=padding)
    params = _init(model, shape, seed=1)
    layers = train.penalty_layers(model, shape)
    assert layers[0].grid == grid
    got = norms(params, layers)
    conv = spectral.conv_operator_norm(params["conv"]["kernel"], input_shape=shape, strides=2, padding=padding)
    want = [conv.upper, spectral.dense_operator_norm(params["output"]["kernel"])]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)  # float32 Gram vs float32 SVD


def test_penalty_forms_values():
  model = models.get_model("fc16-16-10")
  params = _init(model, models.MNIST_SHAPE)
  layers = train.penalty_layers(model, models.MNIST_SHAPE)
  kernels = [np.asarray(params[n]["kernel"], np.float64) for n in ("hidden_0", "hidden_1", "output")]
  sig = np.array([np.linalg.svd(k, compute_uv=False)[0] for k in kernels])
  mu, target = 0.3, 0.5
  def grams(k):
    g = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
    return np.sum((g - np.eye(g.shape[0])) ** 2)
  want = {"sum": mu * sig.sum(), "hinge": mu * np.sum(np.maximum(sig - target, 0) ** 2),
          "log": mu * np.log(sig).sum(), "parseval": mu * sum(grams(k) for k in kernels)}
  for form, value in want.items():
    got = train.lipschitz_penalty(params, jnp.float32(mu), layers, form, target=target)
    assert float(got) == pytest.approx(value, rel=1e-4), form
  frozen = train.lipschitz_penalty(params, jnp.float32(mu), layers, "sum", trainable=("output",))
  assert float(frozen) == pytest.approx(mu * sig[2], rel=1e-4)   # frozen layers are not penalised


def test_penalty_gradient_matches_finite_differences():
  forms = ("sum", "hinge", "log", "parseval")
  model, shape = _StridedNet(), (8, 8, 2)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _init(model, shape, seed=2))
    layers = train.penalty_layers(model, shape)
    rng = np.random.RandomState(3)   # numpy: no threefry to compile
    direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float64), params)
    f = lambda p: jnp.stack([train.lipschitz_penalty(p, 0.7, layers, form, target=0.5) for form in forms])
    jac = jax.jit(jax.jacrev(f))(params)
    analytic = sum(jnp.tensordot(j, d, axes=d.ndim) for j, d in zip(jax.tree.leaves(jac), jax.tree.leaves(direction)))
    eps = 1e-5
    shifted = jax.jit(lambda s: f(jax.tree.map(lambda a, d: a + s * eps * d, params, direction)))
    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    # Central differences in float64: O(eps²) truncation, far below 1e-6 relative here.
    np.testing.assert_allclose(np.asarray(analytic), np.asarray(numeric), rtol=1e-6)
    assert np.all(np.abs(np.asarray(analytic)) > 1e-3)  # every form's derivative is non-trivial here


def test_config_validation():
  assert train.TrainConfig().to_dict()["lipschitz_penalty"] == "none"
  on = train.TrainConfig(lipschitz_penalty="hinge", lipschitz_strength=0.1)
  assert on.to_dict()["lipschitz_strength"] == 0.1
  with pytest.raises(ValueError, match="lipschitz_penalty"):
    train.TrainConfig(lipschitz_strength=0.1)                      # μ > 0 with the penalty off
  with pytest.raises(ValueError, match="lipschitz_penalty"):
    train.TrainConfig(lipschitz_penalty="spectral")
  with pytest.raises(ValueError, match="μ"):
    train.TrainConfig(lipschitz_penalty="sum", lipschitz_strength=-1.0)
  with pytest.raises(ValueError, match="lipschitz_strengths"):
    train.sweep_members(3, on, [None], [0, 1], "who", lipschitz_strengths=[0.0, 1.0, 2.0])
  hyper, seeds = train.sweep_members(3, on, [1e-4], [0, 1], "who", lipschitz_strengths=[None, 0.5])
  np.testing.assert_array_equal(hyper.lipschitz_strength, np.float32([0.1, 0.5]))
  assert hyper.weight_decay.shape == (2, 3) and seeds == [0, 1]


_CFG = dict(epochs=3, batch_size=32, learning_rate=1e-2, weight_decay=(1e-4,))


def _product(model, params):
  return float(np.prod(np.asarray(train.layer_norms(params, train.penalty_layers(model, models.MNIST_SHAPE)))))


@pytest.mark.slow
def test_mu_sweep_equals_separate_runs_and_mu_zero_changes_nothing(tiny):
  x, y = tiny
  model = models.get_model("fc16-16-10", dropout_rate=0.1)
  cfg = train.TrainConfig(lipschitz_penalty="hinge", **_CFG)
  sweep = train.train_sweep(model, x, y, cfg, seeds=[1], data_seed=1, lipschitz_strengths=[0.0, 0.05])
  np.testing.assert_array_equal(sweep.lipschitz_strengths, np.float32([0.0, 0.05]))
  single = train.train_model(model, x, y, train.TrainConfig(lipschitz_penalty="hinge", lipschitz_strength=0.05,
                                                            **_CFG), seed=1)
  off = train.train_model(model, x, y, train.TrainConfig(**_CFG), seed=1)
  for a, b in zip(jax.tree.leaves(sweep.variables[1]), jax.tree.leaves(single.variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)   # vmap vs unbatched rounding
  for a, b in zip(jax.tree.leaves(sweep.variables[0]), jax.tree.leaves(off.variables)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)   # μ = 0: the plain run
  assert not np.allclose(np.asarray(sweep.variables[0]["params"]["output"]["kernel"]),
                         np.asarray(sweep.variables[1]["params"]["output"]["kernel"]), atol=1e-3)


@pytest.mark.slow
def test_penalty_lowers_the_product_of_layer_bounds(tiny):
  x, y = tiny
  for name, kwargs, form, mu in (("fc16-16-10", {}, "sum", 0.1),
                                 ("mnist_conv", dict(channels=(4, 8), hidden=16), "log", 0.1)):
    model = models.get_model(name, **kwargs)
    cfg = train.TrainConfig(lipschitz_penalty=form, **_CFG)
    sweep = train.train_sweep(model, x, y, cfg, seeds=[0], lipschitz_strengths=[0.0, mu])
    plain, penalised = (_product(model, v["params"]) for v in sweep.variables)
    rows, _ = spectral.lipschitz_table(model, sweep.variables[1], models.MNIST_SHAPE)  # the norms certified
    assert np.prod([r["upper"] for r in rows if r["type"] in ("conv", "dense")]) == pytest.approx(penalised, rel=1e-4)
    assert penalised < 0.7 * plain, (name, plain, penalised)
    assert all(np.isfinite(h["loss"]).all() for h in sweep.history)
