"""Exact minimum-norm adversarial perturbation of a linear softmax classifier (the attack's reference).

Usage::

    import numpy as np
    from intriguing_jax import exact
    # logits(x) = x_flat @ kernel + bias, e.g. FC10: kernel [784, 10], bias [10]
    sol = exact.linear_min_norm(kernel, bias, x, target)        # x: [B, ...] in [0, 1], target: [B]
    sol.distortion            # [B] RMS distortion of the exact optimum D(x, l) (paper.md §3, §4.2)
    sol.lower_bound           # [B] certified lower bound on that RMS (from the dual), <= distortion

For a linear model ``z = W^T x + b`` the constraint ``f(x + r) = l`` (target wins) is the set of linear
inequalities ``(w_l - w_j) . (x + r) + b_l - b_j >= 0`` for every ``j != l``, so the paper's box-constrained
problem (paper.md §3)::

    minimise ||r||^2   s.t.   A (x + r) + beta >= 0,   lower <= x + r <= upper

is a convex QP with ``k - 1`` inequality rows. It is solved here in float64, independently of the attack
(no JAX, no penalty, no c search), through its Lagrange dual, which has only ``k - 1`` variables::

    g(mu) = min_{lower - x <= r <= upper - x}  ||r||^2 - mu . (A (x + r) + beta)
          = ||r(mu)||^2 - mu . (A (x + r(mu)) + beta),   r(mu) = clip(A^T mu / 2, lower - x, upper - x)

``g`` is concave and continuously differentiable (gradient ``-(A (x + r(mu)) + beta)``); it is maximised
over ``mu >= 0`` with scipy's L-BFGS-B, then polished by an active-set Newton step on the KKT system. By
weak duality ``g(mu) <= ||r*||^2`` for EVERY ``mu >= 0``, so ``sqrt(g(mu) / m)`` is a certified lower bound
on the optimal RMS distortion whatever the solver's accuracy; the primal point ``x + r(mu)`` gives the
matching upper bound once it is feasible (the duality gap is reported).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np


class ExactSolution(NamedTuple):
  """Exact optimum of the box-constrained minimum-norm problem, per example (all numpy float64)."""
  x_adv: np.ndarray          # [B, ...] the optimal point x + r* (in the box; on the decision boundary)
  distortion: np.ndarray     # [B] RMS sqrt(mean(r*^2)) (0 when x is already classified l)
  lower_bound: np.ndarray    # [B] certified lower bound on the optimal RMS (weak duality)
  max_violation: np.ndarray  # [B] max_j constraint violation of x_adv (<= ~1e-9 when solved)
  feasible: np.ndarray       # [B] bool: False when no box point is classified target (x_adv = x, inf)


def _constraints(kernel: np.ndarray, bias: np.ndarray, target: int) -> Tuple[np.ndarray, np.ndarray]:
  """Rows A [k-1, m] and offsets beta [k-1] with A x + beta >= 0 <=> target wins against every j."""
  others = [j for j in range(kernel.shape[1]) if j != target]
  a = (kernel[:, target][None, :] - kernel[:, others].T)
  beta = bias[target] - bias[others]
  return a, beta


def _box_feasible(a: np.ndarray, beta: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> bool:
  """Whether some point of the box satisfies A x + beta >= 0 (an LP; scipy's HiGHS)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  m = a.shape[1]
  # maximise s subject to A x + beta >= s, x in box; feasible iff the optimum s >= 0.
  c = np.zeros(m + 1)
  c[-1] = -1.0
  a_ub = np.concatenate([-a, np.ones((a.shape[0], 1))], axis=1)
  bounds = list(zip(lower, upper)) + [(None, 1e6)]
  res = optimize.linprog(c, A_ub=a_ub, b_ub=beta, bounds=bounds, method="highs")
  return bool(res.status == 0 and -res.fun >= -1e-12)


def _solve_one(a, beta, x, lower, upper, *, tol):
  """Dual L-BFGS-B + active-set polish for one example. Returns (r, dual value, scaled A, scaled beta)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  lo, hi = lower - x, upper - x
  scale = float(np.max(np.abs(a))) or 1.0  # rows scaled so mu is O(1); the problem is unchanged
  a_s, beta_s = a / scale, beta / scale

  def r_of(mu):
    return np.clip(0.5 * (a_s.T @ mu), lo, hi)

  def neg_dual(mu):
    r = r_of(mu)
    slack = a_s @ (x + r) + beta_s
    return -(r @ r - mu @ slack), slack

  k = a.shape[0]   # d(-g)/dmu = +slack (Danskin), so neg_dual returns (value, gradient)
  mu = np.zeros(k)
  mu, _, _ = optimize.fmin_l_bfgs_b(neg_dual, mu, bounds=[(0.0, None)] * k, m=20, factr=10.0, pgtol=tol,
                                    maxiter=20000, maxfun=40000)
  # Active-set polish: with the free pixels F (not clipped) and active rows S (mu > 0), the KKT system
  # is linear: r_F = A_SF^T mu_S / 2, r_clipped fixed, A_S (x + r) + beta_S = 0. A few Newton rounds.
  for _ in range(20):
    r = r_of(mu)
    slack = a_s @ (x + r) + beta_s
    act = (mu > 0) | (slack < 0)
    if not np.any(act):
      break
    u = 0.5 * (a_s.T @ mu)
    free = (u > lo) & (u < hi)
    a_af = a_s[act][:, free]
    rhs = -(a_s[act] @ (x + np.where(free, 0.0, r)) + beta_s[act])
    gram = 0.5 * (a_af @ a_af.T)
    try:
      mu_act = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    except np.linalg.LinAlgError:
      break
    new = mu.copy()
    new[act] = np.maximum(mu_act, 0.0)
    if neg_dual(new)[0] > neg_dual(mu)[0] + 1e-15 * max(1.0, abs(neg_dual(mu)[0])):
      break   # the Newton step does not improve the dual: keep mu
    converged, mu = np.allclose(new, mu, rtol=1e-13, atol=1e-15), new
    if converged:
      break
  r = r_of(mu)
  dual = -neg_dual(mu)[0]
  return r, dual, a_s, beta_s


def linear_min_norm(kernel, bias, x, target, *, box: Tuple[float, float] = (0.0, 1.0),
                    tol: float = 1e-12, check_feasible: bool = True) -> ExactSolution:
  """Exact D(x, l) for the linear classifier ``logits = flatten(x) @ kernel + bias`` (paper.md §3).

  ``kernel`` [m, k] (Flax Dense layout, m = prod(input_shape)), ``bias`` [k], ``x`` [B, *input_shape] in
  ``box``, ``target`` [B] int; ``tol``: projected-gradient tolerance of the dual solve; ``check_feasible``:
  first solve a small LP to detect targets unreachable in the box. Returns an ExactSolution; ValueError on
  a shape mismatch, non-finite input, x outside the box or a target out of range.
  """
  x_dtype = np.asarray(x).dtype
  kernel, bias, x, target = (np.asarray(kernel, np.float64), np.asarray(bias, np.float64),
                             np.asarray(x, np.float64), np.asarray(target))
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be [m, k], got shape {kernel.shape}")
  m, k = kernel.shape
  if bias.shape != (k,):
    raise ValueError(f"bias must be [{k}], got shape {bias.shape}")
  if x.ndim < 2 or int(np.prod(x.shape[1:])) != m:
    raise ValueError(f"x must be [B, ...] with {m} values per example, got shape {x.shape}")
  b = x.shape[0]
  if target.shape != (b,) or not np.issubdtype(target.dtype, np.integer):
    raise ValueError(f"target must be int [{b}], got {target.dtype} {target.shape}")
  if np.any((target < 0) | (target >= k)):
    raise ValueError(f"target out of range [0, {k})")
  lower, upper = float(box[0]), float(box[1])
  if not lower < upper:
    raise ValueError(f"box must satisfy lower < upper, got {box}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
    raise ValueError("x, kernel and bias must be finite")
  # x on a bound in its own precision counts as inside (float32 0.8 is 0.800000012 in float64).
  slack = 4 * np.finfo(x_dtype).eps * max(abs(lower), abs(upper), 1.0) if x_dtype.kind == "f" else 0.0
  if np.any((x < lower - slack) | (x > upper + slack)):
    raise ValueError(f"x has values outside the box [{lower}, {upper}]")
  x = np.clip(x, lower, upper)

  flat = x.reshape(b, m)
  lo_v, hi_v = np.full(m, lower), np.full(m, upper)
  x_adv, feasible = flat.copy(), np.ones(b, bool)
  dist, lower_bound, viol = np.zeros(b), np.zeros(b), np.zeros(b)
  for i in range(b):
    a, beta = _constraints(kernel, bias, int(target[i]))
    if np.all(a @ flat[i] + beta >= 0):  # already classified as the target (up to ties): r* = 0
      continue
    if check_feasible and not _box_feasible(a, beta, lo_v, hi_v):
      feasible[i] = False
      dist[i] = lower_bound[i] = np.inf
      continue
    r, dual, a_s, beta_s = _solve_one(a, beta, flat[i], lo_v, hi_v, tol=tol)
    x_adv[i] = np.clip(flat[i] + r, lower, upper)
    dist[i] = np.sqrt(np.mean(r * r))
    lower_bound[i] = np.sqrt(max(dual, 0.0) / m)
    viol[i] = max(0.0, float(-np.min(a_s @ x_adv[i] + beta_s))) * float(np.max(np.abs(a)))
  return ExactSolution(x_adv.reshape(x.shape), dist, lower_bound, viol, feasible)


def dense_kernel_bias(variables) -> Tuple[np.ndarray, np.ndarray]:
  """The (kernel [m, k], bias [k]) of the single Dense layer of a linear model's variables (e.g. FC10);
  ValueError unless there is exactly one {"kernel", "bias"} pair."""
  found = []

  def walk(node):
    if hasattr(node, "keys"):
      if "kernel" in node and "bias" in node:
        found.append(node)
      else:
        for key in node:
          walk(node[key])

  walk(variables)
  if len(found) != 1:
    raise ValueError(f"expected exactly one Dense layer in a linear model, found {len(found)}")
  return np.asarray(found[0]["kernel"]), np.asarray(found[0]["bias"])
