"""Box-constrained solvers of the attack: the one place that knows the optimiser.

Usage::

    from intriguing_jax.attack import solver
    z, num_iter = solver.box_lbfgs(fun, x0, 0.0, 1.0, *args, maxiter=100, history_size=10, tol=1e-4)

``box_lbfgs`` solves ONE problem (vmap it); ``solver="projected"`` (default) is our two-metric projected
L-BFGS, ``solver="jaxopt"`` drives ``jaxopt.LBFGSB`` steps. ``boundary_projection`` is the small dual QP
of the attack's refinement step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

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

  def body(_, carry):
    mu, v, tk = carry
    mu_new = jnp.maximum(v - step * (a @ y_of(v) + b), 0.0)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * tk * tk))
    # Gradient-based adaptive restart (O'Donoghue & Candes 2015): drop the momentum when it points
    # against the latest projected-gradient step. Needs no extra dual evaluation (two matvecs per step).
    restart = jnp.sum((v - mu_new) * (mu_new - mu)) > 0
    v_new = jnp.where(restart, mu_new, mu_new + ((tk - 1.0) / t_new) * (mu_new - mu))
    return mu_new, v_new, jnp.where(restart, 1.0, t_new)

  mu0 = jnp.zeros_like(g)
  mu, _, _ = jax.lax.fori_loop(0, num_steps, body, (mu0, mu0, jnp.ones((), g.dtype)))
  return y_of(mu).reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# Batched, restartable projected L-BFGS: the solver of the "continuous" c search.
#
# ``box_lbfgs`` under vmap runs every problem of the batch until the slowest member converges, and each
# member's line search makes every other member wait. The stepper below instead advances R problems
# ("rows") by ONE objective evaluation per call, so a driving loop can end a row's solve and start its
# next one (another c, another start) while the other rows go on: no row ever waits for another.
# Backtracking is spread over calls too: a row whose trial point fails the Armijo test stays where it is
# and tries half the step at the next call. The L-BFGS memory is a ring buffer shared by the rows (one
# slot written per call, so the update is an in-place [R, n] write, not a select over the whole history);
# a row that writes nothing useful in a call writes rho = 0, which the two-loop recursion skips.


class LbfgsRows(NamedTuple):
  """State of R independent box-constrained L-BFGS solves (rows), flattened to n variables each."""
  z: Array          # [R, n] current point (in the box)
  f: Array          # [R] objective at z
  g: Array          # [R, n] gradient at z
  aux: Any          # pytree of [R, ...]: the objective's auxiliary output at z (e.g. logits)
  s_hist: Array     # [m, R, n] ring buffer of steps
  y_hist: Array     # [m, R, n] ring buffer of gradient changes
  rho: Array        # [m, R] 1 / s.y of each slot; 0 = empty / skipped
  gamma: Array      # [R] initial Hessian scaling s.y / y.y of the newest kept pair
  pos: Array        # [] int32, next ring slot
  alpha: Array      # [R] step multiplier (halved after each rejected trial)
  nback: Array      # [R] int32 consecutive rejected trials
  fresh: Array      # [R] bool: z is a new start whose objective is not evaluated yet
  num_iter: Array   # [R] int32 accepted steps of the current solve
  done: Array       # [R] bool: the current solve has ended (until the next restart)


def rows_init(z0: Array, aux_like: Any, history_size: int) -> LbfgsRows:
  """All rows fresh at z0 [R, n] (evaluated by the first ``rows_step``). aux_like: pytree of [R, ...]."""
  r, n = z0.shape
  dt = z0.dtype
  zeros_r = jnp.zeros((r,), dt)
  return LbfgsRows(z=z0, f=zeros_r, g=jnp.zeros_like(z0), aux=jax.tree_util.tree_map(jnp.zeros_like, aux_like),
                   s_hist=jnp.zeros((history_size, r, n), dt), y_hist=jnp.zeros((history_size, r, n), dt),
                   rho=jnp.zeros((history_size, r), dt), gamma=jnp.ones((r,), dt),
                   pos=jnp.zeros((), jnp.int32), alpha=jnp.ones((r,), dt),
                   nback=jnp.zeros((r,), jnp.int32), fresh=jnp.ones((r,), bool),
                   num_iter=jnp.zeros((r,), jnp.int32),
                   done=jnp.zeros((r,), bool))


def rows_restart(st: LbfgsRows, mask: Array, z_start: Array) -> LbfgsRows:
  """Starts a new solve at z_start [R, n] on the rows where mask [R] is set (memory cleared)."""
  m2 = mask[:, None]
  return st._replace(z=jnp.where(m2, z_start, st.z), rho=jnp.where(mask[None, :], 0.0, st.rho),
                     gamma=jnp.where(mask, 1.0, st.gamma), alpha=jnp.where(mask, 1.0, st.alpha),
                     nback=jnp.where(mask, 0, st.nback), fresh=st.fresh | mask,
                     num_iter=jnp.where(mask, 0, st.num_iter),
                     done=st.done & ~mask)


def _two_loop(st: LbfgsRows, q: Array) -> Array:
  """H q for every row (Nocedal & Wright Alg. 7.4) from the ring buffer, newest slot first."""
  m = st.rho.shape[0]
  alphas = []
  for i in range(m):                                 # static unroll; slot index is dynamic
    j = (st.pos - 1 - i) % m
    s, y, rho = st.s_hist[j], st.y_hist[j], st.rho[j]
    al = rho * jnp.sum(s * q, axis=1)
    q = q - al[:, None] * y
    alphas.append((j, al))
  r = st.gamma[:, None] * q
  for j, al in reversed(alphas):
    s, y, rho = st.s_hist[j], st.y_hist[j], st.rho[j]
    be = rho * jnp.sum(y * r, axis=1)
    r = r + s * (al - be)[:, None]
  return r


def rows_step(st: LbfgsRows, value_and_grad: Callable[[Array], Tuple[Tuple[Array, Any], Array]],
              lower: Array, upper: Array, *, maxiter: int, tol: float, ftol: float,
              max_backtracks: int = 30) -> LbfgsRows:
  """One objective evaluation for every row: a trial step, accepted or not (Armijo on the projection arc).

  ``value_and_grad(z [R, n]) -> ((f [R], aux), g [R, n])`` evaluates all rows at once. Rows that are
  ``done`` stay put. A row ends its solve (``done``) when the projected-gradient step is <= tol, the
  relative decrease is <= ftol, ``maxiter`` steps were accepted, the objective is not finite, or a line
  search failed with an empty memory (a failure with memory clears the memory first, as scipy restarts).
  The same two-metric projection as ``_projected_lbfgs``: variables at a bound whose gradient points
  outward are fixed for the step.
  """
  z, f, g = st.z, st.f, st.g
  free = ~(((z <= lower) & (g > 0)) | ((z >= upper) & (g < 0)))
  gf = jnp.where(free, g, 0.0)
  d = -jnp.where(free, _two_loop(st, gf), 0.0)
  descent = jnp.sum(d * g, axis=1) < 0
  d = jnp.where(descent[:, None], d, -gf)
  no_mem = jnp.all(st.rho == 0, axis=0)
  # Without memory (first step, or after a reset) a unit step on -g can be huge: a box-sized step instead.
  scale = jnp.where(no_mem, 1.0 / jnp.maximum(jnp.max(jnp.abs(d), axis=1), 1e-12), 1.0)
  idle = st.fresh | st.done
  d = jnp.where(idle[:, None], 0.0, d * (jnp.minimum(scale, 1.0) * st.alpha)[:, None])
  z1 = jnp.clip(z + d, lower, upper)
  (f1, aux1), g1 = value_and_grad(z1)
  armijo = f1 <= f + 1e-4 * jnp.sum(g * (z1 - z), axis=1)
  finite = jnp.isfinite(f1)
  moved = armijo & ~idle & finite
  take = moved | st.fresh                            # a fresh row takes its start's evaluation
  t2 = take[:, None]
  z_new, f_new, g_new = jnp.where(t2, z1, z), jnp.where(take, f1, f), jnp.where(t2, g1, g)
  aux_new = jax.tree_util.tree_map(
      lambda a, b: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), aux1, st.aux)
  # Memory: one ring slot per call for every row (rho = 0 where nothing is kept).
  s_v, y_v = z1 - z, g1 - g
  sy, yy = jnp.sum(s_v * y_v, axis=1), jnp.sum(y_v * y_v, axis=1)
  keep = moved & (sy > 1e-10 * jnp.maximum(yy, 1e-30))
  m = st.rho.shape[0]
  s_hist = jax.lax.dynamic_update_index_in_dim(st.s_hist, s_v, st.pos, 0)
  y_hist = jax.lax.dynamic_update_index_in_dim(st.y_hist, y_v, st.pos, 0)
  rho_slot = jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0)
  rho = jax.lax.dynamic_update_index_in_dim(st.rho, rho_slot, st.pos, 0)
  gamma = jnp.where(keep, sy / jnp.where(keep, yy, 1.0), st.gamma)
  # Backtracking across calls.
  rejected = ~idle & ~moved
  nback = jnp.where(rejected, st.nback + 1, 0)
  alpha = jnp.where(rejected, st.alpha * 0.5, 1.0)
  failed = rejected & ((nback > max_backtracks) | ~finite)
  had_mem = ~no_mem
  reset = failed & had_mem
  rho = jnp.where(reset[None, :], 0.0, rho)
  alpha = jnp.where(reset, 1.0, alpha)
  nback = jnp.where(reset, 0, nback)
  num_iter = st.num_iter + moved.astype(jnp.int32)
  pg = jnp.max(jnp.abs(jnp.clip(z_new - g_new, lower, upper) - z_new), axis=1)
  stalled = moved & ((f - f_new) <= ftol * jnp.maximum(jnp.maximum(jnp.abs(f), jnp.abs(f_new)), 1.0))
  done = (st.done | ((moved | st.fresh) & (pg <= tol)) | stalled | (failed & ~had_mem)
          | (num_iter >= maxiter) | ~jnp.isfinite(f_new))
  return LbfgsRows(z=z_new, f=f_new, g=g_new, aux=aux_new, s_hist=s_hist, y_hist=y_hist, rho=rho,
                   gamma=gamma, pos=(st.pos + 1) % m, alpha=alpha, nback=nback,
                   fresh=jnp.zeros_like(st.fresh), num_iter=num_iter,
                   done=done)
