"""Box-constrained L-BFGS over R independent problems ("rows"), and the refinement's boundary projection.

Usage::

    from intriguing_jax.attack import solver
    rs = solver.row_solver(fun, 0.0, 1.0, solver="projected", maxiter=100, history_size=5, tol=1e-4,
                           ftol=1e-5)
    st = rs.init(z0, args)                 # z0 [R, n]; args: tuple of per-row arrays [R, ...]
    st = rs.step(st, args)                 # one step of every row; st.done [R] marks ended solves
    st = rs.restart(st, mask, z_start)     # new solves on the rows of mask [R], started at z_start
    st = rs.restart(st, mask, z_start, shift, scale)   # ... with the first step's scale carried over

``fun(z [n], *args_row) -> (f, aux)`` is ONE row's objective (aux: e.g. logits), minimised over the box
[lower, upper]^n; a driving loop can end one row's solve and start its next while the others go on.

* ``"projected"`` (default): two-metric projected L-BFGS (Bertsekas 1982). Variables at a bound whose
  gradient points outward are fixed; the two-loop recursion (Nocedal & Wright, Alg. 7.4) gives the step on
  the others, which must satisfy Armijo's condition along the projection arc, f(z') <= f(z) + 1e-4 g . (z'
  - z). One step is ONE objective evaluation per row: a rejected trial halves the row's step for the next
  call. The memory is a ring buffer shared by the rows (one slot per call, rho = 0 where a row keeps
  nothing). A failed line search clears the row's memory (as scipy restarts); without memory it ends the
  solve. A step without memory is -gamma g, at most box-sized: gamma carried over by ``restart`` (the
  previous objective's newest pair, corrected for a known Hessian shift, or a given scale), else 1.
* ``"jaxopt"``: ``jaxopt.LBFGSB`` (Byrd, Lu, Nocedal & Zhu 1995), one ``update`` per row and call, vmapped.

Both end a row's solve when ||clip(z - g) - z||_inf <= tol, (f_prev - f) <= ftol * max(|f_prev|, |f|, 1)
(scipy's ``factr``), after ``maxiter`` steps, or when the objective is not finite.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from intriguing_jax.types import Array

SOLVERS = ("projected", "jaxopt")


class RowSolver(NamedTuple):
  """The pure functions of a row solver (see the module docstring). States are ``Rows`` or ``JaxoptRows``."""
  init: Callable[[Array, Tuple[Array, ...]], Any]
  step: Callable[[Any, Tuple[Array, ...]], Any]
  restart: Callable[..., Any]


class Rows(NamedTuple):
  """State of R projected L-BFGS solves, flattened to n variables each."""
  z: Array          # [R, n] current point (in the box)
  f: Array          # [R] objective at z
  g: Array          # [R, n] gradient at z
  aux: Any          # pytree of [R, ...]: the objective's auxiliary output at z (e.g. logits)
  s_hist: Array     # [m, R, n] ring buffer of steps
  y_hist: Array     # [m, R, n] ring buffer of gradient changes
  rho: Array        # [m, R] 1 / s.y of each slot; 0 = empty / skipped
  gamma: Array      # [R] initial Hessian scaling s.y / y.y of the newest kept pair (0: none known)
  pair: Array       # [3, R] s.s, s.y, y.y of the newest kept pair (for a restart with a Hessian shift)
  pos: Array        # [] int32, next ring slot
  alpha: Array      # [R] step multiplier (halved after each rejected trial)
  nback: Array      # [R] int32 consecutive rejected trials
  fresh: Array      # [R] bool: z is a new start whose objective is not evaluated yet
  num_iter: Array   # [R] int32 accepted steps of the current solve
  done: Array       # [R] bool: the current solve has ended (until the next restart)


class JaxoptRows(NamedTuple):
  """State of R ``jaxopt.LBFGSB`` solves: the same leading fields as ``Rows``, then jaxopt's state."""
  z: Array
  f: Array
  aux: Any
  fresh: Array
  num_iter: Array
  done: Array
  state: Any        # jaxopt's LbfgsbState, every leaf with a leading [R] axis


def row_solver(fun: Callable[..., Tuple[Array, Any]], lower: float, upper: float, *, solver: str,
               maxiter: int, history_size: int, tol: float, ftol: float) -> RowSolver:
  """The one solver function: a ``RowSolver`` for ``fun`` over the box [lower, upper] (module docstring)."""
  if solver == "projected":
    vg = jax.vmap(jax.value_and_grad(fun, has_aux=True))
    return RowSolver(   # aux's shapes from the objective alone (tracing its gradient twice costs time)
        init=lambda z0, args: _rows_init(z0, jax.eval_shape(jax.vmap(fun), z0, *args)[1], history_size),
        step=lambda st, args: _rows_step(st, lambda z: vg(z, *args), lower, upper, maxiter=maxiter,
                                         tol=tol, ftol=ftol),
        restart=_rows_restart)
  if solver == "jaxopt":
    return _jaxopt_solver(fun, lower, upper, maxiter=maxiter, history_size=history_size, tol=tol, ftol=ftol)
  raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def _stalled(f_prev: Array, f: Array, ftol: float) -> Array:
  return (f_prev - f) <= ftol * jnp.maximum(jnp.maximum(jnp.abs(f_prev), jnp.abs(f)), 1.0)


def _rows_init(z0: Array, aux_like: Any, history_size: int) -> Rows:
  """All rows fresh at z0 [R, n] (evaluated by the first step). aux_like: pytree of [R, ...] shapes."""
  (r, n), dt = z0.shape, z0.dtype
  return Rows(z=z0, f=jnp.zeros((r,), dt), g=jnp.zeros_like(z0),
              aux=jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), aux_like),
              s_hist=jnp.zeros((history_size, r, n), dt), y_hist=jnp.zeros((history_size, r, n), dt),
              rho=jnp.zeros((history_size, r), dt), gamma=jnp.zeros((r,), dt), pair=jnp.zeros((3, r), dt),
              pos=jnp.zeros((), jnp.int32),
              alpha=jnp.ones((r,), dt), nback=jnp.zeros((r,), jnp.int32), fresh=jnp.ones((r,), bool),
              num_iter=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool))


def _rows_restart(st: Rows, mask: Array, z_start: Array, shift: Optional[Array] = None,
                  scale: Optional[Array] = None) -> Rows:
  """Starts a new solve at z_start [R, n] on the rows where mask [R] is set (memory cleared).

  The first step of a solve without memory is -gamma g, at most box-sized (inf-norm <= upper - lower).
  shift [R]: the new objective is the old one plus a quadratic whose Hessian is shift * I (e.g. a new
  penalty weight c of c ||z - x||^2: shift = 2 (c_new - c_old)); gamma is then the newest pair's
  s.y' / y'.y' with y' = y + shift s. Where that is not known (NaN shift, no pair, s.y' <= 0): scale [R]
  (e.g. 1 / the objective's least curvature 2 c); where neither is known, 1."""
  ss, sy, yy = st.pair
  gamma = jnp.zeros_like(st.gamma) if scale is None else jnp.where(scale > 0, scale, 0.0)
  if shift is not None:
    sy2, yy2 = sy + shift * ss, yy + 2.0 * shift * sy + shift * shift * ss
    known = (st.gamma > 0) & jnp.isfinite(shift) & (sy2 > 1e-10 * jnp.maximum(yy2, 1e-30))
    gamma = jnp.where(known, sy2 / jnp.where(known, yy2, 1.0), gamma)
  return st._replace(z=jnp.where(mask[:, None], z_start, st.z), rho=jnp.where(mask[None, :], 0.0, st.rho),
                     gamma=jnp.where(mask, gamma, st.gamma), alpha=jnp.where(mask, 1.0, st.alpha),
                     nback=jnp.where(mask, 0, st.nback), fresh=st.fresh | mask,
                     num_iter=jnp.where(mask, 0, st.num_iter), done=st.done & ~mask)


def _two_loop(st: Rows, q: Array) -> Array:
  """H q for every row (Nocedal & Wright Alg. 7.4) from the ring buffer, newest slot first. Two rolled
  loops over the m slots (one copy of each loop body in the program)."""
  m = st.rho.shape[0]

  def backward(i, carry):
    q, alphas = carry
    j = (st.pos - 1 - i) % m
    al = st.rho[j] * jnp.sum(st.s_hist[j] * q, axis=1)
    return q - al[:, None] * st.y_hist[j], alphas.at[j].set(al)

  q, alphas = jax.lax.fori_loop(0, m, backward, (q, jnp.zeros_like(st.rho)))
  r = jnp.where(st.gamma > 0, st.gamma, 1.0)[:, None] * q

  def forward(i, r):
    j = (st.pos - m + i) % m
    be = st.rho[j] * jnp.sum(st.y_hist[j] * r, axis=1)
    return r + st.s_hist[j] * (alphas[j] - be)[:, None]

  return jax.lax.fori_loop(0, m, forward, r)


def _trial(st: Rows, lower, upper) -> Tuple[Array, Array]:
  """The trial point of every row: the two-metric L-BFGS direction, projected. Returns (z1, no_mem)."""
  z, g = st.z, st.g
  free = ~(((z <= lower) & (g > 0)) | ((z >= upper) & (g < 0)))
  gf = jnp.where(free, g, 0.0)
  d = -jnp.where(free, _two_loop(st, gf), 0.0)
  descent = jnp.sum(d * g, axis=1) < 0
  d = jnp.where(descent[:, None], d, -gf)
  no_mem = jnp.all(st.rho == 0, axis=0)
  # Without memory or a known scale (first step, or after a reset) a unit step on -g can be huge: a
  # box-sized step instead.
  scale = jnp.where(no_mem, (upper - lower) / jnp.maximum(jnp.max(jnp.abs(d), axis=1), 1e-12), 1.0)
  idle = st.fresh | st.done
  d = jnp.where(idle[:, None], 0.0, d * (jnp.minimum(scale, 1.0) * st.alpha)[:, None])
  return jnp.clip(z + d, lower, upper), no_mem


def _rows_step(st: Rows, value_and_grad: Callable[[Array], Tuple[Tuple[Array, Any], Array]], lower, upper,
               *, maxiter: int, tol: float, ftol: float, max_backtracks: int = 30) -> Rows:
  """One objective evaluation for every row: a trial step, accepted or not. ``done`` rows stay put."""
  z, f, g = st.z, st.f, st.g
  z1, no_mem = _trial(st, lower, upper)
  (f1, aux1), g1 = value_and_grad(z1)
  idle = st.fresh | st.done
  finite = jnp.isfinite(f1)
  moved = (f1 <= f + 1e-4 * jnp.sum(g * (z1 - z), axis=1)) & ~idle & finite
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
  put = lambda buf, v: jax.lax.dynamic_update_index_in_dim(buf, v, st.pos, 0)
  rho = put(st.rho, jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0))
  gamma = jnp.where(keep, sy / jnp.where(keep, yy, 1.0), st.gamma)
  pair = jnp.where(keep[None, :], jnp.stack([jnp.sum(s_v * s_v, axis=1), sy, yy]), st.pair)
  # Backtracking across calls; a failure with memory clears the memory, one without ends the solve.
  rejected = ~idle & ~moved
  nback = jnp.where(rejected, st.nback + 1, 0)
  alpha = jnp.where(rejected, st.alpha * 0.5, 1.0)
  failed = rejected & ((nback > max_backtracks) | ~finite)
  reset = failed & ~no_mem
  num_iter = st.num_iter + moved.astype(jnp.int32)
  pg = jnp.max(jnp.abs(jnp.clip(z_new - g_new, lower, upper) - z_new), axis=1)
  done = (st.done | ((moved | st.fresh) & (pg <= tol)) | (moved & _stalled(f, f_new, ftol))
          | (failed & no_mem) | (num_iter >= maxiter) | ~jnp.isfinite(f_new))
  return Rows(z=z_new, f=f_new, g=g_new, aux=aux_new, s_hist=put(st.s_hist, s_v), y_hist=put(st.y_hist, y_v),
              rho=jnp.where(reset[None, :], 0.0, rho), gamma=jnp.where(reset, 0.0, gamma), pair=pair,
              pos=(st.pos + 1) % m,
              alpha=jnp.where(reset, 1.0, alpha), nback=jnp.where(reset, 0, nback),
              fresh=jnp.zeros_like(st.fresh), num_iter=num_iter, done=done)


def _jaxopt_solver(fun, lower, upper, *, maxiter, history_size, tol, ftol) -> RowSolver:
  """``jaxopt.LBFGSB`` as a RowSolver: a fresh row gets ``init_state`` at its start, the others ``update``.

  The rows run one after another (``lax.map``), not vmapped: under ``vmap`` with two or more rows jaxopt
  0.8.5's ``update`` returns other directions than for each row alone, ascent directions among them, even for
  identical rows and in float64 (notes/attack.md, session 15)."""
  import jaxopt  # pylint: disable=g-import-not-at-top
  # Line-search steps of at most 1 along d = (subspace minimiser - z) keep the iterate in the box (jaxopt's
  # default starts at 1.5 and can leave it; its value and gradient were then not the clipped point's).
  lbfgsb = jaxopt.LBFGSB(fun=fun, has_aux=True, maxiter=maxiter, history_size=history_size, tol=tol,
                         unroll=False, implicit_diff=False, jit=True, linesearch_init="max",
                         max_stepsize=1.0)

  bounds = lambda z: (jnp.full_like(z, lower), jnp.full_like(z, upper))
  init_one = lambda z, *a: lbfgsb.init_state(z, bounds(z), *a)

  def row_step(row):
    """One row: a fresh one starts (``init_state`` at z), an active one takes jaxopt's ``update``, a done
    one stays: only its own branch runs (``lax.map`` runs the rows one after another)."""
    z, state, branch, *a = row
    return jax.lax.switch(branch, (lambda: (z, init_one(z, *a)),
                                   lambda: tuple(lbfgsb.update(z, state, bounds(z), *a)),
                                   lambda: (z, state)))

  def init(z0, args):
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   jax.eval_shape(jax.vmap(init_one), z0, *args))
    r = z0.shape[0]
    return JaxoptRows(z=z0, f=zeros.value, aux=zeros.aux, fresh=jnp.ones((r,), bool),
                      num_iter=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool), state=zeros)

  def step(st, args):
    active = ~st.fresh & ~st.done
    z_upd, new = jax.lax.map(row_step, (st.z, st.state, jnp.where(st.fresh, 0, jnp.where(active, 1, 2)),
                                        *args))
    # A failed line search keeps its point only where it is lower. As scipy, a row with memory then starts
    # again without it (fresh at the next call); a row without memory goes on if it moved, else it ends.
    failed = active & new.failed_linesearch
    lower_f = new.value < st.f
    moved = active & (~failed | lower_f)
    retry = failed & (st.state.num_updates > 0)
    keep = st.fresh | moved
    state = jax.tree_util.tree_map(
        lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, st.state)
    z = jnp.where(moved[:, None], jnp.clip(z_upd, lower, upper), st.z)
    num_iter = st.num_iter + moved.astype(jnp.int32)
    f = state.value
    done = (st.done | ((moved | st.fresh) & (state.error <= tol))
            | (moved & ~failed & _stalled(st.f, f, ftol)) | (failed & ~retry & ~lower_f)
            | (num_iter >= maxiter) | ~jnp.isfinite(f))
    return JaxoptRows(z=z, f=f, aux=state.aux, fresh=retry & ~done, num_iter=num_iter, done=done, state=state)

  def restart(st, mask, z_start, shift=None, scale=None):  # pylint: disable=unused-argument
    return st._replace(z=jnp.where(mask[:, None], z_start, st.z), fresh=st.fresh | mask,
                       num_iter=jnp.where(mask, 0, st.num_iter), done=st.done & ~mask)

  return RowSolver(init=init, step=step, restart=restart)


def top_eigenvalue_bound(gram: Array, squarings: int = 6) -> Array:
  """An upper bound of the largest eigenvalue of a symmetric PSD matrix [k, k]: tr(G^(2^p))^(2^-p), at most
  k^(2^-p) times too large (1.037 for k = 10, p = 6). By repeated squaring, each square normalised by its
  trace t_i in (0, 1]: the bound is tr(G) * prod_i t_i^(2^-i). No LAPACK call (whose first use imports
  scipy, 0.2 s of a first call)."""
  t0 = jnp.trace(gram)

  def square(_, carry):   # one rolled loop: one copy of its body in the program
    b, bound, w = carry
    b = b @ b
    t = jnp.trace(b)
    t = jnp.where(t > 0, t, 1.0)
    return b / t, bound * t ** w, 0.5 * w

  one = jnp.ones((), gram.dtype)
  _, bound, _ = jax.lax.fori_loop(0, squarings, square, (gram / jnp.where(t0 > 0, t0, 1.0), t0, 0.5 * one))
  return bound


def boundary_projection(jac_fn: Callable[[Array], Tuple[Array, Array]], x: Array, z: Array,
                        lower: float, upper: float, kappa: float, num_steps: int) -> Array:
  """argmin ||y - x||^2 over the box s.t. the margin constraints, linearised at z, hold with kappa.

  For ONE example. ``jac_fn(z) -> (g, J)`` gives the constraint values g [k] (g_j = own - other_j,
  targeted; +large for rows that do not constrain) and their Jacobian J [k, *shape] at z. The local QP is
  solved through its dual (k variables, mu >= 0) by FISTA with gradient-based restart (O'Donoghue & Candes
  2015), y(mu) = clip(x + J^T mu / 2, lower, upper); exact for a linear model (up to the iterations).
  """
  g, jac = jac_fn(z)
  a = jac.reshape(jac.shape[0], -1)
  x_f, z_f = x.reshape(-1), z.reshape(-1)
  b = g - a @ z_f - kappa                   # constraint: a @ y + b >= 0
  step = 1.0 / (0.5 * top_eigenvalue_bound(a @ a.T) + 1e-12)
  y_of = lambda mu: jnp.clip(x_f + 0.5 * (a.T @ mu), lower, upper)

  def body(_, carry):
    mu, v, tk = carry
    mu_new = jnp.maximum(v - step * (a @ y_of(v) + b), 0.0)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * tk * tk))
    restart = jnp.sum((v - mu_new) * (mu_new - mu)) > 0   # momentum against the latest step: drop it
    v_new = jnp.where(restart, mu_new, mu_new + ((tk - 1.0) / t_new) * (mu_new - mu))
    return mu_new, v_new, jnp.where(restart, 1.0, t_new)

  mu0 = jnp.zeros_like(g)
  mu, _, _ = jax.lax.fori_loop(0, num_steps, body, (mu0, mu0, jnp.ones((), g.dtype)))
  return y_of(mu).reshape(x.shape)
