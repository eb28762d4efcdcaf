"""Comparison perturbations of Tables 2 and 4 and the random targets of paper.md A5.

Usage::

    from intriguing_jax import attack
    noisy = attack.gaussian_noise(key, x, 0.1)                    # unclipped by default (A10)
    magnified = attack.scale_perturbation(x, x_adv, 0.1)          # per-example RMS 0.1 (A11)
    targets = attack.random_targets(key, labels)                  # uniform over the wrong labels
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp

from intriguing_jax.types import Array, PRNGKey


def random_targets(key: PRNGKey, labels: Array, num_classes: int = 10) -> Array:
  """One target per example drawn uniformly from the ``num_classes - 1`` wrong labels (paper.md A5).

  Args:
    key: PRNG key.
    labels: [B] integer labels in [0, num_classes) (range checked unless traced).
    num_classes: K >= 2.

  Returns:
    [B] int32 targets, targets != labels.
  """
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers in [0, {num_classes}), got dtype {labels.dtype}")
  if not isinstance(labels, jax.core.Tracer) and labels.size and (
      int(labels.min()) < 0 or int(labels.max()) >= num_classes):
    raise ValueError(f"labels must be in [0, {num_classes}), got min {int(labels.min())}, "
                     f"max {int(labels.max())}")
  labels = labels.astype(jnp.int32)
  shift = jax.random.randint(key, labels.shape, 1, num_classes, dtype=jnp.int32)
  return (labels + shift) % num_classes


def _check_stddev(stddev: float) -> None:
  if not (math.isfinite(stddev) and stddev >= 0):
    raise ValueError(f"stddev must be finite and >= 0, got {stddev}")


def gaussian_noise(key: PRNGKey, x: Array, stddev: float, *, clip: bool = False,
                   box: Tuple[float, float] = (0.0, 1.0)) -> Array:
  """[B, ...] x + N(0, stddev^2 I), x's dtype (paper.md A10: unclipped by default, so the RMS distortion is
  ~stddev; ``clip`` clips into ``box``)."""
  x = jnp.asarray(x)
  _check_stddev(stddev)
  out = x + stddev * jax.random.normal(key, x.shape, x.dtype)
  return jnp.clip(out, *box) if clip else out


def scale_perturbation(x: Array, x_adv: Array, stddev: float, *, clip: bool = False,
                       box: Tuple[float, float] = (0.0, 1.0)) -> Array:
  """x + stddev * (x_adv - x) / RMS(x_adv - x): the perturbation rescaled to a per-example RMS ``stddev``.

  Table 4's "amplified to stddev=0.1" rows (paper.md A11). x, x_adv: [B, ...]; examples with x_adv == x
  are returned as x; ``clip`` clips into ``box`` (then the RMS can fall below ``stddev``).
  """
  _check_stddev(stddev)
  x, x_adv = jnp.asarray(x), jnp.asarray(x_adv)
  if x.shape != x_adv.shape:
    raise ValueError(f"x {x.shape} and x_adv {x_adv.shape} must have the same shape")
  r = x_adv - x
  rms = jnp.sqrt(jnp.mean(r.reshape(r.shape[0], -1) ** 2, axis=1))
  scale = jnp.where(rms > 0, stddev / jnp.where(rms > 0, rms, 1.0), 0.0)
  out = x + scale.reshape((-1,) + (1,) * (x.ndim - 1)) * r
  return jnp.clip(out, *box) if clip else out
