r"""Benchmark of the eight AlexNet Table 5 layer norms (``scripts/bench/spectral.py``).

Fields: ``method`` (conv norms: fft, lanczos); ``padding`` (CIRCULAR: the paper's periodic setting;
SAME: zero padding as the model runs it); ``num_steps`` (Lanczos steps); ``tol`` (dense block
Lanczos early stop, relative Ritz residual; 0 runs every block); ``repeats`` (timed runs per layer after
the compile run); ``seed`` (random kernels); ``dtype`` (float32 or float64).
"""

import ml_collections


def get_config(arg=None):
  """The benchmark config (``arg`` "lanczos": exact zero-padded norms, matrix-free)."""
  c = ml_collections.ConfigDict(dict(method="fft", padding="CIRCULAR", num_steps=100, tol=1e-3, repeats=2,
                                     seed=0, dtype="float32"))
  if arg == "lanczos":
    c.method, c.padding = "lanczos", "SAME"
  elif arg is not None:
    raise ValueError(f"bench_spectral config: unknown preset {arg!r} (lanczos)")
  return c
