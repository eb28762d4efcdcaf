r"""Benchmark: exact operator norms of the eight AlexNet Table 5 layers at full input size (paper §4.3).

Commands (CPU; the FFT method takes ~10 s in total on 2 cores, compile time reported apart;
notes/spectral.md)::

    python scripts/bench/spectral.py
    python scripts/bench/spectral.py --config=intriguing_jax/configs/bench_spectral.py:lanczos  # zero-padded

Random He-scaled kernels N(0, 1/(k·k·C_in)) with the Table 5 shapes; conv inputs N = 224 (stride 4), 27,
13, 13, 13 (paper.md §9 A19); dense layers by block Lanczos. Each layer runs once to compile, then
``repeats`` times; prints per layer the minimum wall and process CPU time (CPU < wall means waiting for a
shared CPU) and the total. OpenBLAS is limited to 1 thread before JAX loads: the batched per-frequency
SVDs are 30-50x slower when OpenBLAS threads spin against other processes on a shared 2-core machine.
With ``--workdir`` the rows also go to ``<workdir>/bench_spectral.json``.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from intriguing_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = cli.define_flags("bench_spectral", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_spectral.json.")


def _layer_fn(spec, c, rng):
  """A call computing the norm of one Table 5 layer with a fresh random kernel."""
  if spec["type"] == "dense":
    w = rng.standard_normal((spec["c_in"], spec["c_out"])) / np.sqrt(spec["c_in"])
    w = jax.device_put(w.astype(c.dtype))
    return lambda: spectral.dense_operator_norm(w, method="lanczos", tol=c.tol)
  k, c_in = spec["k"], spec["c_in"]
  kernel = (rng.standard_normal((k, k, c_in, spec["c_out"])) / np.sqrt(k * k * c_in)).astype(c.dtype)
  padding = "CIRCULAR" if c.padding == "CIRCULAR" else ((spec["pad"],) * 2,) * 2
  return lambda: spectral.conv_operator_norm(kernel, input_shape=(spec["n"], spec["n"], c_in),
                                             strides=spec["stride"], padding=padding, method=c.method,
                                             num_steps=c.num_steps)


def _time(fn, repeats):
  """(first call s, min wall s, min process CPU s, last result) of ``repeats`` timed calls after the first."""
  t0 = time.perf_counter()
  fn()
  first, runs = time.perf_counter() - t0, []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    runs.append((time.perf_counter() - t0, time.process_time() - c0))
  return first, min(w for w, _ in runs), min(p for _, p in runs), r


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  jax.config.update("jax_enable_x64", c.dtype == "float64")
  rng = np.random.default_rng(c.seed)
  print(f"devices: {jax.devices()}  method: {c.method}  padding: {c.padding}  "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
  rows = []
  for spec in spectral.TABLE5:
    first, wall, cpu, r = _time(_layer_fn(spec, c, rng), c.repeats)
    norm = r._asdict() if isinstance(r, spectral.OperatorNorm) else {"sigma_max": float(r)}
    rows.append(dict(layer=spec["layer"], wall_s=wall, cpu_s=cpu, first_call_s=first, **norm))
    detail = (f"value {r.value:.5f}  interval [{r.lower:.5f}, {r.upper:.5f}]  "
              f"paper-formula(Δ⁻²) {r.paper_formula:.5f}" if "value" in norm else f"sigma_max {r:.5f}")
    print(f"{spec['layer']:8s} {detail:70s} wall {wall:7.3f} s  cpu {cpu:7.3f} s  "
          f"(first call {first:7.3f} s)", flush=True)
  total = {k: sum(row[k] for row in rows) for k in ("wall_s", "cpu_s", "first_call_s")}
  print(f"TOTAL wall {total['wall_s']:.3f} s, process CPU {total['cpu_s']:.3f} s for 8 layers (first calls "
        f"incl. compile: {total['first_call_s']:.3f} s wall); load average {os.getloadavg()[0]:.1f}")
  cli.write_figures(FLAGS.workdir.value, "bench_spectral", dict(rows=rows, total=total), c)


if __name__ == "__main__":
  cli.run(main)
