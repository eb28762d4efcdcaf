"""Benchmark of the attack (``scripts/bench/attack.py``): quality vs the exact optimum, speed vs scipy.

Parts (``config.parts``): ``convex``, FC10(1e-4) on the first ``num_convex`` test images toward seeded
random targets, the attack with ``config.attack`` and with ``refine=False`` (the paper's method alone) vs
the exact optimum (``exact.linear_min_norm``); ``compare``, FC100-100-10 on the first ``num_compare`` test
images, the attack (median of ``repeats`` warm calls) vs ``scipy_attack`` on the first ``num_baseline``
(0: none). Throughput against the rows in flight: rerun with ``--config.attack.num_slots=...``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import data, exact, train
from intriguing_jax.attack.engine import AttackOptions, lbfgs_attack
from intriguing_jax.attack.perturbations import random_targets

PARTS = ("convex", "compare")


def scipy_attack(apply_fn, params, x, target, opts: AttackOptions):
  """Per-example ``scipy.optimize.fmin_l_bfgs_b`` with the attack's objective c ||r||^2 + cross-entropy and
  its c search (grid from the largest c down to the first success, log-space bisection, warm starts), no
  refinement; jit-compiled JAX gradients. Returns (x_adv [B, m], success [B], distortion [B])."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  shape = (1,) + x.shape[1:]
  logits = lambda z: apply_fn(params, z.reshape(shape))[0]
  vg = jax.jit(jax.value_and_grad(lambda z, x0, lab, c: c * jnp.sum((z - x0) ** 2)
                                  - jax.nn.log_softmax(logits(z))[lab]))
  margin = jax.jit(lambda z, lab: logits(z)[lab] - jnp.max(jnp.where(jnp.arange(logits(z).shape[0]) == lab,
                                                                     -jnp.inf, logits(z))))
  grid = sorted(opts.c_grid, reverse=True)
  ratio = (grid[0] / grid[-1]) ** (1.0 / (len(grid) - 1)) if len(grid) > 1 else 10.0
  out = []
  for x0, lab in zip(np.asarray(x).reshape(x.shape[0], -1), np.asarray(target)):
    best = [x0, False, np.inf]   # z, ok, d: the best success (until one: the latest attempt)

    def solve(c):
      fg = lambda z: tuple(np.asarray(v, np.float64) for v in vg(np.float32(z), x0, lab, np.float32(c)))
      start = best[0] if opts.warm_start else x0
      z = optimize.fmin_l_bfgs_b(fg, np.float64(start), bounds=[opts.box] * x0.size, m=opts.history_size,
                                 maxiter=opts.maxiter, pgtol=opts.tol, factr=opts.ftol / np.finfo(float).eps)
      z = np.float32(z[0])
      ok, d = float(margin(z, lab)) > opts.success_margin, float(np.sqrt(np.mean((z - x0) ** 2)))
      if ok and d < best[2]:
        best[:] = [z, True, d]
      elif not (ok or best[1]):
        best[0] = z
      return ok

    c_lo = None
    for k, c in enumerate(grid):
      if solve(c):
        c_lo, c_hi = c, (grid[k - 1] if k else c * ratio)
        break
    if c_lo is None:   # no success on the grid: walk below it
      c_lo, c_hi = grid[-1] / ratio, grid[-1]
    for _ in range(opts.num_bisection):
      mid = float(np.sqrt(c_lo * c_hi)) if best[1] else c_hi / ratio
      c_lo, c_hi = (mid, c_hi) if solve(mid) else (c_lo, mid)
    out.append((best[0], best[1], float(np.sqrt(np.mean((best[0] - x0) ** 2)))))
  return tuple(np.asarray(v) for v in zip(*out))


def _timed(fn: Callable[[], Any]):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def _part_convex(config, opts, model_fn, x, y) -> Dict[str, Any]:
  model, variables = model_fn("fc10-1e-4")
  x, y = x[:config.num_convex], y[:config.num_convex]
  target = np.asarray(random_targets(jax.random.PRNGKey(config.seed), y))
  sol, t_exact = _timed(lambda: exact.linear_min_norm(*exact.dense_kernel_bias(variables), x, target))
  keep = sol.distortion > 0
  print(f"[convex] FC10(1e-4), {len(x)} test images: exact optimum (float64 dual QP, {t_exact:.1f} s) mean "
        f"RMS {sol.distortion.mean():.5f}, max duality gap {np.max(sol.distortion - sol.lower_bound):.2e}")
  figures = {}
  for name, o in (("default", opts), ("refine=False", dataclasses.replace(opts, refine=False))):
    _, t1 = _timed(lambda: lbfgs_attack(model.apply, variables, x, target, o))
    res, t2 = _timed(lambda: lbfgs_attack(model.apply, variables, x, target, o))
    d, ok = np.asarray(res.distortion), np.asarray(res.success)
    per = d[keep] / sol.distortion[keep]
    f = figures[name] = dict(success=float(ok.mean()), mean_rms=float(d.mean()), time_first_s=t1,
                             ratio=float(d.mean() / sol.distortion.mean()),
                             per_example=(float(per.min()), float(per.max())),
                             below_lower_bound=int(np.sum(d < sol.lower_bound * (1 - 1e-6))),
                             time_second_s=t2)
    print(f"[convex] {name}: success {ok.mean():.1%}, mean RMS {d.mean():.5f}, ratio to exact "
          f"{f['ratio']:.5f} (per example {per.min():.5f}..{per.max():.5f}), below the certified lower "
          f"bound: {f['below_lower_bound']}; {t1:.1f} s first call, {t2:.2f} s second")
  return figures


def _part_compare(config, opts, model_fn, x, y) -> Dict[str, Any]:
  model, variables = model_fn("fc100-100-10")
  n, nb = config.num_compare, min(config.num_baseline, config.num_compare)
  x, target = x[:n], np.asarray(random_targets(jax.random.PRNGKey(config.seed), y[:n]))
  run = lambda: lbfgs_attack(model.apply, variables, x, target, opts)
  res, t1 = _timed(run)
  t2 = float(np.median([_timed(run)[1] for _ in range(config.repeats)]))
  d, ok = np.asarray(res.distortion), np.asarray(res.success)
  print(f"[compare] attack, FC100-100-10, {n} images: {n / t2:.1f} examples/s warm (median of "
        f"{config.repeats}: {t2:.2f} s; first call {t1:.1f} s incl. compile), success {ok.mean():.1%}, "
        f"mean RMS {d.mean():.5f}")
  f = dict(n=n, examples_per_s=n / t2, examples_per_s_with_compile=n / t1, success=float(ok.mean()),
           mean_rms=float(d.mean()))
  if nb:
    (_, bok, bd), tb = _timed(lambda: scipy_attack(model.apply, variables, x[:nb], target[:nb], opts))
    both = bok & ok[:nb]
    f.update(n_baseline=nb, baseline_examples_per_s=nb / tb, baseline_success=float(bok.mean()),
             throughput_ratio=(n / t2) / (nb / tb), rms_ratio=float(d[:nb][both].mean() / bd[both].mean()))
    print(f"[compare] scipy baseline, first {nb}: {nb / tb:.2f} examples/s, success {bok.mean():.1%}; "
          f"ratios: throughput {f['throughput_ratio']:.1f}x warm, mean RMS {f['rms_ratio']:.4f} (on "
          f"{int(both.sum())})")
  return f


def run(config, workdir: str, data_dir=None) -> Dict[str, Any]:
  """Runs ``config.parts`` (the config validated before any data is read); returns the figures."""
  opts = AttackOptions(**config.attack)
  bad = [p for p in config.parts if p not in PARTS]
  if bad or min(config.num_convex, config.num_compare, config.repeats) < 1:
    raise ValueError(f"bench_attack config: parts must be among {PARTS} (got {bad}); num_convex, "
                     f"num_compare and repeats must be >= 1")
  x_train, y_train = data.load_mnist("train", data_dir)
  x_test, y_test = data.load_mnist("test", data_dir)
  n = config.train_examples or len(x_train)

  def model_fn(name):
    return train.get_or_train(name, x_train[:n], y_train[:n], workdir=workdir, epochs=config.epochs or None,
                              run_name=None if n == len(x_train) else f"{name}-n{n}")

  parts = {"convex": _part_convex, "compare": _part_compare}
  figures = {"devices": [str(d) for d in jax.devices()]}
  for part in config.parts:
    figures[part] = parts[part](config, opts, model_fn, x_test, y_test)
  return figures
