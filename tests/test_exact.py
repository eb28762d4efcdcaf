"""Tests of intriguing_jax.exact: the float64 QP reference of the convex (linear softmax) case."""

import numpy as np
import pytest

from intriguing_jax import exact


def _slsqp_distortion(kernel, bias, x, target, box=(0.0, 1.0)):
  """The same QP solved in the primal by scipy SLSQP (an independent cross-check; small problems only)."""
  from scipy import optimize
  out = []
  for xi, t in zip(x.reshape(x.shape[0], -1), target):
    others = [j for j in range(kernel.shape[1]) if j != t]
    a, beta = kernel[:, t][None, :] - kernel[:, others].T, bias[t] - bias[others]   # a (x + r) + beta >= 0
    res = optimize.minimize(
        lambda r: r @ r, np.zeros(xi.size), jac=lambda r: 2 * r, method="SLSQP",
        bounds=list(zip(box[0] - xi, box[1] - xi)),
        constraints=[{"type": "ineq", "fun": lambda r, xi=xi, a=a, beta=beta: a @ (xi + r) + beta,
                      "jac": lambda r, a=a: a}], options={"ftol": 1e-14, "maxiter": 1000})
    out.append(np.sqrt(np.mean(res.x ** 2)))
  return np.asarray(out)


def _problem(seed, m=16, k=4, b=5):
  rng = np.random.RandomState(seed)
  kernel = rng.randn(m, k)
  bias = 0.1 * rng.randn(k)
  x = rng.uniform(0, 1, size=(b, m))
  pred = np.argmax(x @ kernel + bias, axis=1)
  target = (pred + rng.randint(1, k, size=b)) % k
  return kernel, bias, x, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_matches_primal_slsqp(seed):
  kernel, bias, x, target = _problem(seed)
  sol = exact.linear_min_norm(kernel, bias, x, target)
  primal = _slsqp_distortion(kernel, bias, x, target)
  np.testing.assert_allclose(sol.distortion, primal, rtol=1e-5)
  # Certified bounds: lower <= value, gap ~ 0.
  assert np.all(sol.lower_bound <= sol.distortion * (1 + 1e-12))
  np.testing.assert_allclose(sol.lower_bound, sol.distortion, rtol=1e-6)


def test_solution_is_feasible_on_boundary_and_in_box():
  kernel, bias, x, target = _problem(3, b=6)
  sol = exact.linear_min_norm(kernel, bias, x, target)
  assert sol.x_adv.min() >= 0 and sol.x_adv.max() <= 1
  logits = sol.x_adv @ kernel + bias
  for i in range(x.shape[0]):
    gaps = logits[i, target[i]] - np.delete(logits[i], target[i])
    assert gaps.min() > -1e-7           # feasible (up to round-off)
    assert gaps.min() < 1e-5            # and on the boundary (else a smaller r would do)
  assert np.all(sol.max_violation < 1e-7)


def test_unconstrained_two_class_closed_form():
  # Two classes, interior point, no box activity: r* = -g / ||a||^2 * a with g = a.x + beta.
  rng = np.random.RandomState(4)
  m = 10
  kernel = 0.05 * rng.randn(m, 2)
  bias = np.array([0.1, 0.0])
  x = np.full((1, m), 0.5)
  target = np.array([1])
  a = kernel[:, 1] - kernel[:, 0]
  g = a @ x[0] + bias[1] - bias[0]
  assert g < 0
  r = -g / (a @ a) * a
  assert np.all(np.abs(r) < 0.5)  # the box is not active
  sol = exact.linear_min_norm(kernel, bias, x, target)
  np.testing.assert_allclose(sol.x_adv[0], x[0] + r, atol=1e-9)


def test_already_target_and_infeasible():
  kernel = np.array([[1.0, 0.0], [0.0, 1.0]])
  bias = np.array([0.0, -5.0])  # class 1 can never win inside [0, 1]^2
  x = np.array([[0.6, 0.2], [0.3, 0.9]])
  sol = exact.linear_min_norm(kernel, bias, x, np.array([0, 1]))
  assert sol.distortion[0] == 0.0 and sol.feasible[0]
  assert not sol.feasible[1] and np.isinf(sol.distortion[1])


def test_bad_input():
  kernel, bias, x, target = _problem(0)
  with pytest.raises(ValueError, match="outside the box"):
    exact.linear_min_norm(kernel, bias, x + 1.0, target)
  # float32 inputs on the bounds of a box like (0.2, 0.8) are inside it (float32 0.8 > 0.8 in float64),
  # and the solution is the one for x clipped exactly.
  x32 = np.clip(x, 0.2, 0.8).astype(np.float32)
  sol = exact.linear_min_norm(kernel, bias, x32, target, box=(0.2, 0.8))
  ref = exact.linear_min_norm(kernel, bias, np.clip(x32.astype(np.float64), 0.2, 0.8), target, box=(0.2, 0.8))
  np.testing.assert_array_equal(sol.distortion, ref.distortion)
  with pytest.raises(ValueError, match="outside the box"):
    exact.linear_min_norm(kernel, bias, x32 + np.float32(1e-3), target, box=(0.2, 0.8))
  with pytest.raises(ValueError, match="target out of range"):
    exact.linear_min_norm(kernel, bias, x, target + 10)
  with pytest.raises(ValueError, match="values per example"):
    exact.linear_min_norm(kernel, bias, x[:, :3], target)
  bad = x.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="finite"):
    exact.linear_min_norm(kernel, bias, bad, target)


def test_dense_kernel_bias():
  params = {"params": {"Dense_0": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}}}
  k, b = exact.dense_kernel_bias(params)
  assert k.shape == (3, 2) and b.shape == (2,)
  with pytest.raises(ValueError, match="exactly one"):
    exact.dense_kernel_bias({"a": {"kernel": 1, "bias": 2}, "b": {"kernel": 1, "bias": 2}})
