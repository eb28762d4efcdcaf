"""Metrics of the paper: error rates and the RMS ("stddev") distortion.

Usage::

    import functools
    from intriguing_jax import metrics
    logits_fn = functools.partial(model.apply, params)
    err = metrics.error_rate(logits_fn, images, labels)           # fraction in [0, 1]
    d = metrics.rms_distortion(images, adversarial_images)         # (N,) per example

Evaluation streams over the data in fixed-size batches (the last one padded), so one compiled program
serves any dataset size; each batch is sharded over all devices (``distributed.stream_map``: a 1-D
``jax.sharding`` mesh, batch size rounded up to a multiple of the device count; multi-host: every
process passes the full data, feeds its own rows and receives all predictions).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import distributed
from intriguing_jax import precision as precision_lib
from intriguing_jax.types import Array, LogitsFn


def rms_distortion(x: Array, x_adv: Array) -> Array:
  """Per-example RMS pixel change sqrt(mean((x_adv - x)^2)), the paper's distortion (paper.md §4.2, A8).

  Args:
    x, x_adv: [batch, ...] arrays of the same shape.

  Returns:
    [batch] distortions.
  """
  x = jnp.asarray(x)
  x_adv = jnp.asarray(x_adv)
  if x.shape != x_adv.shape:
    raise ValueError(f"rms_distortion: shapes differ, x {x.shape} vs x_adv {x_adv.shape}")
  diff = (x_adv - x).reshape(x.shape[0], -1)
  return jnp.sqrt(jnp.mean(diff * diff, axis=1))


@functools.lru_cache(maxsize=64)
def _argmax_fn(logits_fn: Callable, precision: Optional[str]) -> Callable:
  def argmax(xb):
    with precision_lib.scope(precision):
      return jnp.argmax(logits_fn(xb), axis=-1).astype(jnp.int32)
  return argmax


def predict(logits_fn: LogitsFn, x: Array, *, batch_size: int = 1000,
            precision: Optional[str] = "highest") -> np.ndarray:
  """Predicted labels argmax(logits_fn(x)) for a dataset of any size, batched, jitted, sharded over devices.

  ``logits_fn`` should be a stable object (e.g. one ``functools.partial(model.apply, params)`` reused
  across calls) so the compiled program is reused. ``batch_size`` is rounded up to a multiple of the
  number of devices. ``precision``: the matmul precision of the evaluation (``intriguing_jax.precision``);
  "highest" (float32) by default, so that an adversarial example the attack verified at float32 is
  classified the same way on a GPU (TF32) or TPU; None keeps the ambient setting.

  Returns:
    [N] int32 numpy array.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  precision_lib.validate(precision)
  x = np.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"predict: x must be [N, ...], got shape {x.shape}")
  n = x.shape[0]
  if n == 0:
    return np.zeros((0,), np.int32)
  return distributed.stream_map(_argmax_fn(logits_fn, precision), x, chunk_size=min(batch_size, n),
                                name="predict")


def error_rate(logits_fn: LogitsFn, x: Array, labels: Array, *, batch_size: int = 1000,
               precision: Optional[str] = "highest") -> float:
  """Fraction of examples whose predicted label differs from ``labels`` (paper.md A9: plain error rate).

  ``precision``: as in :func:`predict`.
  """
  labels = np.asarray(labels)
  if labels.shape != (np.shape(x)[0],):
    raise ValueError(f"error_rate: labels shape {labels.shape} does not match {np.shape(x)[0]} examples")
  if labels.shape[0] == 0:
    raise ValueError("error_rate: empty dataset")
  pred = predict(logits_fn, x, batch_size=batch_size, precision=precision)
  return float(np.mean(pred != labels))
