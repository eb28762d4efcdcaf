r"""Benchmark of the adversarial search engine (issue 4): quality vs the exact optimum, speed vs scipy.

Command (2 shared CPU cores; the trained models come from intriguing_jax.train.get_or_train, which
restores them from --workdir or trains them there first)::

    nice -n 5 .venv/bin/python -m scripts.bench_attack --data_dir=../shared/data/mnist \
        --workdir=runs/models --out=runs/bench_attack.json

Parts:
1. Convex case: FC10(1e-4), the first --num_convex test images, seeded random wrong targets. Our
   default options (and, for the record, the paper's method alone: refine=False) vs the exact optimum
   of the box-constrained problem (intriguing_jax.exact, float64 dual QP). Goal: mean distortion within
   1% of the exact optimum, never below it, 100% success.
2. FC100-100-10, the first --num_compare test images, seeded random targets: our engine vs a per-example
   scipy.optimize.fmin_l_bfgs_b baseline with the same objective (c ||r||^2 + cross-entropy) and the same
   c search as the engine's default continuous schedule (grid from the largest c down to the first
   success, the same number of log-space bisection steps, the same warm starts), the same maxiter /
   tolerances / history size, with jit-compiled JAX gradients. Prints examples/s, success rate, mean RMS
   distortion and the ratios. The baseline runs on the first --num_baseline of those images (all by default); the ratios compare
   the two on those same images.

Expected runtime and result (2 CPU cores, idle, --restore_only, session 2): ~55 s; convex default
1.0002x the exact optimum, 100% success; FC100-100-10 engine ~260-290 ex/s vs baseline ~19-20 ex/s
(~13-15x), mean RMS ratio 0.99, both 100% success. Under load the per-example baseline slows far more than
the engine (115x measured at load 2-4). Other parts: ``--parts=curve`` (throughput vs num_slots and batch),
``--parts=micro`` (per-call cost of the solver step vs the bare gradient). Details: notes/attack.md.
"""

import json
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import attack
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import exact
from intriguing_jax import train

_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/models", "Where get_or_train keeps the trained models.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the figures (written atomically).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random targets.")
_NUM_CONVEX = flags.DEFINE_integer("num_convex", 100, "Test images of part 1.", lower_bound=1)
_NUM_COMPARE = flags.DEFINE_integer("num_compare", 200, "Test images of part 2.", lower_bound=1)
_NUM_BASELINE = flags.DEFINE_integer("num_baseline", None,
                                     "Images of part 2 the scipy baseline attacks (default: all).",
                                     lower_bound=1)
_PARTS = flags.DEFINE_list("parts", ["convex", "compare"], "Which parts to run.")
_RESTORE_ONLY = flags.DEFINE_bool(
    "restore_only", False, "Load workdir/<name>/final.msgpack directly instead of get_or_train (no "
    "training, no data-fingerprint check).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Part 2: warm engine calls timed (the median counts).",
                                lower_bound=1)
_CURVE_BATCH = flags.DEFINE_list("curve_batch", ["200", "1000"], "Part 'curve': batch sizes (test images).")
_CURVE_SLOTS = flags.DEFINE_list("curve_slots", ["8", "16", "32", "64", "200"],
                                 "Part 'curve': num_slots values (rows in flight; > batch skipped).")
_MICRO_ROWS = flags.DEFINE_list("micro_rows", ["32", "200", "1000"], "Part 'micro': row counts.")
_ROUNDS = flags.DEFINE_bool("rounds", True, "Part 2: also time the engine with schedule='rounds'.")
_VARIANTS = flags.DEFINE_bool("variants", True, "Part 1: also run the paper's method alone (refine=False).")


def _scipy_baseline(apply_fn, params, x, target, opts: attack.AttackOptions):
  """Per-example scipy L-BFGS-B with the engine's objective and c search (no refinement)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  m = int(np.prod(x.shape[1:]))

  @jax.jit
  def value_and_grad(z, x0, lab, c):
    def obj(z):
      logits = apply_fn(params, z.reshape((1,) + x.shape[1:]))[0]
      return c * jnp.sum((z - x0) ** 2) - jax.nn.log_softmax(logits)[lab]
    return jax.value_and_grad(obj)(z)

  @jax.jit
  def margin(z, lab):
    logits = apply_fn(params, z.reshape((1,) + x.shape[1:]))[0]
    return logits[lab] - jnp.max(jnp.where(jnp.arange(logits.shape[0]) == lab, -jnp.inf, logits))

  lo, hi = opts.box
  bounds = [(lo, hi)] * m
  factr = opts.ftol / np.finfo(np.float64).eps

  def solve(x0, start, lab, c):
    def fg(z):
      v, g = value_and_grad(z.astype(np.float32), x0, lab, np.float32(c))
      return float(v), np.asarray(g, np.float64)
    z, _, _ = optimize.fmin_l_bfgs_b(fg, start.astype(np.float64), bounds=bounds, m=opts.history_size,
                                     maxiter=opts.maxiter, pgtol=opts.tol, factr=factr)
    z = z.astype(np.float32)
    ok = float(margin(z, lab)) > opts.success_margin
    return z, ok, float(np.sqrt(np.mean((z - x0) ** 2)))

  grid = sorted(opts.c_grid, reverse=True)  # the engine's continuous c search: largest c first
  ratio = (grid[0] / grid[-1]) ** (1.0 / max(len(grid) - 1, 1)) if len(grid) > 1 else 10.0
  out_x, out_ok, out_d = [], [], []
  for i in range(x.shape[0]):
    x0 = np.asarray(x[i]).reshape(-1)
    lab = int(target[i])
    best_z, best_ok, best_d = None, False, np.inf
    start = x0
    c_lo = c_hi = None

    def record(z, ok, d):
      nonlocal best_z, best_ok, best_d, start
      if ok and d < best_d:
        best_z, best_d = z, d
      if not best_ok and not ok:
        best_z = z  # until a success: the latest (most aggressive) attempt
      best_ok = best_ok or ok
      # The engine's warm start: the best success so far, else the attempt that just ended.
      start = (best_z if best_ok else z) if opts.warm_start else x0

    # 1. Grid scan from the largest c down to the first success (paper.md A1: the largest succeeding c).
    for k, c in enumerate(grid):
      z, ok, d = solve(x0, start, lab, c)
      record(z, ok, d)
      if ok:
        c_lo, c_hi = c, (grid[k - 1] if k > 0 else c * ratio)
        break
    if c_lo is None:  # no success on the grid: walk below it, one grid ratio per solve
      c_lo, c_hi = grid[-1] / ratio, grid[-1]
    # 2. Log-space bisection between the succeeding and the failing c.
    for _ in range(opts.num_bisection):
      mid = float(np.sqrt(c_lo * c_hi)) if best_ok else c_hi / ratio
      z, ok, d = solve(x0, start, lab, mid)
      record(z, ok, d)
      c_lo, c_hi = (mid, c_hi) if ok else (c_lo, mid)
    out_x.append(best_z)
    out_ok.append(best_ok)
    out_d.append(float(np.sqrt(np.mean((best_z - x0) ** 2))))
  return np.stack(out_x), np.asarray(out_ok), np.asarray(out_d)


def _model(name, model_name):
  if _RESTORE_ONLY.value:
    import os  # pylint: disable=g-import-not-at-top
    from intriguing_jax import models  # pylint: disable=g-import-not-at-top
    path = os.path.join(_WORKDIR.value, name, "final.msgpack")
    logging.warning("restoring %s directly (--restore_only)", path)
    return models.get_model(model_name), checkpoint.load_pytree(path)
  x_train, y_train = data.load_mnist("train", _DATA_DIR.value)
  return train.get_or_train(name, x_train, y_train, workdir=_WORKDIR.value)


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def part_convex(images, labels, figures):
  model, variables = _model("fc10-1e-4", "fc10")
  x = images[:_NUM_CONVEX.value]
  target = np.asarray(attack.random_targets(jax.random.PRNGKey(_SEED.value), labels[:x.shape[0]]))
  kernel, bias = exact.dense_kernel_bias(variables)
  sol, t_exact = _timed(lambda: exact.linear_min_norm(kernel, bias, x, target))
  keep = sol.distortion > 0  # examples the model already classifies as the target need no attack
  print(f"[convex] FC10(1e-4), {x.shape[0]} test images, seed {_SEED.value}: exact optimum "
        f"(float64 dual QP, {t_exact:.1f} s): mean RMS {sol.distortion.mean():.5f}, max duality gap "
        f"{np.max(sol.distortion - sol.lower_bound):.2e}, {int((~keep).sum())} already at the target")
  variants = [("default", {})]
  if _VARIANTS.value:
    variants.append(("paper method only (refine=False)", {"refine": False}))
  for name, kw in variants:
    res, t1 = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables, **kw))
    res, t2 = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables, **kw))
    d = np.asarray(res.distortion)
    succ = np.asarray(res.success)
    pred = np.argmax(np.asarray(model.apply(variables, res.x_adv)), -1)
    rechecked = float(np.mean(pred == target))
    ratio = d.mean() / sol.distortion.mean()
    per = d[keep] / sol.distortion[keep]
    below = int(np.sum(d < sol.lower_bound * (1 - 1e-6)))
    print(f"[convex] {name}: success {succ.mean():.1%} (re-checked with model.apply: {rechecked:.1%}), "
          f"mean RMS {d.mean():.5f}, ratio to exact {ratio:.5f}, per-example ratio min {per.min():.5f} "
          f"max {per.max():.5f}, below the certified lower bound: {below}; time {t1:.1f} s first call "
          f"(with compile), {t2:.1f} s second")
    figures[f"convex/{name}"] = dict(success=float(succ.mean()), rechecked=rechecked, mean_rms=float(d.mean()),
                                     exact_mean_rms=float(sol.distortion.mean()), ratio=float(ratio),
                                     per_example_min=float(per.min()), per_example_max=float(per.max()),
                                     below_lower_bound=below, time_first_s=t1, time_second_s=t2)


def part_compare(images, labels, figures):
  model, variables = _model("fc100-100-10", "fc100-100-10")
  n = _NUM_COMPARE.value
  x = images[:n]
  target = np.asarray(attack.random_targets(jax.random.PRNGKey(_SEED.value), labels[:n]))
  res, t1 = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables))
  times = []
  for _ in range(_REPEATS.value):
    res, t = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables))
    times.append(t)
  t2 = float(np.median(times))
  d = np.asarray(res.distortion)
  succ = np.asarray(res.success)
  print(f"[compare] engine (median of {len(times)} warm calls: {', '.join(f'{t:.2f}' for t in times)} s), FC100-100-10, {n} images: {n / t2:.1f} examples/s warm ({t2:.1f} s; first "
        f"call {t1:.1f} s incl. compile = {n / t1:.1f} examples/s), success {succ.mean():.1%}, mean RMS "
        f"{d.mean():.5f}")
  if _ROUNDS.value:  # the previous engine schedule, for the record (same images, same options otherwise)
    rr, _ = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables, schedule="rounds"))
    rr, tr = _timed(lambda: attack.lbfgs_attack(model.apply, x, target, params=variables, schedule="rounds"))
    print(f"[compare] engine, schedule='rounds' (grid then lock-step bisection rounds): {n / tr:.1f} "
          f"examples/s warm ({tr:.1f} s), success {np.mean(rr.success):.1%}, mean RMS "
          f"{np.mean(rr.distortion):.5f}")
    figures["compare_rounds"] = dict(examples_per_s=n / tr, success=float(np.mean(rr.success)),
                                     mean_rms=float(np.mean(rr.distortion)))
  nb = min(_NUM_BASELINE.value or n, n)
  opts = attack.AttackOptions()
  (bx, bok, bd), tb = _timed(lambda: _scipy_baseline(model.apply, variables, x[:nb], target[:nb], opts))
  print(f"[compare] scipy baseline on the first {nb}: {nb / tb:.2f} examples/s ({tb:.1f} s), success "
        f"{bok.mean():.1%}, mean RMS {bd[bok].mean() if bok.any() else float('nan'):.5f}")
  both = bok & succ[:nb]
  thr = (n / t2) / (nb / tb)
  d_ratio = d[:nb][both].mean() / bd[both].mean()
  print(f"[compare] ratios (engine / baseline, same {nb} images): throughput {thr:.1f}x warm, "
        f"{(n / t1) / (nb / tb):.1f}x incl. compile; mean RMS {d_ratio:.4f} (on the {int(both.sum())} "
        f"attacked successfully by both); success {succ[:nb].mean():.1%} vs {bok.mean():.1%}")
  figures["compare"] = dict(n=n, n_baseline=nb, engine_examples_per_s=n / t2,
                            engine_examples_per_s_with_compile=n / t1, engine_success=float(succ.mean()),
                            engine_mean_rms=float(d.mean()), baseline_examples_per_s=nb / tb,
                            baseline_success=float(bok.mean()), baseline_mean_rms=float(bd[bok].mean()),
                            throughput_ratio=thr, rms_ratio=float(d_ratio),
                            engine_success_on_baseline_set=float(succ[:nb].mean()))


def part_curve(images, labels, figures):
  """Throughput vs rows in flight (num_slots) and vs batch size, FC100-100-10, default options."""
  model, variables = _model("fc100-100-10", "fc100-100-10")
  rows = []
  for bsz in [int(v) for v in _CURVE_BATCH.value]:
    x = images[:bsz]
    target = np.asarray(attack.random_targets(jax.random.PRNGKey(_SEED.value), labels[:bsz]))
    for slots in [int(v) for v in _CURVE_SLOTS.value]:
      if slots > bsz:
        continue
      run = lambda: attack.lbfgs_attack(model.apply, x, target, params=variables, num_slots=slots)
      res, t1 = _timed(run)
      _, t2 = _timed(run)
      _, t3 = _timed(run)
      t = min(t2, t3)
      print(f"[curve] batch {bsz:6d}, num_slots {slots:6d}: {bsz / t:8.1f} examples/s warm ({t:.2f} s; "
            f"first call {t1:.2f} s), success {np.mean(res.success):.1%}, mean RMS "
            f"{np.mean(res.distortion):.5f}", flush=True)
      rows.append(dict(batch=bsz, num_slots=slots, examples_per_s=bsz / t, warm_s=t, first_s=t1,
                       success=float(np.mean(res.success)), mean_rms=float(np.mean(res.distortion))))
  figures["curve"] = rows


def part_micro(images, labels, figures):
  """Per-call cost of the solver's batched step vs the bare batched value-and-gradient, FC100-100-10.

  One jitted ``fori_loop`` of 100 calls each, on R rows of test images at c = 1 (the objective of the
  attack); min over 3 timed runs. This is the cost floor the throughput analysis in BUILD_NOTES uses.
  """
  from intriguing_jax.attack import engine, solver  # pylint: disable=g-import-not-at-top
  model, variables = _model("fc100-100-10", "fc100-100-10")
  opts = attack.AttackOptions()
  shape = images.shape[1:]
  rows = []

  def obj1(z, x0, lb, c):
    logits = model.apply(variables, z.reshape((1,) + shape))[0]
    return c * jnp.sum((z - x0) ** 2) + engine._loss(logits, lb, opts), logits  # pylint: disable=protected-access

  vg1 = jax.vmap(jax.value_and_grad(obj1, has_aux=True))
  for r in [int(v) for v in _MICRO_ROWS.value]:
    xf = jnp.asarray(images[:r].reshape(r, -1))
    lab = jnp.asarray(attack.random_targets(jax.random.PRNGKey(_SEED.value), labels[:r]))
    c = jnp.ones((r,), xf.dtype)
    k = int(model.apply(variables, images[:1]).shape[-1])

    @jax.jit
    def steps(xf, lab, c):
      st = solver.rows_init(xf, jnp.zeros((r, k), xf.dtype), opts.history_size)
      def body(_, st):
        st = solver.rows_step(st, lambda z: vg1(z, xf, lab, c), 0.0, 1.0, maxiter=10**6, tol=0.0, ftol=0.0)
        return st._replace(done=jnp.zeros_like(st.done))  # keep every row busy
      return jax.lax.fori_loop(0, 100, body, st).f

    @jax.jit
    def bare(xf, lab, c):
      def body(_, z):
        (_, _), g = vg1(z, xf, lab, c)
        return jnp.clip(z - 1e-3 * g, 0.0, 1.0)
      return jax.lax.fori_loop(0, 100, body, xf)

    out = {"rows": r, "history_size": opts.history_size}
    for name, fn in (("rows_step", steps), ("bare_value_and_grad", bare)):
      jax.block_until_ready(fn(xf, lab, c))
      best = min(_timed(lambda: fn(xf, lab, c))[1] for _ in range(3))
      out[f"{name}_ms_per_call"] = 1e3 * best / 100
      out[f"{name}_us_per_row"] = 1e6 * best / 100 / r
    print(f"[micro] {r:5d} rows: rows_step {out['rows_step_ms_per_call']:.3f} ms per call "
          f"({out['rows_step_us_per_row']:.1f} us/row); bare value-and-grad "
          f"{out['bare_value_and_grad_ms_per_call']:.3f} ms ({out['bare_value_and_grad_us_per_row']:.1f} us/row)",
          flush=True)
    rows.append(out)
  figures["micro"] = rows


def main(argv):
  del argv
  for part in _PARTS.value:
    if part not in ("convex", "compare", "curve", "micro"):
      raise app.UsageError(f"--parts: unknown part {part!r} (choose from convex, compare, curve, micro)")
  for name, vals in (("curve_batch", _CURVE_BATCH.value), ("curve_slots", _CURVE_SLOTS.value),
                     ("micro_rows", _MICRO_ROWS.value)):
    if not all(v.isdigit() and int(v) >= 1 for v in vals):
      raise app.UsageError(f"--{name} must be positive integers, got {vals}")
  logging.info("devices: %s", jax.devices())
  images, labels = data.load_mnist("test", _DATA_DIR.value)
  figures = {"devices": [str(d) for d in jax.devices()]}
  if "convex" in _PARTS.value:
    part_convex(images, labels, figures)
  if "compare" in _PARTS.value:
    part_compare(images, labels, figures)
  if "curve" in _PARTS.value:
    part_curve(images, labels, figures)
  if "micro" in _PARTS.value:
    part_micro(images, labels, figures)
  if _OUT.value:
    checkpoint.atomic_write_json(_OUT.value, figures)


if __name__ == "__main__":
  app.run(main)
