"""Tests of intriguing_jax.certify: the pairwise Lipschitz bounds, the radii, exactness on linear models,
soundness against random and adversarial perturbations, and the bracket on real trained MNIST models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from intriguing_jax import attack
from intriguing_jax import certify
from intriguing_jax import data
from intriguing_jax import exact
from intriguing_jax import models
from intriguing_jax import tables
from intriguing_jax import train

SHAPE = (6, 6, 1)


def _init(model, seed=0, scale=1.0):
  return random_variables(model, SHAPE, seed=seed, scale=0.2 * scale)   # ~Flax's N(0, 1 / fan_in), fan_in 36


def test_radii_by_hand():
  logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
  lip = jnp.array([[0.0, 2.0, 1.0], [2.0, 0.0, 4.0], [1.0, 4.0, 0.0]])
  cert = certify.radii(logits, lip, jnp.array([1, 1]))
  np.testing.assert_array_equal(cert.prediction, [0, 1])
  np.testing.assert_allclose(cert.radius, [min(2 / 2, 3 / 1), min(2 / 2, 0.5 / 4)])
  np.testing.assert_allclose(cert.radius_to_target, [2 / 2, 0.0])  # already the target: 0
  assert np.all(np.isnan(certify.radii(logits, lip).radius_to_target))
  with pytest.raises(ValueError, match=r"\[3, 3\]"):
    certify.radii(logits, jnp.ones((4, 4)))


def test_lipschitz_matrix_of_linear_and_sigmoid_networks():
  fc10 = models.FC10(num_classes=4)
  v = _init(fc10)
  w = np.asarray(v["params"]["output"]["kernel"], np.float64)
  lip = certify.lipschitz_matrix(fc10, v, SHAPE)
  want = np.linalg.norm(w[:, :, None] - w[:, None, :], axis=0)
  np.testing.assert_allclose(lip.pairwise, want, rtol=1e-5)
  assert lip.prefix == pytest.approx(1.0)
  mlp = models.SigmoidMLP(widths=(8, 5), num_classes=4)
  v = _init(mlp, seed=1)
  norms = [np.linalg.norm(np.asarray(v["params"][k]["kernel"]), 2) for k in ("hidden_0", "hidden_1", "output")]
  lip = certify.lipschitz_matrix(mlp, v, SHAPE)
  assert lip.prefix == pytest.approx(norms[0] * norms[1] / 16, rel=1e-5)  # sigmoid: 1/4 per hidden layer
  assert lip.global_bound == pytest.approx(np.prod(norms) / 16, rel=1e-5)
  assert np.max(lip.pairwise) <= np.sqrt(2) * lip.global_bound * (1 + 1e-6)  # never looser than the product


def test_linear_radius_is_exact_without_the_box():
  """FC10: the nearest point of another class lies at exactly the certified radius (no box)."""
  fc10 = models.FC10(num_classes=4)
  v = _init(fc10, seed=2, scale=3.0)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(16,) + SHAPE), jnp.float32)
  lip = certify.lipschitz_matrix(fc10, v, SHAPE)
  cert = certify.certify(fc10.apply, v, x, lip)
  w = np.asarray(v["params"]["output"]["kernel"], np.float64)
  z = np.asarray(fc10.apply(v, x), np.float64)
  for b in range(x.shape[0]):
    i = int(cert.prediction[b])
    ratios = [(z[b, i] - z[b, j]) / np.linalg.norm(w[:, i] - w[:, j]) if j != i else np.inf for j in range(4)]
    j = int(np.argmin(ratios))
    d = (w[:, j] - w[:, i]) / np.linalg.norm(w[:, j] - w[:, i])
    step = lambda s: np.asarray(x[b]).reshape(-1) + s * d
    assert cert.radius[b] == pytest.approx(ratios[j], rel=1e-4)
    beyond = fc10.apply(v, jnp.asarray(step(cert.radius[b] * 1.001).reshape((1,) + SHAPE), jnp.float32))
    before = fc10.apply(v, jnp.asarray(step(cert.radius[b] * 0.999).reshape((1,) + SHAPE), jnp.float32))
    assert int(jnp.argmax(beyond)) != i and int(jnp.argmax(before)) == i


@pytest.mark.parametrize("target, match", [([0, 4], "out of range"), ([0, -1], "out of range"),
                                           ([0.0, 2.9], "integer labels"), ([0], "shape")])
def test_certify_refuses_bad_targets(target, match):
  # A class >= K gave NaN radii, -1 wrapped to the last class (an infinite radius), floats were truncated.
  fc10 = models.FC10(num_classes=4)
  v = _init(fc10)
  x = np.zeros((2,) + SHAPE, np.float32)
  with pytest.raises(ValueError, match=match):
    certify.certify(fc10.apply, v, x, np.ones((4, 4), np.float32), target=np.asarray(target))
  with pytest.raises(ValueError, match="batch_size"):
    certify.certify(fc10.apply, v, x, np.ones((4, 4), np.float32), batch_size=0)
  cert = certify.certify(fc10.apply, v, x, np.ones((4, 4), np.float32))
  with pytest.raises(ValueError, match="one per certified example"):   # was numpy's broadcast error
    certify.certified_accuracy(cert, np.zeros(3, np.int32), 0.3)


def test_no_perturbation_inside_the_radius_changes_a_sigmoid_network():
  mlp = models.SigmoidMLP(widths=(8,), num_classes=3)
  v = _init(mlp, seed=3, scale=0.2)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(8,) + SHAPE), jnp.float32)
  cert = certify.certify(mlp.apply, v, x, certify.lipschitz_matrix(mlp, v, SHAPE))
  dirs = np.random.default_rng(2).normal(size=(256, int(np.prod(SHAPE))))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  for b in range(x.shape[0]):
    pts = np.asarray(x[b]).reshape(1, -1) + 0.999 * cert.radius[b] * dirs
    pred = np.argmax(np.asarray(mlp.apply(v, jnp.asarray(pts.reshape((-1,) + SHAPE), jnp.float32))), -1)
    assert np.all(pred == cert.prediction[b])


@pytest.mark.integration
@pytest.mark.slow
def test_bracket_on_real_trained_models(mnist_dir, tmp_path):
  """Real MNIST: FC10(1e-4) (its recipe) and FC100-100-10 (2 epochs). On 50 test images: certified radius
  toward the target <= the exact box-constrained optimum (FC10) <= the attack's distortion, for every
  example; and the bracket is tight on FC10 (some example within 10 % of the attack), so a bound that is
  too large or an attack distortion that is too large fails it."""
  x_train, y_train = data.load_mnist("train", data_dir=str(mnist_dir))
  x, y = data.load_mnist("test", data_dir=str(mnist_dir))
  x, y = x[:50], y[:50]
  targets = tables.draw_targets(y, seed=0)
  for name, epochs in (("fc10-1e-4", None), ("fc100-100-10", 2)):
    model, v = train.get_or_train(name, x_train, y_train, workdir=str(tmp_path), epochs=epochs)
    lip = certify.lipschitz_matrix(model, v, x.shape[1:])
    res = attack.lbfgs_attack(model.apply, v, x, targets)
    assert np.all(np.asarray(res.success))
    adv = {name: tables.AdversarialSet(x=x, labels=y, targets=targets, x_adv=np.asarray(res.x_adv),
                                       success=np.asarray(res.success), c=np.asarray(res.c),
                                       distortion=tables.rms(x, res.x_adv), clean_correct=y == y)}
    (row,) = certify.bracket({name: tables.Model(model.apply, v)}, adv, {name: lip})
    cert = certify.certify(model.apply, v, x, lip, target=targets)
    to_target = certify.rms(cert.radius_to_target, 784)
    d = adv[name].distortion
    assert row["violations"] == 0 and np.all(to_target <= d * (1 + 1e-6)), (to_target - d).max()
    assert 0 < row["ratio"] < 1 and row["certified"] <= row["certified_to_target"]
    if name == "fc10-1e-4":
      kernel, bias = exact.dense_kernel_bias(v)
      opt = exact.linear_min_norm(kernel, bias, x, targets).distortion
      assert np.all(to_target <= opt * (1 + 1e-6)) and np.all(opt <= d * (1 + 1e-4))
      assert np.max(to_target / d) > 0.9, np.max(to_target / d)
