"""Benchmark of the attack (``scripts/bench/attack.py``): quality vs the exact optimum, speed vs scipy.

Parts (``config.parts``): ``convex``, FC10(1e-4) on the first ``num_convex`` test images toward seeded
random targets, the attack with ``config.attack`` and with ``refine=False`` (the paper's method alone) vs
the exact optimum (``exact.linear_min_norm``); ``compare``, FC100-100-10 on the first ``num_compare`` test
images, the attack (median of ``repeats`` warm calls) vs another checkout's engine at its defaults on the
same inputs (``reference``: a path; "" = none; their warm calls alternate, the throughput ratio is the
median of the pairs) and vs ``scipy_attack`` on the first ``num_baseline`` (0: none); ``budgets``, the
same inputs under every ``budgets`` entry (option overrides; their warm calls in turn): evaluations, time
and distortion of each, the Pareto front; ``batch``, throughput against the batch (``batches``);
``first_call``, the cold first call (fresh process, no compilation cache) on the compare inputs, its
stages, and the first call from a filled persistent cache, of this checkout and of ``reference``, and the
compile of the programs nested in this checkout's attack (:data:`PROGRAMS`).
Every speed figure comes with the evaluations per example it took (``AttackResult.num_evals``, plus the
refinement's fixed forward passes and Jacobians, :func:`refinement_evals`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import data, exact, train
from intriguing_jax.attack.engine import AttackOptions, lbfgs_attack
from intriguing_jax.attack.perturbations import random_targets

PARTS = ("convex", "compare", "budgets", "batch", "first_call")


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


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
  """(``fn()`` with its JAX arrays awaited, the call's wall time in seconds)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def refinement_evals(opts: AttackOptions) -> Dict[str, int]:
  """Model evaluations per example of the refinement (fixed by the options): forward passes, and
  Jacobians of the k constraints (each about k backward passes)."""
  if not opts.refine:
    return dict(forward=1, jacobians=0)
  forward = opts.refine_rounds * (opts.refine_steps + 2) + (opts.refine_steps + 1 if opts.refine_steps else 0)
  return dict(forward=forward + 1, jacobians=opts.refine_rounds)


def pareto(points: Sequence[Tuple[str, float, float]]) -> List[str]:
  """Names of the points (name, seconds_per_example, mean_distortion) that no other point dominates (at
  most as slow and at most as distorted, strictly better in one), in the given order. A point with a
  non-finite coordinate is never on the front and dominates nothing."""
  pts = [(n, float(c), float(d)) for n, c, d in points]
  finite = [(n, s, d) for n, s, d in pts if np.isfinite(s) and np.isfinite(d)]
  return [n for n, s, d in finite
          if not any(s2 <= s and d2 <= d and (s2 < s or d2 < d) for _, s2, d2 in finite)]


def reference_budget(budgets) -> str:
  """The budget the others' distortions are compared with: "default" if ``budgets`` has it, else its
  first entry (a ConfigDict keeps its keys sorted, not in the order written)."""
  return "default" if "default" in budgets else next(iter(budgets))


def _figures(res, opts: AttackOptions, n: int, time_first: float, time_warm: float) -> Dict[str, Any]:
  d, ok = np.asarray(res.distortion), np.asarray(res.success)
  return dict(s_per_example=time_warm / n, examples_per_s=n / time_warm, time_first_s=time_first,
              success=float(ok.mean()), mean_rms=float(d.mean()),
              evals_per_example=float(np.mean(res.num_evals)), evals_max=int(np.max(res.num_evals)),
              refinement_evals=refinement_evals(opts), distortion=d, success_mask=ok,
              x_adv=np.asarray(res.x_adv))


def in_rounds(fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[Any]]:
  """Calls every function of ``fns`` (name -> function) once per round, in turn, for ``rounds`` rounds;
  returns each one's results in order. Timings taken this way share the machine's drifts alike."""
  out = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      out[k].append(fn())
  return out


def measure(apply_fn, params, x, target, opts: AttackOptions, repeats: int) -> Dict[str, Any]:
  """The attack on (x, target): first call (compile included) and the median of ``repeats`` warm calls.

  Returns s_per_example (warm), examples_per_s, time_first_s, success, mean_rms, evals_per_example (the c
  search's value-and-gradient evaluations, ``AttackResult.num_evals``; with all examples in flight, as on
  accelerators, the loop's trips follow evals_max, the most any example took), refinement_evals, and the
  result arrays distortion / success_mask / x_adv (numpy) for re-scoring."""
  return measure_each(apply_fn, params, x, target, {"": opts}, repeats)[""]


def measure_each(apply_fn, params, x, target, options: Dict[str, AttackOptions], repeats: int
                 ) -> Dict[str, Dict[str, Any]]:
  """:func:`measure` for every entry of ``options`` (name -> options), their warm calls taken in turn
  (round r times every entry once) so that a drift in the machine's speed touches them alike."""
  runs = {k: functools.partial(lbfgs_attack, apply_fn, params, x, target, o) for k, o in options.items()}
  first = {k: timed(run) for k, run in runs.items()}
  warm = in_rounds({k: functools.partial(lambda run: timed(run)[1], run) for k, run in runs.items()}, repeats)
  return {k: _figures(first[k][0], options[k], len(x), first[k][1], float(np.median(warm[k])))
          for k in runs}


def _part_convex(config, opts, model_fn, x, y) -> Dict[str, Any]:
  model, variables = model_fn("fc10-1e-4")
  x, y = x[:config.num_convex], y[:config.num_convex]
  target = np.asarray(random_targets(jax.random.PRNGKey(config.seed), y))
  sol, t_exact = timed(lambda: exact.linear_min_norm(*exact.dense_kernel_bias(variables), x, target))
  keep = sol.distortion > 0
  print(f"[convex] FC10(1e-4), {len(x)} test images: exact optimum (float64 dual QP, {t_exact:.1f} s) mean "
        f"RMS {sol.distortion.mean():.5f}, max duality gap {np.max(sol.distortion - sol.lower_bound):.2e}")
  figures = {}
  for name, o in (("default", opts), ("refine=False", dataclasses.replace(opts, refine=False))):
    m = measure(model.apply, variables, x, target, o, 1)
    d, ok = m["distortion"], m["success_mask"]
    per = d[keep] / sol.distortion[keep]
    f = figures[name] = dict(_scalars(m), ratio=float(d.mean() / sol.distortion.mean()),
                             per_example=(float(per.min()), float(per.max())),
                             below_lower_bound=int(np.sum(d < sol.lower_bound * (1 - 1e-6))))
    print(f"[convex] {name}: success {ok.mean():.1%}, mean RMS {d.mean():.5f}, ratio to exact "
          f"{f['ratio']:.5f} (per example {per.min():.5f}..{per.max():.5f}), below the certified lower "
          f"bound: {f['below_lower_bound']}; {m['time_first_s']:.1f} s first call, "
          f"{m['s_per_example'] * len(x):.2f} s second; c-search evaluations per example "
          f"{m['evals_per_example']:.1f}")
  return figures


def _compare_inputs(config, model_fn, x, y, n):
  model, variables = model_fn("fc100-100-10")
  return model, variables, x[:n], np.asarray(random_targets(jax.random.PRNGKey(config.seed), y[:n]))


def _print_measure(tag: str, name: str, m: Dict[str, Any], n: int, repeats: int) -> None:
  ref = m["refinement_evals"]
  print(f"[{tag}] {name}, {n} images: {m['examples_per_s']:.1f} examples/s warm (median of {repeats}; first "
        f"call {m['time_first_s']:.2f} s incl. compile), success {m['success']:.1%}, mean RMS "
        f"{m['mean_rms']:.5f}, evaluations per example: c search {m['evals_per_example']:.1f} (the most: "
        f"{m['evals_max']}) + refinement {ref['forward']} forward, {ref['jacobians']} Jacobians")


def _scalars(m: Dict[str, Any]) -> Dict[str, Any]:
  return {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}


def _part_compare(config, opts, model_fn, x, y) -> Dict[str, Any]:
  model, variables, x, target = _compare_inputs(config, model_fn, x, y, config.num_compare)
  n, nb = len(x), min(config.num_baseline, config.num_compare)
  m = measure(model.apply, variables, x, target, opts, config.repeats)
  _print_measure("compare", "attack, FC100-100-10", m, n, config.repeats)
  d, ok = m["distortion"], m["success_mask"]
  f = dict(n=n, **_scalars(m))
  if config.reference:
    run = lambda: lbfgs_attack(model.apply, variables, x, target, opts)
    r = reference_attack(config.reference, "fc100-100-10", variables, x, target, config.repeats, here=run)
    both = r["success"] & ok
    ratios = r["times_warm"] / r["times_here"]
    f["reference"] = dict(tree=config.reference, examples_per_s=n / float(np.median(r["times_warm"])),
                          here_examples_per_s=n / float(np.median(r["times_here"])),
                          time_first_s=r["time_first"],
                          success=float(r["success"].mean()), mean_rms=float(r["distortion"].mean()),
                          throughput_ratio=float(np.median(ratios)),
                          throughput_ratio_range=(float(ratios.min()), float(ratios.max())),
                          rms_ratio=float(d[both].mean() / r["distortion"][both].mean()))
    g = f["reference"]
    print(f"[compare] reference engine ({config.reference}, its defaults), same inputs, {config.repeats} "
          f"warm calls each alternating with this checkout's: {g['examples_per_s']:.1f} examples/s vs "
          f"{g['here_examples_per_s']:.1f} here (medians; first call {r['time_first']:.2f} s), success "
          f"{r['success'].mean():.1%}, mean RMS {r['distortion'].mean():.5f}; ratios: throughput "
          f"{g['throughput_ratio']:.2f}x (median of the pairs; range {ratios.min():.2f}.."
          f"{ratios.max():.2f}), mean RMS {g['rms_ratio']:.5f} (on {int(both.sum())})")
  if nb:
    (_, bok, bd), tb = timed(lambda: scipy_attack(model.apply, variables, x[:nb], target[:nb], opts))
    both = bok & ok[:nb]
    f.update(n_baseline=nb, baseline_examples_per_s=nb / tb, baseline_success=float(bok.mean()),
             throughput_ratio=m["examples_per_s"] / (nb / tb),
             rms_ratio=float(d[:nb][both].mean() / bd[both].mean()))
    print(f"[compare] scipy baseline, first {nb}: {nb / tb:.2f} examples/s, success {bok.mean():.1%}; "
          f"ratios: throughput {f['throughput_ratio']:.1f}x warm, mean RMS {f['rms_ratio']:.4f} (on "
          f"{int(both.sum())})")
  return f


def _part_budgets(config, opts, model_fn, x, y) -> Dict[str, Any]:
  """Distortion against evaluations: every ``config.budgets`` entry (option overrides) on the compare
  inputs (warm calls in turn, :func:`measure_each`), its ratio to :func:`reference_budget`'s mean RMS, and
  whether it is on the Pareto front (s/example, RMS)."""
  model, variables, x, target = _compare_inputs(config, model_fn, x, y, config.num_compare)
  options = {name: dataclasses.replace(opts, **o) for name, o in config.budgets.items()}
  figures = {}
  for name, m in measure_each(model.apply, variables, x, target, options, config.repeats).items():
    _print_measure("budgets", name, m, len(x), config.repeats)
    figures[name] = _scalars(m)
  first = figures[reference_budget(figures)]
  front = pareto([(k, v["s_per_example"], v["mean_rms"]) for k, v in figures.items()])
  for name, v in figures.items():
    v.update(rms_ratio=v["mean_rms"] / first["mean_rms"], pareto=name in front)
    print(f"[budgets] {name:28s} evals/example {v['evals_per_example']:6.1f}  ms/example "
          f"{1e3 * v['s_per_example']:6.3f}  mean RMS ratio {v['rms_ratio']:.5f}  success {v['success']:.1%}"
          f"{'  (Pareto front)' if v['pareto'] else ''}")
  return figures


def _part_batch(config, opts, model_fn, x, y) -> Dict[str, Any]:
  """Throughput against the batch (``config.batches``) with the options' programs in flight."""
  model, variables, xs, target = _compare_inputs(config, model_fn, x, y, max(config.batches))
  figures = {}
  for b in config.batches:
    m = measure(model.apply, variables, xs[:b], target[:b], opts, config.repeats)
    _print_measure("batch", f"batch {b}", m, b, config.repeats)
    figures[str(b)] = _scalars(m)
  return figures


_LOAD = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import serialization
from intriguing_jax import models
from intriguing_jax.attack import engine, lbfgs_attack
from intriguing_jax.types import static_fn
d = np.load(sys.argv[1])
model = models.get_model(sys.argv[2])
with open(sys.argv[3], "rb") as f:
  v = jax.block_until_ready(serialization.from_bytes(model.init(jax.random.PRNGKey(0), d["x"][:1]), f.read()))
x, target, out = d["x"], d["target"], {}
"""

# A server: one timed warm call per "run" line on stdin (its seconds on stdout), the results on "end".
_REFERENCE_SCRIPT = _LOAD + """
run = lambda: jax.block_until_ready(lbfgs_attack(model.apply, v, x, target))
t0 = time.perf_counter(); r = run(); first = time.perf_counter() - t0
print("ready", flush=True)
for line in sys.stdin:
  if line.strip() != "run":
    break
  t0 = time.perf_counter(); r = run(); print("seconds", time.perf_counter() - t0, flush=True)
np.savez(sys.argv[4], distortion=np.asarray(r.distortion), success=np.asarray(r.success), time_first=first)
"""

# The stages of a first call as lbfgs_attack runs them on one CPU device (engine internals), or the call.
_FIRST_CALL_SCRIPT = _LOAD + """
t = [time.perf_counter()]
if sys.argv[5] == "call":
  jax.block_until_ready(lbfgs_attack(model.apply, v, x, target)); t.append(time.perf_counter())
else:
  opts, fn = engine.AttackOptions(), static_fn(model.apply)
  xc, tc = engine._check_inputs(model.apply, v, x, target, opts); t.append(time.perf_counter())
  share, c = -(-len(xc) // engine._num_workers(opts, len(xc))), jnp.asarray(np.float32(opts.c_grid))
  traced = engine._program.trace(fn, opts, v, jnp.asarray(xc[:share]), jnp.asarray(tc[:share]), c)
  t.append(time.perf_counter())
  lowered = traced.lower(); t.append(time.perf_counter())
  compiled = lowered.compile(); t.append(time.perf_counter())
  jax.block_until_ready(engine._run_workers(fn, opts, v, xc, tc, c)); t.append(time.perf_counter())
  out["fusions"] = compiled.as_text().count(" fusion(")
np.savez(sys.argv[4], times=np.diff(t), **out)
"""

# The compile of the programs nested in the attack on one CPU device, smallest first (engine internals of
# this checkout): the objective's value and gradient at the c search's rows, the projected L-BFGS loop at
# one c, the attack without the refinement (the whole attack: the stages' process).
_PROGRAMS_SCRIPT = _LOAD + """
import dataclasses
opts, fn = engine.AttackOptions(), static_fn(model.apply)
xc, tc = engine._check_inputs(model.apply, v, x, target, opts)
share, c = -(-len(xc) // engine._num_workers(opts, len(xc))), jnp.asarray(np.float32(opts.c_grid))
rows = engine._num_slots(opts, share)
z0, lb, c1 = jnp.asarray(xc[:rows].reshape(rows, -1)), jnp.asarray(tc[:rows]), jnp.ones((rows,), jnp.float32)

def value_and_grad(params, z, label, cc):
  f = engine._objective(model.apply, opts, params, xc.shape[1:])
  return jax.vmap(jax.value_and_grad(f, has_aux=True))(z, z, label, cc)

def solver_loop(params, z, label, cc):
  rs, args = engine._row_solver(model.apply, opts, params, xc.shape[1:]), (z, label, cc)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: rs.step(s, args), rs.init(z, args)).z

lowered = [jax.jit(value_and_grad).lower(v, z0, lb, c1), jax.jit(solver_loop).lower(v, z0, lb, c1),
           engine._program.lower(fn, dataclasses.replace(opts, refine=False), v, jnp.asarray(xc[:share]),
                                 jnp.asarray(tc[:share]), c)]
seconds, fusions = [], []
for low in lowered:
  t0 = time.perf_counter(); compiled = low.compile(); seconds.append(time.perf_counter() - t0)
  fusions.append(compiled.as_text().count(" fusion("))
np.savez(sys.argv[4], seconds=seconds, fusions=fusions)
"""
PROGRAMS = ("value_and_grad", "solver_loop", "refine=False", "attack")   # the last: the stages' compile


@contextlib.contextmanager
def _subprocess(tree: str, script: str, model_name: str, variables, x, target, arg: str,
                env: Dict[str, str]):
  """Starts ``script`` (argv: inputs, model name, weights, output .npz, ``arg``) with the package of checkout
  ``tree`` in a fresh Python process on the given inputs and weights (stdin and stdout piped, text); yields
  (process, results): once the block ends, stdin is closed, the process awaited and ``results`` (a dict)
  holds the .npz the script wrote."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(tree, "intriguing_jax")):
    raise ValueError(f"reference: {tree!r} is not a checkout of intriguing_jax")
  with tempfile.TemporaryDirectory() as tmp:
    inp, weights, out = (os.path.join(tmp, f) for f in ("in.npz", "weights.msgpack", "out.npz"))
    np.savez(inp, x=np.asarray(x), target=np.asarray(target))
    with open(weights, "wb") as f:
      f.write(serialization.to_bytes(variables))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), **env)
    results = {}
    with subprocess.Popen([sys.executable, "-c", script, inp, model_name, weights, out, arg], env=env,
                          cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
      try:
        yield proc, results
      finally:
        proc.stdin.close()
        proc.stdout.read()
        if proc.wait() != 0:
          raise RuntimeError(f"benchmark subprocess ({tree}) failed with exit status {proc.returncode}")
    with np.load(out) as r:
      results.update({k: r[k] for k in r.files})


def _in_subprocess(tree: str, script: str, model_name: str, variables, x, target, arg: str,
                   env: Dict[str, str]) -> Dict[str, Any]:
  """Runs ``script`` to its end (see :func:`_subprocess`); returns the .npz it wrote."""
  with _subprocess(tree, script, model_name, variables, x, target, arg, env) as (proc, results):
    proc.stdin.close()   # no input: the script runs to its end
  return results


def _reply(proc, word: str) -> str:
  """The next stdout line of ``proc`` that starts with ``word`` (other output is skipped)."""
  for line in proc.stdout:
    if line.startswith(word):
      return line[len(word):].strip()
  raise RuntimeError(f"benchmark subprocess ended before it said {word!r}")


def reference_attack(tree: str, model_name: str, variables, x, target, repeats: int,
                     here: Callable[[], Any] = None) -> Dict[str, Any]:
  """``lbfgs_attack`` at ITS defaults from another checkout ``tree`` of this repository (e.g. a git worktree
  of an older commit), in a subprocess on the same inputs and weights: distortion, success, time_first,
  times_warm [repeats]. With ``here`` (a call of this checkout's attack), each of the reference's warm
  calls follows one timed call of ``here`` (``times_here`` [repeats]): the pairs share the machine's state,
  so their ratios hold on a machine whose speed drifts."""
  times, times_here = [], []
  with _subprocess(tree, _REFERENCE_SCRIPT, model_name, variables, x, target, "", {}) as (proc, r):
    _reply(proc, "ready")
    for _ in range(repeats):
      if here is not None:
        times_here.append(timed(here)[1])
      proc.stdin.write("run\n")
      proc.stdin.flush()
      times.append(float(_reply(proc, "seconds")))
  r.update(times_warm=np.asarray(times), time_first=float(r["time_first"]))
  if here is not None:
    r["times_here"] = np.asarray(times_here)
  return r


def first_call(tree: str, model_name: str, variables, x, target, programs: bool = False) -> Dict[str, Any]:
  """The first call of ``lbfgs_attack`` (checkout ``tree``, its defaults) in a fresh process with the
  persistent compilation cache off: ``time_s`` of the call; (a second fresh process) its stages check /
  trace / lower / compile / run and the compiled program's fusion kernels; ``time_cached_s``, the first
  call of a third fresh process whose persistent cache holds the program (filled by a fourth before).
  With ``programs`` (``tree`` must be this checkout: engine internals), ``programs``: name -> (compile
  seconds, fusion kernels) of the programs nested in the attack (``PROGRAMS``: one more fresh process
  compiles all but the last, the attack itself, whose figures are the stages')."""
  run = lambda script, arg, env: _in_subprocess(tree, script, model_name, variables, x, target, arg, env)
  cold = {"JAX_COMPILATION_CACHE_DIR": ""}
  call, parts = run(_FIRST_CALL_SCRIPT, "call", cold), run(_FIRST_CALL_SCRIPT, "stages", cold)
  with tempfile.TemporaryDirectory() as cache:
    warm = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cached = [run(_FIRST_CALL_SCRIPT, "call", warm) for _ in range(2)][-1]
  stages = dict(zip(("check", "trace", "lower", "compile", "run"), map(float, parts["times"])))
  out = dict(time_s=float(call["times"][0]), stages_s=stages, fusions=int(parts["fusions"]),
             time_cached_s=float(cached["times"][0]))
  if programs:
    p = run(_PROGRAMS_SCRIPT, "", cold)
    out["programs"] = {k: (float(s), int(f)) for k, s, f in zip(PROGRAMS, p["seconds"], p["fusions"])}
    out["programs"][PROGRAMS[-1]] = (stages["compile"], out["fusions"])
  return out


def _part_first_call(config, opts, model_fn, x, y) -> Dict[str, Any]:
  """Cold first calls (no compilation cache, fresh processes) of this checkout and of ``reference``, in
  ``first_call_rounds`` rounds (each round measures every checkout once); per checkout the rounds and the
  median of each figure."""
  del opts  # each checkout at its own defaults
  model, variables, x, target = _compare_inputs(config, model_fn, x, y, config.num_compare)
  trees = {"this checkout": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
  if config.reference:
    trees["reference"] = config.reference
  rounds = in_rounds({name: functools.partial(first_call, tree, "fc100-100-10", variables, x, target,
                                              programs=name == "this checkout")
                      for name, tree in trees.items()}, config.first_call_rounds)
  figures = {}
  for name, runs in rounds.items():
    for r, f in enumerate(runs):
      stages = ", ".join(f"{k} {v:.3f}" for k, v in f["stages_s"].items())
      print(f"[first_call] round {r + 1}, {name} ({trees[name]}), FC100-100-10, {len(x)} images, defaults, "
            f"no compilation cache: first call {f['time_s']:.2f} s; stages (s): {stages}; {f['fusions']} "
            f"fusion kernels; from the persistent compilation cache: {f['time_cached_s']:.2f} s")
    med = lambda get: float(np.median([get(f) for f in runs]))
    figures[name] = dict(rounds=runs, fusions=runs[0]["fusions"], time_s=med(lambda f: f["time_s"]),
                         time_cached_s=med(lambda f: f["time_cached_s"]),
                         stages_s={k: med(lambda f, k=k: f["stages_s"][k]) for k in runs[0]["stages_s"]})
    g = figures[name]
    print(f"[first_call] {name}, median of {len(runs)}: first call {g['time_s']:.2f} s (range "
          f"{min(f['time_s'] for f in runs):.2f}..{max(f['time_s'] for f in runs):.2f}), compile "
          f"{g['stages_s']['compile']:.2f} s, from the persistent cache {g['time_cached_s']:.2f} s")
    if "programs" in runs[0]:   # compile seconds (median) and kernels of the programs nested in the attack
      g["programs"] = {k: (med(lambda f, k=k: f["programs"][k][0]), kernels)
                       for k, (_, kernels) in runs[0]["programs"].items()}
      print(f"[first_call] {name}, compile of the nested programs, median of {len(runs)}: " + "; ".join(
          f"{k} {s:.2f} s ({kernels} kernels)" for k, (s, kernels) in g["programs"].items()))
  return figures


def run(config, workdir: str, data_dir=None) -> Dict[str, Any]:
  """Runs ``config.parts`` (the config validated before any data is read); returns the figures."""
  opts = AttackOptions(**config.attack)
  for name, overrides in config.budgets.items():
    try:
      dataclasses.replace(opts, **overrides)
    except (TypeError, ValueError) as e:
      raise ValueError(f"bench_attack config: budget {name!r}: {e}") from e
  if not config.batches or min(config.batches) < 1:
    raise ValueError(f"bench_attack config: batches must be sizes >= 1, got {config.batches}")
  bad = [p for p in config.parts if p not in PARTS]
  if bad or min(config.num_convex, config.num_compare, config.repeats, config.first_call_rounds) < 1:
    raise ValueError(f"bench_attack config: parts must be among {PARTS} (got {bad}); num_convex, "
                     f"num_compare, repeats and first_call_rounds must be >= 1")
  x_train, y_train = data.load_mnist("train", data_dir)
  x_test, y_test = data.load_mnist("test", data_dir)
  n = config.train_examples or len(x_train)

  def model_fn(name):
    return train.get_or_train(name, x_train[:n], y_train[:n], workdir=workdir, epochs=config.epochs or None,
                              run_name=None if n == len(x_train) else f"{name}-n{n}")

  parts = {"convex": _part_convex, "compare": _part_compare, "budgets": _part_budgets, "batch": _part_batch,
           "first_call": _part_first_call}
  figures = {"devices": [str(d) for d in jax.devices()]}
  for part in config.parts:
    figures[part] = parts[part](config, opts, model_fn, x_test, y_test)
  return figures
