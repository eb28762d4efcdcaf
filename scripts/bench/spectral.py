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
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from intriguing_jax import configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import progress  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "bench_spectral.py"),
    "Benchmark config (intriguing_jax/configs/bench_spectral.py[:lanczos]).")


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


def main(argv):
  del argv
  c = _CONFIG.value
  jax.config.update("jax_enable_x64", c.dtype == "float64")
  rng = np.random.default_rng(c.seed)
  print(f"devices: {jax.devices()}  method: {c.method}  padding: {c.padding}  "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
  totals = np.zeros(3)  # wall, cpu, first call
  for spec in spectral.TABLE5:
    fn = _layer_fn(spec, c, rng)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(c.repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      r = fn()
      runs.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(w for w, _ in runs), min(p for _, p in runs)
    totals += (wall, cpu, first)
    detail = (f"value {r.value:.5f}  interval [{r.lower:.5f}, {r.upper:.5f}]  "
              f"paper-formula(Δ⁻²) {r.paper_formula:.5f}" if isinstance(r, spectral.OperatorNorm)
              else f"sigma_max {r:.5f}")
    print(f"{spec['layer']:8s} {detail:70s} wall {wall:7.3f} s  cpu {cpu:7.3f} s  "
          f"(first call {first:7.3f} s)", flush=True)
  print(f"TOTAL wall {totals[0]:.3f} s, process CPU {totals[1]:.3f} s for 8 layers (first calls incl. "
        f"compile: {totals[2]:.3f} s wall); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main, flags_parser=progress.parse_flags)
