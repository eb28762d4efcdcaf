"""The attack program: options, objective, c search, refinement, input checks, ``lbfgs_attack``
(the method: the package docstring, ``intriguing_jax.attack``)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from intriguing_jax import distributed
from intriguing_jax import precision as precision_lib
from intriguing_jax.attack import solver as solver_lib
from intriguing_jax.types import Array, is_integer, static_fn

PENALTIES = ("l2_squared", "l2")
LOSSES = ("cross_entropy", "margin")
SOLVERS = solver_lib.SOLVERS
DEFAULT_C_GRID = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
DEFAULT_CPU_SLOTS = 32
_CPU_EXAMPLES_PER_SLOT = 12   # auto rows on one CPU device: a worker's share / 12 (notes/attack.md)
_PROJECTION_BLOCK = 8  # on CPU: examples per block of the refinement's projections (Jacobians in cache)


class AttackResult(NamedTuple):
  """Result of the attack (a pytree), every field sized B. ``success`` is checked on ``x_adv``: the
  prediction is the target (untargeted: not the label) with at least ``success_margin`` logits to spare."""
  x_adv: Array       # [B, *input_shape] in the box; failed example: the attempt with the smallest c
  success: Array     # [B] bool
  c: Array           # [B] penalty weight of the returned solution (nan when no c succeeded)
  distortion: Array  # [B] RMS distortion sqrt(mean((x_adv - x)^2)) (paper.md §4.2)
  pred: Array        # [B] int32 argmax of the logits on x_adv
  t: Array           # [B] x_adv = x + t (x_c - x), x_c the refined point (> 1: pushed out, step 3c)
  num_iter: Array    # [B] int32 L-BFGS steps accepted on the example (all c values)
  num_evals: Array   # [B] int32 value-and-gradient evaluations of the c search spent on the example


@dataclasses.dataclass(frozen=True)
class AttackOptions:
  """Every option of the attack and its default; hashable (part of the compilation key), validated when
  built (``ValueError`` naming the field). Variants: ``dataclasses.replace(options, maxiter=10)``.

  Attributes:
    untargeted: success = prediction differs from the given label (loss -log(1 - p_label)).
    penalty: "l2_squared" (c ||r||^2, paper.md A2) or "l2" (c ||r||, smoothed at r = 0).
    loss: "cross_entropy" (A3) or "margin": max(max_{j!=l} z_j - z_l, -(margin_kappa + 2 success_margin)).
    box, maxiter, history_size, tol, ftol: (lower, upper) pixel bounds; L-BFGS step cap per solve (one
      solve per c value) and memory; a solve stops when the projected-gradient step's inf-norm is <= tol
      or the relative decrease (f_prev - f) / max(|f_prev|, |f|, 1) is <= ftol.
    c_grid, num_bisection, warm_start: penalty weights scanned from the largest down to the first
      success; log-space bisection solves on c after the scan; start each solve after the first at the
      best success so far (else the latest attempt) instead of x.
    refine, refine_steps, refine_rounds, projection_steps: refine the c search's point toward the decision
      boundary (package docstring, step 3; False: the paper's method alone); bisection steps of its
      segment searches; linearised-boundary projections (3a; 0: none); FISTA steps of each projection.
    solver: "projected" (two-metric projected L-BFGS) or "jaxopt" (``jaxopt.LBFGSB``); ``attack.solver``.
    success_margin, margin_kappa: logits by which the target must win; confidence of the "margin" loss.
    num_slots: examples in flight (batched solver rows) per program; 0 = all examples on accelerators or
      several devices; on one CPU device a worker's share / 12, clipped to [8, ``DEFAULT_CPU_SLOTS``]
      (fed from a queue).
    num_workers: ``lbfgs_attack`` on one CPU device runs this many programs at once, each on a
      contiguous share of the batch (one compiled program, in threads); 0 = the cores available to the
      process. XLA runs one program's small operations on one core better than on several.
    precision: ``jax.default_matmul_precision`` of the trace ("highest": float32 matmuls on every
      backend; None: the ambient setting, e.g. TF32 on GPUs).
  """
  untargeted: bool = False
  penalty: str = "l2_squared"
  loss: str = "cross_entropy"
  box: Tuple[float, float] = (0.0, 1.0)
  maxiter: int = 30
  history_size: int = 5
  tol: float = 1e-4
  c_grid: Tuple[float, ...] = DEFAULT_C_GRID
  num_bisection: int = 3
  warm_start: bool = True
  refine: bool = True
  refine_steps: int = 20
  refine_rounds: int = 4
  projection_steps: int = 50
  ftol: float = 1e-5
  solver: str = "projected"
  success_margin: float = 1e-3
  margin_kappa: float = 0.0
  num_slots: int = 0
  num_workers: int = 0
  precision: Optional[str] = "highest"

  def __post_init__(self):
    # Sequences given as lists stay hashable (the options are a compilation key).
    if isinstance(self.c_grid, str):
      raise ValueError(f"c_grid must be a list of numbers, got the string {self.c_grid!r}")
    object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
    object.__setattr__(self, "box", tuple(float(v) for v in self.box))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field."""
    for name, allowed in (("penalty", PENALTIES), ("loss", LOSSES), ("solver", SOLVERS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    for name in ("untargeted", "warm_start", "refine"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    lo, hi = self.box if len(self.box) == 2 else (math.nan, math.nan)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
      raise ValueError(f"box must be (lower, upper), finite with lower < upper, got {self.box}")
    for name, least in (("maxiter", 1), ("history_size", 1), ("num_bisection", 0), ("num_slots", 0),
                        ("num_workers", 0), ("refine_steps", 0), ("refine_rounds", 0),
                        ("projection_steps", 0)):
      value = getattr(self, name)
      if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
      if value < least:
        raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
    for name in ("ftol", "success_margin", "margin_kappa"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
    if not (math.isfinite(self.tol) and self.tol > 0):
      raise ValueError(f"tol must be finite and > 0, got {self.tol}")
    if not self.c_grid or any(not (math.isfinite(c) and c > 0) for c in self.c_grid):
      raise ValueError(f"c_grid must be a non-empty list of finite values > 0, got {self.c_grid}")
    precision_lib.validate(self.precision)


# Objective pieces, for one example (logits [k]).
def _other_max(logits: Array, label: Array) -> Array:
  mask = jax.nn.one_hot(label, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def _margin(logits: Array, label: Array, untargeted: bool) -> Array:
  """How far the attack's goal is met, in logits: > 0 means reached."""
  own = jnp.take_along_axis(logits, label[..., None], axis=-1)[..., 0]
  gap = own - _other_max(logits, label)
  return -gap if untargeted else gap


def _loss(logits: Array, label: Array, opts: AttackOptions) -> Array:
  """loss_f(x', l) of paper.md A3 (targeted) or its untargeted analogue, for one example."""
  if opts.loss == "margin":
    # Drives the margin up to margin_kappa + 2 success_margin, so that its minimisers count as successes.
    kappa = opts.margin_kappa + 2.0 * opts.success_margin
    return jnp.maximum(-_margin(logits, label, opts.untargeted), -kappa)
  logp = jax.nn.log_softmax(logits)
  own = jnp.take_along_axis(logp, label[..., None], axis=-1)[..., 0]
  if not opts.untargeted:
    return -own  # cross-entropy toward the target
  # Untargeted: cross-entropy toward "any class but the label", -log(1 - p_label).
  mask = jax.nn.one_hot(label, logits.shape[-1], dtype=bool)
  return -jax.nn.logsumexp(jnp.where(mask, -jnp.inf, logp), axis=-1)


def _penalty(r: Array, opts: AttackOptions) -> Array:
  sq = jnp.sum(r * r)
  if opts.penalty == "l2":
    return jnp.sqrt(sq + 1e-12)  # smoothed at r = 0, where ||r|| has no gradient
  return sq


def _num_slots(opts: AttackOptions, batch: int) -> int:
  """Rows of the c search (``AttackOptions.num_slots``; why on CPU: notes/attack.md)."""
  if opts.num_slots:
    return min(opts.num_slots, batch)
  if _one_cpu():
    return min(max(8, batch // _CPU_EXAMPLES_PER_SLOT), DEFAULT_CPU_SLOTS, batch)
  return batch


def _one_cpu() -> bool:
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _num_workers(opts: AttackOptions, batch: int) -> int:
  """Concurrent programs of ``lbfgs_attack`` (``AttackOptions.num_workers``): 1 unless on one CPU device."""
  if not _one_cpu():
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(opts.num_workers or cores, batch))


def _refine_margin(opts: AttackOptions) -> float:
  """Margin (logits) the refinement keeps: max(2 success_margin, success_margin + 1e-4), clear of the
  success threshold, so that flags do not flip under another batch shape's or device's round-off."""
  return max(2.0 * opts.success_margin, opts.success_margin + 1e-4)


def _rms(z: Array, x0: Array) -> Array:
  d = (z - x0).reshape(z.shape[0], -1)
  return jnp.sqrt(jnp.mean(d * d, axis=1))


# The c search: every example scans the grid from the largest c down to its first success, then bisects.
class Best(NamedTuple):
  """An example's search result so far ([N] leading axis: rows or examples)."""
  z: Array       # [N, n] best success (until one: the latest, most aggressive attempt)
  d: Array       # [N] its RMS distortion (inf until a success)
  c: Array       # [N] its penalty weight (nan until a success)
  ok: Array      # [N] bool: some solve succeeded
  iters: Array   # [N] int32 L-BFGS steps accepted so far
  evals: Array   # [N] int32 objective evaluations (value and gradient) so far


class SearchRows(NamedTuple):
  """The c search of the example each row works on ([R] leading axis)."""
  e: Array          # int32 example index (>= B: none)
  x: Array          # [R, n] the example
  label: Array      # its target (untargeted: its label)
  c: Array          # penalty weight of the current solve
  grid_pos: Array   # int32 index of c in the descending grid while scanning
  grid_done: Array  # bool: scan over; bisecting in [lo, hi]
  num_bis: Array    # int32 bisection solves ended
  lo: Array         # largest succeeding c
  hi: Array         # smallest failing c
  best: Best


class SearchState(NamedTuple):
  """State of the whole c search (``_search_init`` / ``_search_step``)."""
  solver: Any       # solver.Rows or solver.JaxoptRows of the R rows
  rows: SearchRows
  out: Best         # [B] results of the finished examples
  active: Array     # [R] bool: the row has an example
  next_e: Array     # [] int32 next example of the queue
  trips: Array      # [] int32 loop trips so far


class _Problem(NamedTuple):
  """What the c search closes over: the solver, the data [B, n] and the descending grid."""
  rs: solver_lib.RowSolver
  opts: AttackOptions
  xf: Array
  label: Array
  grid: Array
  ratio: Array
  num_slots: int


def _fresh_rows(p: _Problem, rows: SearchRows, mask: Array, e_new: Array) -> SearchRows:
  """Rows in mask [R] start the search of examples e_new [R] at the top of the grid."""
  m2 = mask[:, None]
  e_safe = jnp.minimum(e_new, p.xf.shape[0] - 1)
  x_new = p.xf[e_safe]
  best = Best(z=jnp.where(m2, x_new, rows.best.z), d=jnp.where(mask, jnp.inf, rows.best.d),
              c=jnp.where(mask, jnp.nan, rows.best.c), ok=rows.best.ok & ~mask,
              iters=jnp.where(mask, 0, rows.best.iters), evals=jnp.where(mask, 0, rows.best.evals))
  return rows._replace(e=jnp.where(mask, e_new, rows.e), x=jnp.where(m2, x_new, rows.x),
                       label=jnp.where(mask, p.label[e_safe], rows.label),
                       c=jnp.where(mask, p.grid[0], rows.c),
                       grid_pos=jnp.where(mask, 0, rows.grid_pos), grid_done=rows.grid_done & ~mask,
                       num_bis=jnp.where(mask, 0, rows.num_bis), best=best)


def _first_scale(opts: AttackOptions, c: Array) -> Optional[Array]:
  """The first step's scale of a solve without memory: 1 / the penalty's curvature 2c (l2_squared)."""
  return 0.5 / c if opts.penalty == "l2_squared" else None


def _search_init(p: _Problem) -> SearchState:
  b, ns, dt = p.xf.shape[0], p.num_slots, p.xf.dtype
  e0 = jnp.arange(ns, dtype=jnp.int32)
  zr, zi, zb = jnp.zeros((ns,), dt), jnp.zeros((ns,), jnp.int32), jnp.zeros((ns,), bool)
  rows = SearchRows(e=e0, x=p.xf[:ns], label=p.label[:ns], c=zr, grid_pos=zi, grid_done=zb, num_bis=zi,
                    lo=zr, hi=zr, best=Best(z=p.xf[:ns], d=zr, c=zr, ok=zb, iters=zi, evals=zi))
  rows = _fresh_rows(p, rows, jnp.ones((ns,), bool), e0)
  out = Best(z=p.xf, d=jnp.full((b,), jnp.inf, dt), c=jnp.full((b,), jnp.nan, dt), ok=jnp.zeros((b,), bool),
             iters=jnp.zeros((b,), jnp.int32), evals=jnp.zeros((b,), jnp.int32))
  st = p.rs.init(p.xf[:ns], (rows.x, rows.label, rows.c))
  st = p.rs.restart(st, jnp.ones((ns,), bool), p.xf[:ns], None, _first_scale(p.opts, rows.c))
  return SearchState(solver=st, rows=rows, out=out, active=jnp.ones((ns,), bool),
                     next_e=jnp.asarray(ns, jnp.int32), trips=jnp.zeros((), jnp.int32))


def _record(p: _Problem, rows: SearchRows, st, active: Array, end: Array, ok: Array) -> SearchRows:
  """Books the step's evaluation of the active rows [R] and the solves that ended (end [R]; ok: they
  succeeded), and brackets c.

  Scan: the first success at grid value c brackets [c, the previous (failing) grid value]; a failure at
  the last grid value brackets [last / ratio, last] (the walk below the grid). Bisection: a success
  raises lo, a failure lowers hi."""
  c, gi, grid, ratio = rows.c, rows.grid_pos, p.grid, p.ratio
  d = jnp.sqrt(jnp.mean((st.z - rows.x) ** 2, axis=1))
  better = end & ok & (d < rows.best.d)
  best = Best(z=jnp.where((better | (end & ~rows.best.ok & ~ok))[:, None], st.z, rows.best.z),
              d=jnp.where(better, d, rows.best.d), c=jnp.where(better, c, rows.best.c),
              ok=rows.best.ok | (end & ok), iters=rows.best.iters + jnp.where(end, st.num_iter, 0),
              evals=rows.best.evals + active.astype(jnp.int32))
  in_grid, in_bis = end & ~rows.grid_done, end & rows.grid_done
  grid_hit = in_grid & ok
  grid_miss_all = in_grid & ~ok & (gi >= grid.shape[0] - 1)
  c_prev = jnp.where(gi > 0, grid[jnp.maximum(gi - 1, 0)], c * ratio)
  lo = jnp.where(grid_hit, c, rows.lo)
  hi = jnp.where(grid_hit, c_prev, rows.hi)
  lo = jnp.where(grid_miss_all, grid[-1] / ratio, lo)
  hi = jnp.where(grid_miss_all, grid[-1], hi)
  grid_done = rows.grid_done | grid_hit | grid_miss_all
  lo = jnp.where(in_bis & ok, c, lo)
  hi = jnp.where(in_bis & ~ok, c, hi)
  return rows._replace(grid_pos=gi + (in_grid & ~grid_done).astype(jnp.int32), grid_done=grid_done,
                       num_bis=rows.num_bis + in_bis.astype(jnp.int32), lo=lo, hi=hi, best=best)


def _search_step(p: _Problem, s: SearchState) -> SearchState:
  """One solver step of every row; ended solves booked, the next solve or the next example started."""
  opts, b = p.opts, p.xf.shape[0]
  st = p.rs.step(s.solver, (s.rows.x, s.rows.label, s.rows.c))
  end = st.done & s.active
  ok = _margin(st.aux, s.rows.label, opts.untargeted) > opts.success_margin
  rows = _record(p, s.rows, st, s.active, end, ok)
  finished = end & rows.grid_done & (rows.num_bis >= opts.num_bisection)
  nxt = end & ~finished
  mid = jnp.where(rows.best.ok, jnp.sqrt(rows.lo * rows.hi), rows.hi / p.ratio)
  c_old = rows.c
  rows = rows._replace(c=jnp.where(nxt, jnp.where(rows.grid_done, mid, p.grid[rows.grid_pos]), rows.c))
  # The next c of the same example changes the objective's Hessian by 2 (c_new - c_old) I (l2_squared).
  shift = jnp.where(nxt, 2.0 * (rows.c - c_old), jnp.nan) if opts.penalty == "l2_squared" else None
  start = jnp.where(rows.best.ok[:, None], rows.best.z, st.z) if opts.warm_start else rows.x
  # Finished examples: results out (rows of e >= b are padding and dropped), next example in.
  idx = jnp.where(finished, rows.e, b)
  out = jax.tree_util.tree_map(lambda o, v: o.at[idx].set(v, mode="drop"), s.out, rows.best)
  e_new = s.next_e + jnp.cumsum(finished, dtype=jnp.int32) - 1
  refill = finished & (e_new < b)
  active = (s.active & ~finished) | refill
  if p.num_slots < b:  # a queue: refill the rows whose example finished
    rows = _fresh_rows(p, rows, refill, e_new)
    start = jnp.where(refill[:, None], rows.x, start)
  st = p.rs.restart(st, nxt | refill, start, None if shift is None else jnp.where(refill, jnp.nan, shift),
                    _first_scale(opts, rows.c))
  st = st._replace(done=st.done | ~active)            # idle rows stay put
  return SearchState(solver=st, rows=rows, out=out, active=active,
                     next_e=s.next_e + jnp.sum(finished, dtype=jnp.int32), trips=s.trips + 1)


def _objective(apply_fn, opts: AttackOptions, params, shape: Tuple[int, ...]) -> Callable[..., Any]:
  """One row's objective ``f(z [n], x0 [n], label, c) -> (c * penalty(z - x0) + loss, logits)``, z an
  input of ``shape`` flattened."""

  def objective(z, x0, lb, c):
    logits = apply_fn(params, z.reshape((1,) + shape))[0]
    return c * _penalty(z - x0, opts) + _loss(logits, lb, opts), logits

  return objective


def _row_solver(apply_fn, opts: AttackOptions, params, shape: Tuple[int, ...]) -> solver_lib.RowSolver:
  """The c search's row solver of :func:`_objective` (args per row: x0 [R, n], label [R], c [R])."""
  return solver_lib.row_solver(_objective(apply_fn, opts, params, shape), *opts.box, solver=opts.solver,
                               maxiter=opts.maxiter, history_size=opts.history_size, tol=opts.tol,
                               ftol=opts.ftol)


def _c_search(apply_fn, opts: AttackOptions, params, x: Array, label: Array, c_grid: Array) -> Best:
  """The c search of every example, one loop over rows of the batched solver (Best sized B)."""
  b, shape, dt, num_c = x.shape[0], x.shape[1:], x.dtype, c_grid.shape[0]
  grid = jnp.sort(c_grid)[::-1]
  ratio = grid[0] / grid[-1] if num_c > 1 else jnp.asarray(10.0, dt)
  ratio = jnp.where(num_c > 1, ratio ** (1.0 / max(num_c - 1, 1)), 10.0)   # the grid's geometric step
  p = _Problem(rs=_row_solver(apply_fn, opts, params, shape), opts=opts, xf=x.reshape(b, -1), label=label,
               grid=grid, ratio=ratio, num_slots=_num_slots(opts, b))
  # At most num_c + num_bisection solves per example (each <= maxiter accepted steps plus rejected
  # trials); the cap only guards against a solver that never ends.
  cap = (num_c + opts.num_bisection) * (opts.maxiter + 2) * 4 * (-(-b // p.num_slots) + 1)
  cond = lambda s: jnp.any(s.active) & (s.trips < cap)
  out = jax.lax.while_loop(cond, lambda s: _search_step(p, s), _search_init(p)).out
  return out._replace(z=out.z.reshape(x.shape))


# Refinement toward the decision boundary, and the program.
def _bisect_segment(ok_fn, p0: Array, p1: Array, steps: int, box) -> Tuple[Array, Array]:
  """Smallest t in [0, 1] (to 2^-steps) with ok_fn(p0 + t (p1 - p0)), per example; p1 (t = 1) is known to
  succeed. Returns (the point at t, t) ([B, ...], [B])."""
  bshape = (-1,) + (1,) * (p0.ndim - 1)
  seg = lambda tt: jnp.clip(p0 + tt.reshape(bshape) * (p1 - p0), *box)

  def body(_, carry):
    t_lo, t_hi = carry
    t_mid = 0.5 * (t_lo + t_hi)
    ok = ok_fn(seg(t_mid))
    return jnp.where(ok, t_lo, t_mid), jnp.where(ok, t_mid, t_hi)

  ones = jnp.ones(p0.shape[:1], p0.dtype)
  _, t_hi = jax.lax.fori_loop(0, steps, body, (0.0 * ones, ones))
  t_hi = jnp.where(ok_fn(p0), 0.0, t_hi)
  return seg(t_hi), t_hi


def _push_out(ok_fn, x: Array, z: Array, mask: Array, box, steps: int = 10) -> Tuple[Array, Array]:
  """For the examples of mask [B]: the first point x + s (z - x), s = 1 + 1e-3 2^j (j < steps), that
  ok_fn accepts (else z). Returns (points [B, ...], s [B]; 1 where unchanged)."""
  bshape = (-1,) + (1,) * (x.ndim - 1)
  at = lambda s: jnp.clip(x + s.reshape(bshape) * (z - x), *box)

  def body(j, carry):
    found, s = carry
    s_j = jnp.full(s.shape, 1.0 + 1e-3 * jnp.exp2(j.astype(s.dtype)), s.dtype)
    new = mask & ~found & ok_fn(at(s_j))
    return found | new, jnp.where(new, s_j, s)

  found, s = jax.lax.fori_loop(0, steps, body, (jnp.zeros(mask.shape, bool), jnp.ones(mask.shape, z.dtype)))
  return jnp.where(found.reshape(bshape), at(s), z), s


def _boundary_rounds(apply_fn, opts: AttackOptions, params, x, label, best: Best, ok_fn) -> Best:
  """Step 3a: ``refine_rounds`` times, project x onto the target region's boundary linearised at the
  current point (exact for a linear model), then bisect back toward the current point until it succeeds;
  keep the candidate only if it succeeds and is closer."""

  def constraints(z, lb):   # g_j >= 0 for every j <=> the goal is met (1e6: no constraint)
    logits = apply_fn(params, z[None])[0]
    k = logits.shape[-1]
    if opts.untargeted:
      j = jnp.argmax(jnp.where(jnp.arange(k) == lb, -jnp.inf, logits))
      return jnp.where(jnp.arange(k) == j, logits - logits[lb], 1e6)
    return jnp.where(jnp.arange(k) == lb, 1e6, logits[lb] - logits)

  project_one = lambda x0, z, lb: solver_lib.boundary_projection(
      lambda zz: (constraints(zz, lb), jax.jacrev(constraints)(zz, lb)), x0, z, *opts.box,
      2.0 * _refine_margin(opts), opts.projection_steps)
  # On CPU, blocks of examples, not one vmap over the batch: each FISTA step reads every Jacobian [k, n] of
  # its block, which stays in cache (1.2x the whole attack's throughput at the defaults, notes/attack.md).
  # The batch is padded to whole blocks (copies of example 0): a ragged last block would be a second copy
  # of the projection in the program. On accelerators, one vmap: blocks would run one after another, each
  # FISTA step's kernels launched batch / 8 times over.
  def project(x0, z, lb):
    if jax.default_backend() != "cpu":
      return jax.vmap(project_one)(x0, z, lb)
    b = x0.shape[0]
    block = min(_PROJECTION_BLOCK, b)
    size = distributed.round_up(b, block)
    pad = lambda a: (jnp.concatenate([a, jnp.broadcast_to(a[:1], (size - b,) + a.shape[1:])]) if size > b
                     else a)
    return jax.lax.map(lambda a: project_one(*a), (pad(x0), pad(z), pad(lb)), batch_size=block)[:b]

  def one_round(_, carry):
    z_cur, d_cur = carry
    cand, _ = _bisect_segment(ok_fn, project(x, z_cur, label), z_cur, opts.refine_steps, opts.box)
    d = _rms(cand, x)
    better = best.ok & (d < d_cur) & ok_fn(cand)
    return jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), cand, z_cur), jnp.where(better, d, d_cur)

  z, d = jax.lax.fori_loop(0, opts.refine_rounds, one_round, (best.z, best.d))
  return best._replace(z=z, d=d)


def _logits_in_input_dtype(apply_fn):
  """``apply_fn`` with its logits cast to the input's dtype: the attack runs in the dtype of x (float32 from
  ``lbfgs_attack``), whatever the dtype of the params (e.g. float64 under ``jax_enable_x64``)."""
  return jax.jit(lambda params, z: apply_fn(params, z).astype(z.dtype))


def _attack_impl(apply_fn, opts: AttackOptions, params, x: Array, label: Array, c_grid: Array
                 ) -> AttackResult:
  """x: [B, *s]; label: [B] int32; c_grid: [G]. Traced under ``precision_lib.scope(opts.precision)``."""
  logging.vlog(1, "attack: tracing the program for %s, x %s, %s", apply_fn, x.shape, opts)
  apply_fn = jax.jit(apply_fn)   # traced once per input shape in this program, not at every call site
  with precision_lib.scope(opts.precision):
    if jax.eval_shape(apply_fn, params, x).dtype != x.dtype:   # e.g. float64 params under jax_enable_x64
      apply_fn = _logits_in_input_dtype(apply_fn)
    best = _c_search(apply_fn, opts, params, x, label, c_grid)
    margin_of = lambda z: _margin(apply_fn(params, z), label, opts.untargeted)
    ok_fn = lambda z: margin_of(z) > _refine_margin(opts)
    if opts.refine and opts.refine_rounds:
      best = _boundary_rounds(apply_fn, opts, params, x, label, best, ok_fn)
    t, x_adv = jnp.ones(label.shape, x.dtype), best.z
    if opts.refine and opts.refine_steps:   # 3b: the smallest succeeding t on the segment x -> x_adv
      x_seg, t_seg = _bisect_segment(ok_fn, x, best.z, opts.refine_steps, opts.box)
      t = jnp.where(best.ok, t_seg, 1.0)
      x_adv = jnp.where(best.ok.reshape((-1,) + (1,) * (x.ndim - 1)), x_seg, best.z)
    # 3c: a search success that falls short of the margin on the batch's evaluation (round-off at the
    # margin: the solver met it on its own row) moves outward along x -> x_adv until it clears it.
    short = best.ok & ~(margin_of(x_adv) > opts.success_margin)
    x_adv, scale = _push_out(ok_fn, x, x_adv, short, opts.box)
    t = t * scale
    logits = apply_fn(params, x_adv)   # 4. the final, authoritative check on the returned points
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  success = (_margin(logits, label, opts.untargeted) > opts.success_margin) & (
      pred != label if opts.untargeted else pred == label)
  return AttackResult(x_adv=x_adv, success=success, c=jnp.where(success, best.c, jnp.nan),
                      distortion=_rms(x_adv, x), pred=pred, t=t, num_iter=best.iters,
                      num_evals=best.evals)


def _checked_impl(apply_fn, opts: AttackOptions, params, x: Array, label: Array, c_grid: Array
                  ) -> Tuple[AttackResult, Array]:
  """``_attack_impl`` and [B] bool: the logits at x are finite (``_raise_if_not_finite``, after the run)."""
  finite = jnp.all(jnp.isfinite(apply_fn(params, x)), axis=-1)
  return _attack_impl(apply_fn, opts, params, x, label, c_grid), finite


_program = jax.jit(_checked_impl, static_argnums=(0, 1))


def _raise_if_not_finite(finite) -> None:
  bad = ~np.asarray(finite)
  if np.any(bad):
    raise ValueError(f"apply_fn returned NaN/inf logits on x for {int(bad.sum())} of {len(bad)} examples "
                     f"(first: example {int(np.argmax(bad))}); are params finite?")


# Input checks (on the host, before anything is compiled; finite logits: after) and the public API.
def _check_inputs(apply_fn, params, x, target, opts: AttackOptions) -> Tuple[np.ndarray, np.ndarray]:
  """Validated (x float32 [B, ...], target int32 [B]); ValueError/TypeError naming the problem. apply_fn is
  traced (``jax.eval_shape``, nothing computed): the input shape fits and the logits are [B, K]. Whether
  they are finite is checked on the program's output (``_raise_if_not_finite``)."""
  if params is None:
    raise TypeError("params is None: call lbfgs_attack(apply_fn, params, x, target) with the model's "
                    "parameters (for Flax: apply_fn=model.apply, params=variables)")
  x, target = np.asarray(x), np.asarray(target)
  if x.dtype not in (np.float32, np.float64):
    raise ValueError(f"x: dtype {x.dtype} is not supported; cast to float32 (values in the box {opts.box})")
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"x must be [batch, *input_shape] with batch >= 1, got shape {x.shape}")
  if target.shape != (x.shape[0],):
    raise ValueError(f"target must have shape ({x.shape[0]},) to match x {x.shape}, got {target.shape}")
  if not np.issubdtype(target.dtype, np.integer):
    raise ValueError(f"target must be integer labels, got dtype {target.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"x contains {int(np.sum(~np.isfinite(x)))} NaN/inf values")
  lo, hi = opts.box
  if np.any(x < lo) or np.any(x > hi):
    raise ValueError(f"x has values outside the box [{lo}, {hi}]: min {x.min()}, max {x.max()}")
  spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  try:
    logits = jax.eval_shape(apply_fn, params, spec)   # traced only: nothing is computed or compiled
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"apply_fn(params, x) fails on x of shape {x.shape} (input shape {x.shape[1:]}); does "
                     f"the model take this input shape, and are params its parameters? "
                     f"{type(e).__name__}: {e}") from e
  if getattr(logits, "ndim", None) != 2 or logits.shape[0] != x.shape[0]:
    raise ValueError(f"apply_fn must map [B, *input_shape] to logits [B, num_classes]; for x of shape "
                     f"{x.shape} it returned shape {getattr(logits, 'shape', type(logits).__name__)}")
  if np.any(target < 0) or np.any(target >= logits.shape[1]):
    raise ValueError(f"target values must be in [0, {logits.shape[1]}), got min {target.min()}, "
                     f"max {target.max()}")
  return x.astype(np.float32), target.astype(np.int32)


def lbfgs_attack(apply_fn: Callable[[Any, Array], Array], params: Any, x: Array, target: Array,
                 options: AttackOptions = AttackOptions(), *, shard: Optional[bool] = None) -> AttackResult:
  """Box-constrained L-BFGS adversarial search with a c search (paper.md §3, A1-A4), checked on the host.

  ``apply_fn(params, x) -> logits`` maps [B, *input_shape] to [B, num_classes] and is hashable (a Flax
  ``model.apply``: equal modules count as one, ``types.static_fn``): one compiled program per (apply_fn,
  input shape, options); ``params``, any pytree, are traced (new parameters reuse it). ``x``: [B,
  *input_shape] float32 (or float64: the attack runs in float32, logits of another dtype, e.g. of float64
  params under ``jax_enable_x64``, are cast to it) inside ``options.box``; ``target``: [B] int labels to
  reach (with ``options.untargeted``: the TRUE labels to move away from). ``shard`` the batch over all
  devices (1-D data mesh, ragged batches padded, multi-host outputs gathered on every process); None = when
  several exist.

  Returns an AttackResult sized B: jax arrays (sharded when ``shard``); numpy arrays in a multi-process run.
  Bad inputs (params None, dtype, NaN, box, target shape/range, an input shape the model does not take,
  logits not [B, K]) raise TypeError/ValueError before anything is compiled (the model is traced, not run);
  logits that are not finite on x raise ValueError after the run (they are an output of the program).
  """
  if not isinstance(options, AttackOptions):
    raise TypeError(f"options must be an AttackOptions, got {type(options).__name__}")
  x, target = _check_inputs(apply_fn, params, x, target, options)
  c_arr, n = np.asarray(options.c_grid, np.float32), x.shape[0]
  if jax.device_count() == 1 or not (shard is None or shard):   # shard=None: when several devices exist
    return _run_workers(static_fn(apply_fn), options, params, x, target, jnp.asarray(c_arr))
  # Examples sharded over every (global) device, padded with copies of example 0 (valid, in-box inputs).
  mesh = distributed.data_mesh()
  size = distributed.round_up(n, mesh.size)
  xs, ts = distributed.put_batch(distributed.pad_batch((x, target), size), mesh)
  c_arr, params = distributed.put_replicated((c_arr, params), mesh)
  res, finite = _program(static_fn(apply_fn), options, params, xs, ts, c_arr)
  if jax.process_count() > 1:
    res, finite = distributed.gather((res, finite))
  _raise_if_not_finite(np.asarray(finite)[:n])
  return distributed.unpad(res, n) if size != n else res


def _run_workers(apply_fn, options: AttackOptions, params, x: np.ndarray, target: np.ndarray, c_arr: Array
                 ) -> AttackResult:
  """The program on ``_num_workers`` contiguous shares of the batch at once (padded with copies of example
  0 to equal shares: one compiled program), results joined in order on the host (no eager device ops,
  which would each compile on a first call)."""
  n = x.shape[0]
  workers = _num_workers(options, n)
  if workers == 1:
    res, finite = _program(apply_fn, options, params, jnp.asarray(x), jnp.asarray(target), c_arr)
    _raise_if_not_finite(finite)
    return res
  size = distributed.round_up(n, workers)
  xs, ts = distributed.pad_batch((x, target), size)
  share = size // workers

  def run(i):
    part = slice(i * share, (i + 1) * share)
    return jax.device_get(_program(apply_fn, options, params, jnp.asarray(xs[part]), jnp.asarray(ts[part]),
                                   c_arr))

  # Compiled once here (cached by jit), not by every thread at once.
  _program.lower(apply_fn, options, params, jnp.asarray(xs[:share]), jnp.asarray(ts[:share]), c_arr).compile()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    res, finite = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:n], *pool.map(run, range(workers)))
  _raise_if_not_finite(finite)
  return jax.device_put(res)


def make_attack(apply_fn: Callable[[Any, Array], Array],
                options: AttackOptions = AttackOptions()) -> Callable[[Any, Array, Array], AttackResult]:
  """The attack as a pure, traceable ``attack_fn(params, x, target) -> AttackResult``, run in the dtype of x,
  for your own ``jit``/``scan`` (e.g. ``jax.jit(make_attack(model.apply, opts))(variables, x, target)`` in
  training): no host-side checks (NaN logits give failed examples, not an error), no sharding, no compile
  cache. Not differentiable (its loops are ``lax.while_loop``s): inside a loss, pass its outputs through
  ``jax.lax.stop_gradient`` (the adversarial examples are data)."""
  if not isinstance(options, AttackOptions):
    raise TypeError(f"options must be an AttackOptions, got {type(options).__name__}")

  def attack_fn(params, x, target):
    return _attack_impl(apply_fn, options, params, x, jnp.asarray(target, jnp.int32),
                        jnp.asarray(options.c_grid, x.dtype))
  return attack_fn
