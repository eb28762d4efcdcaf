r"""Benchmark: exact operator norms of the eight AlexNet Table 5 layers at full input size (paper §4.3).

Command (CPU; the goal is < 10 s in total for the FFT method on 2 cores, compile time reported apart;
measured 9.47 s wall / 10.4 s process CPU at load average 2.4-2.7, 16:58 UTC, notes/spectral.md):

  OPENBLAS_NUM_THREADS=1 python -m scripts.bench_spectral
  python -m scripts.bench_spectral --method=lanczos --padding=SAME    # exact zero-padded, matrix-free

Random He-scaled kernels N(0, 1/(k·k·C_in)) (seed --seed) with the Table 5 shapes; conv inputs N = 224
(stride 4), 27, 13, 13, 13 (paper.md §9 A19); dense layers by block Lanczos (≤ 24 blocks of 16, stopped
once the top Ritz pair's relative residual is ≤ --tol; jitted). Each layer is
run once to compile, then timed over --repeats runs (the minimum is printed). Prints one line per layer
(wall time and process CPU time, which tells how much of the wall time was waiting for a shared CPU)
and the total. OpenBLAS threads are limited to 1 before JAX loads: batched LAPACK calls (the per-frequency
SVDs) are 30-50× slower when OpenBLAS threads spin against other processes on a shared 2-core machine.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

_METHOD = flags.DEFINE_enum("method", "fft", ["fft", "power", "lanczos"], "Conv norm method.")
_PADDING = flags.DEFINE_enum("padding", "CIRCULAR", ["CIRCULAR", "SAME"],
                             "CIRCULAR: the paper's periodic setting; SAME: zero padding as the model runs it.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Iterations for power/lanczos.", lower_bound=1)
_TOL = flags.DEFINE_float("tol", 1e-3, "Dense block Lanczos early stop: relative Ritz residual (0: all blocks).",
                          lower_bound=0.0, upper_bound=0.999)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per layer after the compile run.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random kernels.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Kernel dtype.")


def main(argv):
  del argv
  if _DTYPE.value == "float64":
    jax.config.update("jax_enable_x64", True)
  rng = np.random.default_rng(_SEED.value)
  print(f"devices: {jax.devices()}  cpu_count: {os.cpu_count()}  method: {_METHOD.value}  "
        f"padding: {_PADDING.value}  OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
  total = total_compile = total_cpu = 0.0
  for spec in spectral.TABLE5:
    if spec["type"] == "conv":
      k, c = spec["k"], spec["c_in"]
      kernel = (rng.standard_normal((k, k, c, spec["c_out"])) / np.sqrt(k * k * c)).astype(_DTYPE.value)
      padding = "CIRCULAR" if _PADDING.value == "CIRCULAR" else ((spec["pad"],) * 2,) * 2
      fn = lambda kernel=kernel, spec=spec, padding=padding: spectral.conv_operator_norm(
          kernel, input_shape=(spec["n"], spec["n"], spec["c_in"]), strides=spec["stride"], padding=padding,
          method=_METHOD.value, num_steps=_NUM_STEPS.value)
    else:
      w = (rng.standard_normal((spec["c_in"], spec["c_out"])) / np.sqrt(spec["c_in"])).astype(_DTYPE.value)
      w = jax.device_put(w)
      fn = lambda w=w: spectral.dense_operator_norm(w, method="lanczos", tol=_TOL.value)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(_REPEATS.value):
      t0, c0 = time.perf_counter(), time.process_time()
      r = fn()
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    best = min(times)
    total_cpu += min(cpu)
    total += best
    total_compile += first
    if isinstance(r, spectral.OperatorNorm):
      detail = (f"value {r.value:.5f}  interval [{r.lower:.5f}, {r.upper:.5f}]  paper-formula(Δ⁻²) "
                f"{r.paper_formula:.5f}")
    else:
      detail = f"sigma_max {r:.5f}"
    print(f"{spec['layer']:8s} {detail:70s} wall {best:7.3f} s  cpu {min(cpu):7.3f} s  "
          f"(first call incl. compile {first:7.3f} s)",
          flush=True)
  print(f"TOTAL wall {total:.3f} s, process CPU {total_cpu:.3f} s for 8 layers (first calls incl. compile: "
        f"{total_compile:.3f} s wall); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
