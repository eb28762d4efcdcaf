"""Matmul precision for the computations whose results must not depend on the backend.

On GPUs (TF32) and TPUs (bfloat16 passes) JAX computes float32 matmuls in reduced precision by default.
Its ~1e-3 relative logit error is as large as the attack's success margin, so the attack and the
evaluation of adversarial examples trace their programs under float32 matmuls ("highest"), as a CPU
always computes them. ``None`` keeps the ambient ``jax_default_matmul_precision`` setting.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import jax

# Values of ``jax.default_matmul_precision`` accepted where a ``precision`` argument is taken.
PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "default", "bfloat16")


def validate(precision: Optional[str]) -> None:
  if precision is not None and precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")


def scope(precision: Optional[str]):
  """Context manager: trace under ``jax.default_matmul_precision(precision)``; no-op for None."""
  validate(precision)
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
