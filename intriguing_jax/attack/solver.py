"""Box-constrained solvers of the attack: the one place that knows the optimiser.

Usage::

    from intriguing_jax.attack import solver
    z, num_iter = solver.box_lbfgs(fun, x0, 0.0, 1.0, *args, maxiter=100, history_size=10, tol=1e-4)

``box_lbfgs`` solves ONE problem (vmap it); ``solver="projected"`` (default) is our two-metric projected
L-BFGS, ``solver="jaxopt"`` drives ``jaxopt.LBFGSB`` steps. ``boundary_projection`` is the small dual QP
of the attack's refinement step.
"""

from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from intriguing_jax.types import Array

def box_lbfgs(fun: Callable[..., Array], x0: Array, lower: Array, upper: Array, *args,
              maxiter: int, history_size: int, tol: float, ftol: float = 0.0,
              solver: str = "projected", max_backtracks: int = 30,
              return_nfev: bool = False) -> Tuple[Array, ...]:
  """Minimises ``fun(z, *args)`` over the box [lower, upper] with L-BFGS-B, for ONE problem.

  Vmap it for many problems. Swapping the solver means rewriting this function only. The iterations
  are ``jaxopt.LBFGSB.update`` steps driven by our own ``lax.while_loop`` (``unroll=False`` semantics),
  so that, like scipy's L-BFGS-B (``factr``), it also stops when the objective stagnates:
  ``(f_prev - f) <= ftol * max(|f_prev|, |f|, 1)``. jaxopt alone only stops on the projected-gradient
  norm, which float32 objectives often never get below ``tol``, so every solve ran to ``maxiter``.

  Args:
    fun: smooth scalar objective of z (same shape as x0).
    x0: start; clipped into the box first (jaxopt.LBFGSB does not project an infeasible start).
    lower, upper: bounds, broadcastable to x0.
    *args: passed to ``fun``.
    maxiter, history_size: L-BFGS-B iteration cap and memory size.
    tol: tolerance on the inf-norm of the projected-gradient step (jaxopt's ``error``).
    ftol: relative-decrease tolerance (0 disables it).
    solver: "projected" (default) or "jaxopt".
    max_backtracks: cap on the Armijo halvings per iteration ("projected"; under vmap every member pays
      for the member that backtracks most).
    return_nfev: ("projected") also return the number of objective evaluations.

  Returns:
    (z, num_iter) -- or (z, num_iter, num_fev) with ``return_nfev`` -- the minimiser (in the box) and the
    iterations used.
  """
  lower = jnp.broadcast_to(lower, x0.shape).astype(x0.dtype)
  upper = jnp.broadcast_to(upper, x0.shape).astype(x0.dtype)
  bounds = (lower, upper)
  z0 = jnp.clip(x0, lower, upper)
  if solver == "projected":
    z, it, nfev = _projected_lbfgs(fun, z0, lower, upper, args, maxiter=maxiter, history_size=history_size,
                                   tol=tol, ftol=ftol, max_backtracks=max_backtracks)
    return (jnp.clip(z, lower, upper), it, nfev) if return_nfev else (jnp.clip(z, lower, upper), it)
  if solver != "jaxopt":
    raise ValueError(f"solver must be 'jaxopt' or 'projected', got {solver!r}")
  if return_nfev:
    raise ValueError("return_nfev is only available with solver='projected'")
  import jaxopt  # pylint: disable=g-import-not-at-top
  solver = jaxopt.LBFGSB(fun=fun, maxiter=maxiter, history_size=history_size, tol=tol,
                         unroll=False, implicit_diff=False, jit=True)
  state0 = solver.init_state(z0, bounds, *args)

  def cond(carry):
    _, state, f_prev, it = carry
    f = state.value
    stalled = (f_prev - f) <= ftol * jnp.maximum(jnp.maximum(jnp.abs(f_prev), jnp.abs(f)), 1.0)
    return (it < maxiter) & (state.error > tol) & ~(stalled & (it > 0)) & jnp.isfinite(f)

  def body(carry):
    z, state, _, it = carry
    f_prev = state.value
    z, state = solver.update(z, state, bounds, *args)
    return z, state, f_prev, it + 1

  z, _, _, it = jax.lax.while_loop(cond, body, (z0, state0, jnp.asarray(jnp.inf, z0.dtype), 0))
  return jnp.clip(z, lower, upper), jnp.asarray(it, jnp.int32)


def _projected_lbfgs(fun, z0, lower, upper, args, *, maxiter, history_size, tol, ftol, max_backtracks=30):
  """Our box-constrained L-BFGS: two-metric projected quasi-Newton (Bertsekas 1982) + Armijo arc search.

  Variables at a bound whose gradient pushes outward are fixed; the L-BFGS two-loop recursion
  (Nocedal & Wright, Alg. 7.4) gives the step on the others; the step is projected onto the box and
  backtracked until the Armijo condition holds along the projection arc. Fixed-shape, vmap-friendly.
  """
  vg = jax.value_and_grad(fun)
  n = z0.size
  dt = z0.dtype
  f0, g0 = vg(z0, *args)
  hist = (jnp.zeros((history_size, n), dt), jnp.zeros((history_size, n), dt), jnp.zeros((history_size,), dt))

  def direction(g, free, hist):
    s_h, y_h, rho = hist
    q = jnp.where(free, g.reshape(-1), 0.0)

    def loop1(i, carry):
      q, alphas = carry
      j = history_size - 1 - i                       # newest first
      al = rho[j] * (s_h[j] @ q)
      return q - al * y_h[j], alphas.at[j].set(al)

    q, alphas = jax.lax.fori_loop(0, history_size, loop1, (q, jnp.zeros((history_size,), dt)))
    yy = y_h[-1] @ y_h[-1]
    gamma = jnp.where((rho[-1] > 0) & (yy > 0), (s_h[-1] @ y_h[-1]) / jnp.where(yy > 0, yy, 1.0), 1.0)
    r = gamma * q

    def loop2(j, r):
      be = rho[j] * (y_h[j] @ r)
      return r + s_h[j] * (alphas[j] - be)

    r = jax.lax.fori_loop(0, history_size, loop2, r)
    return jnp.where(free, -r, 0.0).reshape(z0.shape)

  def cond(c):
    z, f, g, hist, it, done, nfev = c
    return (it < maxiter) & ~done

  def body(c):
    z, f, g, hist, it, _, nfev = c
    active = ((z <= lower) & (g > 0)) | ((z >= upper) & (g < 0))
    free = ~active
    d = direction(g, free.reshape(-1), hist)
    descent = jnp.sum(d * g) < 0
    d = jnp.where(descent, d, -jnp.where(free, g, 0.0))
    # First iteration (no history): a unit step on -g can be huge; scale to a box-sized step.
    scale = jnp.where(hist[2][-1] > 0, 1.0, 1.0 / jnp.maximum(jnp.max(jnp.abs(d)), 1e-12))
    d = d * jnp.minimum(scale, 1.0)

    # Backtracking on the projection arc; value and gradient together (the first trial is usually
    # accepted, so one forward + backward pass per iteration).
    def ls_cond(lc):
      _, z_new, f_new, _, k = lc
      return (f_new > f + 1e-4 * jnp.sum(g * (z_new - z))) & (k < max_backtracks)

    def ls_body(lc):
      alpha, _, _, _, k = lc
      alpha = alpha * 0.5
      z_new = jnp.clip(z + alpha * d, lower, upper)
      f_new, g_new = vg(z_new, *args)
      return alpha, z_new, f_new, g_new, k + 1

    z1 = jnp.clip(z + d, lower, upper)
    f1, g1 = vg(z1, *args)
    _, z_new, f_new, g_new, nls = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones((), dt), z1, f1, g1, 0))
    ok = f_new <= f
    # A failed line search first drops the L-BFGS memory (the next step is steepest descent, as scipy's
    # L-BFGS-B restarts); only a failure without memory ends the solve.
    had_memory = jnp.any(hist[2] > 0)
    reset = ~ok & had_memory
    z_new = jnp.where(ok, z_new, z)
    f_new = jnp.where(ok, f_new, f)
    g_new = jnp.where(ok, g_new, g)
    s_v = (z_new - z).reshape(-1)
    y_v = (g_new - g).reshape(-1)
    sy = s_v @ y_v
    keep = sy > 1e-10 * jnp.maximum(y_v @ y_v, 1e-30)
    s_h, y_h, rho = hist
    hist_new = (jnp.concatenate([s_h[1:], s_v[None]]), jnp.concatenate([y_h[1:], y_v[None]]),
                jnp.concatenate([rho[1:], jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0)[None]]))
    hist = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), hist_new, hist)
    hist = jax.tree_util.tree_map(lambda a: jnp.where(reset, jnp.zeros_like(a), a), hist)
    pg = jnp.max(jnp.abs(jnp.clip(z_new - g_new, lower, upper) - z_new))
    stalled = (f - f_new) <= ftol * jnp.maximum(jnp.maximum(jnp.abs(f), jnp.abs(f_new)), 1.0)
    done = (pg <= tol) | (stalled & ok) | (~ok & ~had_memory) | ~jnp.isfinite(f_new)
    return z_new, f_new, g_new, hist, it + 1, done, nfev + 1 + nls

  init = (z0, f0, g0, hist, 0, jnp.asarray(False), 1)
  z, _, _, _, it, _, nfev = jax.lax.while_loop(cond, body, init)
  return z, jnp.asarray(it, jnp.int32), jnp.asarray(nfev, jnp.int32)


def boundary_projection(jac_fn: Callable[[Array], Tuple[Array, Array]], x: Array, z: Array,
                        lower: float, upper: float, kappa: float, num_steps: int) -> Array:
  """argmin ||y - x||^2 over the box s.t. the margin constraints, linearised at z, hold with kappa.

  For ONE example. ``jac_fn(z) -> (g, J)`` gives the constraint values g [k] (g_j = own - other_j,
  targeted; +large for rows that do not constrain) and their Jacobian J [k, *shape] at z. The local QP
  is solved through its dual (k variables, mu >= 0) by accelerated projected gradient ascent (FISTA
  with restart), with y(mu) = clip(x + J^T mu / 2, lower, upper). For a linear model the linearisation
  is exact, so this is the exact minimum-norm box-constrained point (up to the iterations).
  """
  g, jac = jac_fn(z)
  a = jac.reshape(jac.shape[0], -1)
  x_f, z_f = x.reshape(-1), z.reshape(-1)
  b = g - a @ z_f - kappa                   # constraint: a @ y + b >= 0
  lip = 0.5 * jnp.max(jnp.linalg.eigvalsh(a @ a.T)) + 1e-12
  step = 1.0 / lip
  y_of = lambda mu: jnp.clip(x_f + 0.5 * (a.T @ mu), lower, upper)
  dual = lambda mu: jnp.sum((y_of(mu) - x_f) ** 2) - mu @ (a @ y_of(mu) + b)

  def body(_, carry):
    mu, v, tk = carry
    mu_new = jnp.maximum(v - step * (a @ y_of(v) + b), 0.0)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * tk * tk))
    restart = dual(mu_new) < dual(mu)        # adaptive restart keeps the ascent monotone
    v_new = jnp.where(restart, mu_new, mu_new + ((tk - 1.0) / t_new) * (mu_new - mu))
    return mu_new, v_new, jnp.where(restart, 1.0, t_new)

  mu0 = jnp.zeros_like(g)
  mu, _, _ = jax.lax.fori_loop(0, num_steps, body, (mu0, mu0, jnp.ones((), g.dtype)))
  return y_of(mu).reshape(x.shape)
