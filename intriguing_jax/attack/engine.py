"""The attack program: objective, c search, refinement, input checks and ``lbfgs_attack``.

Usage::

    from intriguing_jax import attack
    res = attack.lbfgs_attack(model.apply, x, target, params=variables)

See the package docstring (``intriguing_jax.attack``) for the method.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from intriguing_jax import distributed
from intriguing_jax import precision as precision_lib
from intriguing_jax.attack import solver as solver_lib
from intriguing_jax.attack.solver import box_lbfgs, boundary_projection
from intriguing_jax.types import Array

PENALTIES = ("l2_squared", "l2")
LOSSES = ("cross_entropy", "margin")
SOLVERS = ("jaxopt", "projected")
SCHEDULES = ("continuous", "rounds")
DEFAULT_CPU_SLOTS = 32
DEFAULT_C_GRID = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)


class AttackResult(NamedTuple):
  """Result of ``lbfgs_attack`` (a pytree).

  Attributes:
    x_adv: [B, *input_shape] adversarial images, in the box. For a failed example, the attempt with
      the smallest c (the most aggressive one).
    success: [B] bool, the model's prediction on ``x_adv`` is the target (untargeted: differs from the
      label) with at least ``success_margin`` logits to spare. Checked on ``x_adv``, never assumed.
    c: [B] the penalty weight of the returned solution (nan when no c succeeded).
    distortion: [B] RMS distortion sqrt(mean((x_adv - x)^2)) (paper.md §4.2).
    pred: [B] int32 argmax of the logits on ``x_adv``.
    t: [B] refinement scale, x_adv = x + t (x_c - x) with x_c the c search's minimiser (1: no change).
    num_iter: [B] int32 L-BFGS iterations spent on the example (all c values).
  """
  x_adv: Array
  success: Array
  c: Array
  distortion: Array
  pred: Array
  t: Array
  num_iter: Array


@dataclasses.dataclass(frozen=True)
class AttackOptions:
  """Static options of the attack (hashable; part of the compilation key). See ``lbfgs_attack``."""
  untargeted: bool = False
  penalty: str = "l2_squared"
  loss: str = "cross_entropy"
  box: Tuple[float, float] = (0.0, 1.0)
  maxiter: int = 100
  history_size: int = 10
  tol: float = 1e-4
  c_grid: Tuple[float, ...] = DEFAULT_C_GRID
  num_bisection: int = 6
  warm_start: bool = True
  refine: bool = True
  refine_steps: int = 30
  refine_rounds: int = 2
  projection_steps: int = 300
  ftol: float = 1e-6
  solver: str = "projected"
  success_margin: float = 1e-3
  margin_kappa: float = 0.0
  grid_parallel: Optional[bool] = None
  bisection_maxiter: int = 0
  schedule: Optional[str] = None
  num_slots: int = 0
  precision: Optional[str] = "highest"

  def __post_init__(self):
    # Sequences given as lists stay hashable (the options are a compilation key).
    object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
    object.__setattr__(self, "box", tuple(float(v) for v in self.box))

  def validate(self) -> None:
    if self.penalty not in PENALTIES:
      raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
    if len(self.box) != 2:
      raise ValueError(f"box must be (lower, upper), got {self.box}")
    lo, hi = self.box
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
      raise ValueError(f"box must be finite with lower < upper, got {self.box}")
    for name in ("maxiter", "history_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_bisection", "num_slots", "refine_steps", "refine_rounds", "projection_steps", "bisection_maxiter"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if not (self.ftol >= 0 and math.isfinite(self.ftol)):
      raise ValueError(f"ftol must be finite and >= 0, got {self.ftol}")
    if self.schedule is not None and self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {self.schedule!r}")
    if self.schedule == "continuous" and self.solver == "jaxopt":
      raise ValueError("schedule='continuous' runs our batched projected L-BFGS; solver='jaxopt' needs "
                       "schedule='rounds' (or None)")
    precision_lib.validate(self.precision)
    if self.solver not in SOLVERS:
      raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
    if not self.tol > 0:
      raise ValueError(f"tol must be > 0, got {self.tol}")
    if not self.c_grid or any(not (math.isfinite(c) and c > 0) for c in self.c_grid):
      raise ValueError(f"c_grid must be a non-empty list of finite values > 0, got {self.c_grid}")
    if not (math.isfinite(self.success_margin) and self.success_margin >= 0):
      raise ValueError(f"success_margin must be finite and >= 0, got {self.success_margin}")
    if not (math.isfinite(self.margin_kappa) and self.margin_kappa >= 0):
      raise ValueError(f"margin_kappa must be finite and >= 0, got {self.margin_kappa}")


# ----------------------------------------------------------------------------------------------------
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


def _schedule(opts: AttackOptions) -> str:
  """The c-search schedule: "continuous" unless asked otherwise or the solver is jaxopt's."""
  if opts.schedule is not None:
    return opts.schedule
  return "rounds" if opts.solver == "jaxopt" else "continuous"


def _num_slots(opts: AttackOptions, batch: int) -> int:
  """Rows of the continuous schedule. 0 = auto: every example at once on accelerators and on several
  devices; on one CPU at most DEFAULT_CPU_SLOTS, fed from a queue (measured on FC100-100-10, 200
  examples: 32 rows ran ~3x faster than 200, notes/attack.md; the per-trip cost grows with the rows
  and small rows stay in cache)."""
  if opts.num_slots:
    return min(opts.num_slots, batch)
  if jax.default_backend() == "cpu" and jax.device_count() == 1:
    return min(DEFAULT_CPU_SLOTS, batch)
  return batch  # accelerators, and sharded batches: one row per example (no cross-device gathers)


def _grid_parallel(opts: AttackOptions) -> bool:
  """Whether the c grid is one [B x G]-problem vmap (accelerators) or G [B]-problem solves (CPU)."""
  if opts.grid_parallel is not None:
    return bool(opts.grid_parallel)
  return jax.default_backend() != "cpu"


def _refine_margin(opts: AttackOptions) -> float:
  """Margin (logits) the refinement keeps: twice the success margin (at least 1e-4), so that the returned
  points clear the success test by a float32-safe gap instead of sitting on it."""
  return max(2.0 * opts.success_margin, opts.success_margin + 1e-4)


# ----------------------------------------------------------------------------------------------------
# The compiled program.


def _call(logits_fn, params, has_params, xb):
  return logits_fn(params, xb) if has_params else logits_fn(xb)


def _rounds_search(logits_fn, has_params, opts, params, x, label, c_grid, solve_one, margin_of, rms,
                   evaluate):
  """schedule="rounds": the c grid solved in one batch, then ``num_bisection`` lock-step rounds.

  Every round (and the grid) lasts as long as its slowest example. Returns
  (z_best, d_best, c_out, any_ok, iters)."""
  num_c = c_grid.shape[0]
  # 1. The c grid, examples x c in parallel.
  if _grid_parallel(opts):
    grid_solve = jax.vmap(jax.vmap(solve_one, in_axes=(None, None, None, 0)), in_axes=(0, 0, 0, None))
    z_grid, it_grid = grid_solve(x, x, label, c_grid)                  # [B, G, *s], [B, G]
  else:
    # One c at a time (lax.map), examples in parallel: on CPU the [B*G]-problem solve is memory-bound and
    # ran ~4x slower than G solves of B problems (notes/attack.md), and each c stops with its own
    # slowest member instead of the slowest of the whole grid.
    per_c = lambda c: jax.vmap(solve_one, in_axes=(0, 0, 0, None))(x, x, label, c)
    z_grid, it_grid = jax.lax.map(per_c, c_grid)                       # [G, B, *s], [G, B]
    z_grid, it_grid = jnp.moveaxis(z_grid, 0, 1), jnp.moveaxis(it_grid, 0, 1)
  flat = z_grid.reshape((-1,) + x.shape[1:])
  lab_rep = jnp.repeat(label, num_c)
  ok_grid = (margin_of(flat, lab_rep) > opts.success_margin).reshape(label.shape[0], num_c)
  d_grid = rms(flat, jnp.repeat(x, num_c, axis=0)).reshape(label.shape[0], num_c)

  # Best success = smallest distortion among succeeding c; bracket [lo, hi] = (its c, next failing c).
  d_masked = jnp.where(ok_grid, d_grid, jnp.inf)
  best_i = jnp.argmin(d_masked, axis=1)
  any_ok = jnp.any(ok_grid, axis=1)
  take = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
  sorted_c = jnp.sort(c_grid)
  ratio = sorted_c[-1] / sorted_c[0] if num_c > 1 else jnp.asarray(10.0, c_grid.dtype)
  ratio = jnp.where(num_c > 1, ratio ** (1.0 / max(num_c - 1, 1)), 10.0)
  c_best = c_grid[best_i]
  fail_above = (~ok_grid) & (c_grid[None, :] > c_best[:, None])
  c_hi = jnp.min(jnp.where(fail_above, c_grid[None, :], jnp.inf), axis=1)
  c_hi = jnp.where(jnp.isfinite(c_hi), c_hi, c_best * ratio)
  c_min = sorted_c[0]
  lo = jnp.where(any_ok, c_best, c_min / ratio)          # no success: search below the grid (round_body)
  hi = jnp.where(any_ok, c_hi, c_min)
  fallback_i = jnp.argmin(c_grid) * jnp.ones_like(best_i)
  pick = jnp.where(any_ok, best_i, fallback_i)
  z_best = jnp.take_along_axis(
      z_grid, pick.reshape((-1, 1) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
  d_best = jnp.where(any_ok, take(d_grid, best_i), jnp.inf)
  c_out = jnp.where(any_ok, c_best, jnp.nan)
  iters = jnp.sum(it_grid, axis=1)

  # 2. Bisection rounds on c (log-space), all examples together.
  bisection_maxiter = opts.bisection_maxiter or opts.maxiter
  line_solve = jax.vmap(functools.partial(solve_one, maxiter=bisection_maxiter), in_axes=(0, 0, 0, 0))

  def round_body(_, carry):
    lo, hi, z_best, d_best, c_out, any_ok, iters = carry
    # No success yet: extend the grid downward (toward pure loss minimisation) by the grid ratio per round
    # instead of bisecting a fixed interval below it.
    mid = jnp.where(any_ok, jnp.sqrt(lo * hi), hi / ratio)
    start = jnp.where(any_ok.reshape((-1,) + (1,) * (x.ndim - 1)), z_best, x) if opts.warm_start else x
    z, it = line_solve(x, start, label, mid)
    ok, d = evaluate(z, label)
    better = ok & (d < d_best)
    bshape = (-1,) + (1,) * (x.ndim - 1)
    z_best = jnp.where(better.reshape(bshape), z, z_best)
    d_best = jnp.where(better, d, d_best)
    c_out = jnp.where(better, mid, c_out)
    lo = jnp.where(ok, mid, lo)
    hi = jnp.where(ok, hi, mid)
    return lo, hi, z_best, d_best, c_out, any_ok | ok, iters + it

  carry = (lo, hi, z_best, d_best, c_out, any_ok, iters)
  if opts.num_bisection:
    carry = jax.lax.fori_loop(0, opts.num_bisection, round_body, carry)
  _, _, z_best, d_best, c_out, any_ok, iters = carry
  return z_best, d_best, c_out, any_ok, iters


def _continuous_search(logits_fn, has_params, opts, params, x, label, c_grid, num_slots):
  """schedule="continuous": every example runs its own c search, one solve after the other, in one loop.

  The loop advances ``num_slots`` rows of a batched, restartable L-BFGS (``solver.rows_step``) by one
  objective evaluation per trip. A row works on one example at a time: it scans the c grid from the
  LARGEST c down and stops at the first success (the largest succeeding grid c, paper.md A1), then
  bisects c in log-space ``num_bisection`` times between it and the failing grid value above it (no
  success anywhere: it walks below the grid, one grid ratio per solve, as the rounds schedule does).
  When a row's solve ends it starts the example's next solve at once, and when its example is done it
  takes the next example from the queue (num_slots < B), so no row waits for another: the loop costs
  about (total work) / num_slots trips plus the last example's tail, instead of the sum over rounds of
  each round's slowest example. Returns (z_best, d_best, c_out, any_ok, iters), all [B, ...].
  """
  lower, upper = opts.box
  b = x.shape[0]
  ns = min(int(num_slots), b)
  shape = x.shape[1:]
  dt = x.dtype
  xf = x.reshape(b, -1)
  num_c = c_grid.shape[0]
  grid = jnp.sort(c_grid)[::-1]                       # largest first
  ratio = grid[0] / grid[-1] if num_c > 1 else jnp.asarray(10.0, dt)
  ratio = jnp.where(num_c > 1, ratio ** (1.0 / max(num_c - 1, 1)), 10.0)
  bis_maxiter = opts.bisection_maxiter or opts.maxiter
  num_bis = opts.num_bisection

  def obj1(z, x0, lb, c):
    logits = _call(logits_fn, params, has_params, z.reshape((1,) + shape))[0]
    return c * _penalty(z - x0, opts) + _loss(logits, lb, opts), logits

  vg1 = jax.vmap(jax.value_and_grad(obj1, has_aux=True))
  k = jax.eval_shape(lambda: _call(logits_fn, params, has_params, x[:1])).shape[-1]

  def fresh_search(mask, sr, e_new):
    """(Re)initialises the search state of the rows in mask for examples e_new."""
    m1, m2 = mask, mask[:, None]
    e_safe = jnp.minimum(e_new, b - 1)
    x_new = xf[e_safe]
    return dict(
        e=jnp.where(m1, e_new, sr["e"]), x=jnp.where(m2, x_new, sr["x"]),
        lab=jnp.where(m1, label[e_safe], sr["lab"]),
        c=jnp.where(m1, grid[0], sr["c"]), gi=jnp.where(m1, 0, sr["gi"]),
        grid_done=sr["grid_done"] & ~m1, nb=jnp.where(m1, 0, sr["nb"]),
        lo=sr["lo"], hi=sr["hi"], z_best=jnp.where(m2, x_new, sr["z_best"]),
        d_best=jnp.where(m1, jnp.inf, sr["d_best"]), c_out=jnp.where(m1, jnp.nan, sr["c_out"]),
        any_ok=sr["any_ok"] & ~m1, iters=jnp.where(m1, 0, sr["iters"]),
        maxiter=jnp.where(m1, opts.maxiter, sr["maxiter"])), x_new

  e0 = jnp.arange(ns, dtype=jnp.int32)
  sr0 = dict(e=e0, x=xf[:ns], lab=label[:ns], c=jnp.zeros((ns,), dt), gi=jnp.zeros((ns,), jnp.int32),
             grid_done=jnp.zeros((ns,), bool), nb=jnp.zeros((ns,), jnp.int32), lo=jnp.zeros((ns,), dt),
             hi=jnp.zeros((ns,), dt), z_best=xf[:ns], d_best=jnp.zeros((ns,), dt),
             c_out=jnp.zeros((ns,), dt), any_ok=jnp.zeros((ns,), bool), iters=jnp.zeros((ns,), jnp.int32),
             maxiter=jnp.zeros((ns,), jnp.int32))
  sr0, _ = fresh_search(jnp.ones((ns,), bool), sr0, e0)
  out0 = dict(z_best=xf, d_best=jnp.full((b,), jnp.inf, dt), c_out=jnp.full((b,), jnp.nan, dt),
              any_ok=jnp.zeros((b,), bool), iters=jnp.zeros((b,), jnp.int32))
  st0 = solver_lib.rows_init(xf[:ns], jnp.zeros((ns, k), dt), opts.history_size)
  active0 = jnp.ones((ns,), bool)
  # Every example needs at most num_c + num_bis solves of at most maxiter accepted steps (+ rejected
  # trials); the cap only guards against a solver that never ends.
  per_example = (num_c + num_bis) * (max(opts.maxiter, bis_maxiter) + 2) * 4
  cap = per_example * (-(-b // ns) + 1)

  def cond(carry):
    _, _, _, active, _, t = carry
    return jnp.any(active) & (t < cap)

  def body(carry):
    st, sr, out, active, next_e, t = carry
    xs, lab = sr["x"], sr["lab"]
    st = solver_lib.rows_step(st, lambda z: vg1(z, xs, lab, sr["c"]), lower, upper,
                              maxiter=sr["maxiter"], tol=opts.tol, ftol=opts.ftol)
    end = st.done & active
    ok = _margin(st.aux, lab, opts.untargeted) > opts.success_margin
    d = jnp.sqrt(jnp.mean((st.z - xs) ** 2, axis=1))
    c = sr["c"]
    better = end & ok & (d < sr["d_best"])
    # Until an example succeeds, keep its latest (smallest-c, most aggressive) attempt.
    z_best = jnp.where((better | (end & ~sr["any_ok"] & ~ok))[:, None], st.z, sr["z_best"])
    d_best = jnp.where(better, d, sr["d_best"])
    c_out = jnp.where(better, c, sr["c_out"])
    in_grid = end & ~sr["grid_done"]
    in_bis = end & sr["grid_done"]
    gi = sr["gi"]
    # Grid scan: the first success brackets [c, previous (failing) grid value]; the last grid value
    # failing too sends the row below the grid.
    last = gi >= num_c - 1
    grid_hit = in_grid & ok
    grid_miss_all = in_grid & ~ok & last
    c_prev = jnp.where(gi > 0, grid[jnp.maximum(gi - 1, 0)], c * ratio)
    lo = jnp.where(grid_hit, c, sr["lo"])
    hi = jnp.where(grid_hit, c_prev, sr["hi"])
    lo = jnp.where(grid_miss_all, grid[-1] / ratio, lo)
    hi = jnp.where(grid_miss_all, grid[-1], hi)
    grid_done = sr["grid_done"] | grid_hit | grid_miss_all
    # Bisection (log-space) between the succeeding lo and the failing hi.
    lo = jnp.where(in_bis & ok, c, lo)
    hi = jnp.where(in_bis & ~ok, c, hi)
    nb = sr["nb"] + in_bis.astype(jnp.int32)
    any_ok = sr["any_ok"] | (end & ok)
    gi = gi + (in_grid & ~grid_done).astype(jnp.int32)
    iters = sr["iters"] + jnp.where(end, st.num_iter, 0)
    finished = end & grid_done & (nb >= num_bis)
    nxt = end & ~finished
    c_next = jnp.where(grid_done, jnp.where(any_ok, jnp.sqrt(lo * hi), hi / ratio), grid[gi])
    start = jnp.where(any_ok[:, None], z_best, st.z) if opts.warm_start else xs
    # Finished examples: results out (rows of e >= b are padding and dropped), next example in.
    idx = jnp.where(finished, sr["e"], b)
    put = lambda o, v: o.at[idx].set(v, mode="drop")
    out = dict(z_best=put(out["z_best"], z_best), d_best=put(out["d_best"], d_best),
               c_out=put(out["c_out"], c_out), any_ok=put(out["any_ok"], any_ok),
               iters=put(out["iters"], iters))
    rank = jnp.cumsum(finished.astype(jnp.int32)) - 1
    e_new = next_e + rank
    refill = finished & (e_new < b)
    active = (active & ~finished) | refill
    sr = dict(sr, c=jnp.where(nxt, c_next, c), gi=gi, grid_done=grid_done, nb=nb, lo=lo, hi=hi,
              z_best=z_best, d_best=d_best, c_out=c_out, any_ok=any_ok, iters=iters,
              maxiter=jnp.where(nxt & grid_done, bis_maxiter, sr["maxiter"]))
    if ns < b:  # a queue: refill the rows whose example finished
      sr, x_new = fresh_search(refill, sr, e_new)
      start = jnp.where(refill[:, None], x_new, start)
    st = solver_lib.rows_restart(st, nxt | refill, start)
    st = st._replace(done=st.done | ~active)          # idle rows stay put
    next_e = next_e + jnp.sum(finished.astype(jnp.int32))
    return st, sr, out, active, next_e, t + 1

  carry = (st0, sr0, out0, active0, jnp.asarray(ns, jnp.int32), jnp.zeros((), jnp.int32))
  _, _, out, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return (out["z_best"].reshape(x.shape), out["d_best"], out["c_out"], out["any_ok"], out["iters"])


def _attack_impl(logits_fn, has_params: bool, opts: AttackOptions, params, x, label, c_grid):
  """x: [B, *s]; label: [B]; c_grid: [G]. Returns an AttackResult.

  Traced under ``jax.default_matmul_precision(opts.precision)``: on GPUs and TPUs a float32 matmul is
  otherwise computed in reduced precision (TF32 / bfloat16 passes), whose ~1e-3 relative logit error is
  as large as the success margin and makes flags and refinement depend on the batch layout.
  """
  with precision_lib.scope(opts.precision):
    return _attack_body(logits_fn, has_params, opts, params, x, label, c_grid)


def _attack_body(logits_fn, has_params: bool, opts: AttackOptions, params, x, label, c_grid):
  lower, upper = opts.box
  num_c = c_grid.shape[0]
  margin_of = lambda xb, lb: _margin(_call(logits_fn, params, has_params, xb), lb, opts.untargeted)

  def objective(z, x0, lb, c):
    logits = _call(logits_fn, params, has_params, z[None])[0]
    return c * _penalty(z - x0, opts) + _loss(logits, lb, opts)

  def solve_one(x0, start, lb, c, maxiter=opts.maxiter):
    return box_lbfgs(objective, start, lower, upper, x0, lb, c,
                     maxiter=maxiter, history_size=opts.history_size, tol=opts.tol,
                     ftol=opts.ftol, solver=opts.solver)

  def rms(z, x0):
    d = (z - x0).reshape(z.shape[0], -1)
    return jnp.sqrt(jnp.mean(d * d, axis=1))

  def evaluate(z, lb):
    ok = margin_of(z, lb) > opts.success_margin
    return ok, rms(z, x)

  if _schedule(opts) == "continuous":
    z_best, d_best, c_out, any_ok, iters = _continuous_search(
        logits_fn, has_params, opts, params, x, label, c_grid, _num_slots(opts, x.shape[0]))
  else:
    z_best, d_best, c_out, any_ok, iters = _rounds_search(
        logits_fn, has_params, opts, params, x, label, c_grid, solve_one, margin_of, rms, evaluate)

  # 3. Refinement toward the decision boundary (both steps only ever keep points checked to succeed).
  bshape = (-1,) + (1,) * (x.ndim - 1)
  # The refinement walks toward the decision boundary; it stops at a margin of refine_margin (> the
  # success margin), never at the success threshold itself: a point whose margin equals the threshold
  # flips its flag under the round-off of another batch shape, fusion or device count (measured: the
  # margins of refined points were all 1.000e-3 .. 1.003e-3 with refine_margin = success_margin).
  ok_fn = lambda z: margin_of(z, label) > _refine_margin(opts)

  def bisect_segment(p0, p1, steps):
    """Smallest t in [0, 1] (to 2^-steps) with ok(p0 + t (p1 - p0)); p1 (t = 1) is known to succeed."""
    seg = lambda tt: jnp.clip(p0 + tt.reshape(bshape) * (p1 - p0), lower, upper)

    def body(_, carry):
      t_lo, t_hi = carry
      t_mid = 0.5 * (t_lo + t_hi)
      ok = ok_fn(seg(t_mid))
      return jnp.where(ok, t_lo, t_mid), jnp.where(ok, t_mid, t_hi)

    ones = jnp.ones(label.shape, x.dtype)
    _, t_hi = jax.lax.fori_loop(0, steps, body, (0.0 * ones, ones))
    t_hi = jnp.where(ok_fn(p0), 0.0, t_hi)
    return seg(t_hi), t_hi

  if opts.refine and opts.refine_rounds:
    # 3a. Project x onto the target region's boundary linearised at the current point (exact for a
    # linear model), then pull back along the segment to the current point until it succeeds.
    def constraints(z, lb):
      logits = _call(logits_fn, params, has_params, z[None])[0]
      k = logits.shape[-1]
      own = logits[lb]
      if opts.untargeted:
        j = jnp.argmax(jnp.where(jnp.arange(k) == lb, -jnp.inf, logits))
        g = jnp.where(jnp.arange(k) == j, logits - own, 1e6)
      else:
        g = jnp.where(jnp.arange(k) == lb, 1e6, own - logits)
      return g

    def jac_fn_of(lb):
      return lambda z: (constraints(z, lb), jax.jacrev(constraints)(z, lb))

    project = jax.vmap(lambda x0, z, lb: boundary_projection(
        jac_fn_of(lb), x0, z, lower, upper, 2.0 * _refine_margin(opts), opts.projection_steps))

    def sqp_round(_, carry):
      z_cur, d_cur = carry
      y = project(x, z_cur, label)
      cand, _ = bisect_segment(y, z_cur, opts.refine_steps)
      d = rms(cand, x)
      better = any_ok & (d < d_cur) & ok_fn(cand)
      return jnp.where(better.reshape(bshape), cand, z_cur), jnp.where(better, d, d_cur)

    z_best, d_best = jax.lax.fori_loop(0, opts.refine_rounds, sqp_round, (z_best, d_best))

  t = jnp.ones(label.shape, x.dtype)
  x_adv = z_best
  if opts.refine and opts.refine_steps:
    # 3b. Back toward x along the segment x -> x_adv: the smallest succeeding scale t.
    x_seg, t_seg = bisect_segment(x, z_best, opts.refine_steps)
    t = jnp.where(any_ok, t_seg, 1.0)
    x_adv = jnp.where(any_ok.reshape(bshape), x_seg, z_best)

  # 4. The final, authoritative check on exactly the returned points.
  logits = _call(logits_fn, params, has_params, x_adv)
  success = _margin(logits, label, opts.untargeted) > opts.success_margin
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  success = success & (pred != label if opts.untargeted else pred == label)
  return AttackResult(x_adv=x_adv, success=success, c=jnp.where(success, c_out, jnp.nan),
                      distortion=rms(x_adv, x), pred=pred, t=t, num_iter=iters)


@functools.lru_cache(maxsize=128)
def _compiled(logits_fn, has_params: bool, opts: AttackOptions):
  logging.info("attack: building program for %s (%s)", getattr(logits_fn, "__name__", logits_fn), opts)
  return jax.jit(functools.partial(_attack_impl, logits_fn, has_params, opts))


# ----------------------------------------------------------------------------------------------------
# Input checks (before any compile).


@functools.lru_cache(maxsize=256)
def _out_shape(logits_fn, has_params, params_spec, x_spec):
  params_tree, leaves = params_spec
  if has_params:
    p = jax.tree_util.tree_unflatten(params_tree, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    out = jax.eval_shape(logits_fn, p, jax.ShapeDtypeStruct(*x_spec))
  else:
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(*x_spec))
  return tuple(out.shape)


def _num_classes(logits_fn, params, has_params, x) -> int:
  leaves, treedef = jax.tree_util.tree_flatten(params)
  spec = (treedef, tuple((tuple(np.shape(l)), jnp.asarray(l).dtype) for l in leaves))
  try:
    shape = _out_shape(logits_fn, has_params, spec, ((1,) + tuple(x.shape[1:]), x.dtype))
  except TypeError as e:  # unhashable logits_fn
    raise ValueError(f"logits_fn must be hashable (it is a static argument): {e}") from e
  if len(shape) != 2 or shape[0] != 1:
    raise ValueError(f"logits_fn must map [B, *input_shape] to logits [B, num_classes]; for an input of "
                     f"shape {(1,) + tuple(x.shape[1:])} it returned shape {shape}")
  return shape[1]


def _check_inputs(x, target, opts: AttackOptions):
  x = np.asarray(x)
  target = np.asarray(target)
  if x.ndim < 2:
    raise ValueError(f"x must be [batch, *input_shape], got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"x must be floating point in the box, got dtype {x.dtype}")
  if x.shape[0] == 0:
    raise ValueError("x is empty (batch size 0)")
  if target.shape != (x.shape[0],):
    raise ValueError(f"target must have shape ({x.shape[0]},) to match x {x.shape}, got {target.shape}")
  if not np.issubdtype(target.dtype, np.integer):
    raise ValueError(f"target must be integer labels, got dtype {target.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"x contains {int(np.sum(~np.isfinite(x)))} NaN/inf values")
  lo, hi = opts.box
  if np.any(x < lo) or np.any(x > hi):
    raise ValueError(f"x has values outside the box [{lo}, {hi}]: min {x.min()}, max {x.max()}")
  return x.astype(np.float32) if x.dtype == np.float64 else x, target.astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# Public API.


def lbfgs_attack(logits_fn: Callable[..., Array], x: Array, target: Array, *, params: Any = None,
                 untargeted: bool = False, penalty: str = "l2_squared", loss: str = "cross_entropy",
                 box: Tuple[float, float] = (0.0, 1.0), maxiter: int = 100, history_size: int = 10,
                 tol: float = 1e-4, c_grid: Sequence[float] = DEFAULT_C_GRID, num_bisection: int = 6,
                 warm_start: bool = True, refine: bool = True, refine_steps: int = 30,
                 refine_rounds: int = 2, projection_steps: int = 300, ftol: float = 1e-6,
                 solver: str = "projected",
                 success_margin: float = 1e-3, margin_kappa: float = 0.0,
                 bisection_maxiter: int = 0, grid_parallel: Optional[bool] = None,
                 schedule: Optional[str] = None, num_slots: int = 0,
                 precision: Optional[str] = "highest",
                 shard: Optional[bool] = None) -> AttackResult:
  """Box-constrained L-BFGS adversarial search with a c search (paper.md §3, A1-A4).

  Args:
    logits_fn: ``logits_fn(x)`` (or ``logits_fn(params, x)`` when ``params`` is given) mapping a batch
      [B, *input_shape] to logits [B, num_classes]; any JAX-traceable, hashable function. Reuse the same
      object across calls to reuse the compiled program.
    x: [B, *input_shape] float images inside ``box``.
    target: [B] int labels to reach; with ``untargeted=True`` the TRUE labels to move away from.
    params: optional pytree passed as the first argument of ``logits_fn`` (traced, not static).
    untargeted: success = prediction differs from ``target`` (loss -log(1 - p_target)).
    penalty: "l2_squared" (c ||r||^2, default, paper.md A2) or "l2" (c ||r||, smoothed at 0).
    loss: "cross_entropy" (default, A3) or "margin" (max(max_{j!=l} z_j - z_l, -kappa) with
      kappa = margin_kappa + 2 success_margin).
    box: (lower, upper) pixel bounds.
    maxiter: L-BFGS-B iteration cap per solve.
    history_size: L-BFGS memory.
    tol: L-BFGS-B tolerance on the projected-gradient norm.
    c_grid: penalty values solved in parallel first (a geometric grid).
    num_bisection: log-space bisection rounds on c after the grid.
    warm_start: start each bisection solve at the example's best point so far instead of x.
    refine: final refinement toward the decision boundary (see the package docstring); it keeps a
      margin of max(2 success_margin, success_margin + 1e-4) logits, clear of the success threshold.
    refine_steps: bisection steps of the refinement.
    success_margin: logits margin a success needs (guards the flag against re-evaluation noise).
    margin_kappa: confidence of the "margin" loss.
    refine_rounds: rounds of the boundary projection (step 3a; 0 turns it off).
    projection_steps: FISTA steps of each boundary projection's dual.
    ftol: relative-decrease stopping tolerance of each L-BFGS solve (scipy's factr analogue).
    solver: "projected" (default; our two-metric projected L-BFGS, see ``_projected_lbfgs``) or
      "jaxopt" (``jaxopt.LBFGSB``; its line search stalls on these float32 objectives, notes/attack.md).
    bisection_maxiter: iteration cap of the warm-started bisection solves (0: ``maxiter``).
    schedule: how the c search is scheduled. "continuous" (default; our projected L-BFGS only): each
      example scans the grid from the largest c down to its first success, then bisects; a row of the
      batched solver starts the example's next solve the moment the previous one ends and takes the
      next queued example when one finishes, so nothing waits for the slowest example. "rounds": the
      grid solved for all c at once (see ``grid_parallel``), then ``num_bisection`` lock-step rounds,
      each as long as its slowest example (the default when ``solver="jaxopt"``).
    num_slots: rows of the continuous schedule (examples in flight); 0 = auto (all examples on
      accelerators or several devices; at most 32 on one CPU, fed from a queue).
    precision: ``jax.default_matmul_precision`` under which the attack (solves, refinement and the
      success check) is traced. "highest" (default): float32 matmuls, as on a CPU. On GPUs the ambient
      default is TF32, whose logit error (~1e-3 relative) reaches the success margin: measured on an
      H200, 0.21 % of a 60,000-image attack failed the re-check with it and none with "highest". None
      keeps the ambient setting (faster matmuls for large models).
    grid_parallel: ("rounds" schedule) solve the c grid as one vmap over examples x c (True) or one c at a time with the
      examples vmapped (False, ``lax.map``); None: True on accelerators, False on CPU, where the
      [B*G]-problem solve is memory-bound (measured ~4x slower, notes/attack.md).
    shard: shard the batch over all devices (``intriguing_jax.distributed``: 1-D data mesh, ragged
      batches padded, multi-host outputs gathered so every process gets all B rows as numpy arrays);
      None = when more than one device is visible.

  Returns:
    An AttackResult sized B: jax arrays (sharded over the devices when ``shard``); numpy arrays in a
    multi-process run (gathered on every process).

  Raises:
    ValueError: NaN/inf or out-of-box x, target shape/dtype/range errors, bad options, or a logits_fn
      whose output is not [B, num_classes] -- all before compiling anything.
  """
  opts = AttackOptions(untargeted=bool(untargeted), penalty=penalty, loss=loss,
                       box=box, maxiter=int(maxiter),
                       history_size=int(history_size), tol=float(tol),
                       c_grid=c_grid, num_bisection=int(num_bisection),
                       warm_start=bool(warm_start), refine=bool(refine), refine_steps=int(refine_steps),
                       refine_rounds=int(refine_rounds), projection_steps=int(projection_steps),
                       ftol=float(ftol), solver=solver,
                       success_margin=float(success_margin), margin_kappa=float(margin_kappa),
                       bisection_maxiter=int(bisection_maxiter), schedule=schedule,
                       num_slots=int(num_slots), precision=precision,
                       grid_parallel=None if grid_parallel is None else bool(grid_parallel))
  opts.validate()
  x, target = _check_inputs(x, target, opts)
  has_params = params is not None
  num_classes = _num_classes(logits_fn, params, has_params, x)
  if np.any(target < 0) or np.any(target >= num_classes):
    raise ValueError(f"target values must be in [0, {num_classes}), got min {target.min()}, "
                     f"max {target.max()}")
  fn = _compiled(logits_fn, has_params, opts)
  c_arr = jnp.asarray(opts.c_grid, x.dtype)
  n = x.shape[0]
  if shard is None:
    shard = jax.device_count() > 1
  if not (shard and jax.device_count() > 1):
    return fn(params, jnp.asarray(x), jnp.asarray(target), c_arr)
  # The example axis sharded over every (global) device; parameters and the c grid replicated. A ragged
  # batch is padded with copies of example 0 (valid, in-box inputs), the padding dropped afterwards.
  mesh = distributed.data_mesh()
  size = distributed.round_up(n, mesh.size)
  xs, ts = distributed.put_batch(distributed.pad_batch((x, target), size), mesh)
  c_arr, params = distributed.put_replicated((np.asarray(c_arr), params if has_params else None), mesh)
  res = fn(params, xs, ts, c_arr)
  if jax.process_count() > 1:  # multi-host: every process gets the full result (numpy)
    res = distributed.gather(res)
  return distributed.unpad(res, n) if size != n else res


def make_attack(logits_fn: Callable[..., Array], options: Optional[AttackOptions] = None,
                **kwargs) -> Callable[[Any, Array, Array], AttackResult]:
  """The attack as a pure, traceable function ``attack(params, x, target) -> AttackResult``.

  For use INSIDE your own ``jit``/``scan`` (e.g. generating adversarial examples during training):
  no host-side input checks (``lbfgs_attack`` does those, and cannot be traced), no sharding, no
  compile cache of its own. ``logits_fn(params, x)`` must map [B, *input_shape] to [B, num_classes];
  options are an ``AttackOptions`` or its fields as keywords (validated here, on the host)::

      attack_fn = attack.make_attack(model.apply, maxiter=10, c_grid=(1.0, 0.1), num_bisection=0)
      res = jax.jit(attack_fn)(variables, x, target)
  """
  if options is None:
    options = AttackOptions(**kwargs)
  elif kwargs:
    raise ValueError("pass either options= or keyword options, not both")
  options.validate()

  def attack_fn(params, x, target):
    c_grid = jnp.asarray(options.c_grid, x.dtype)
    return _attack_impl(logits_fn, True, options, params, x, jnp.asarray(target, jnp.int32), c_grid)

  return attack_fn
