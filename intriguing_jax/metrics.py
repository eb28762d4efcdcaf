"""Metrics of the paper: error rates and the RMS ("stddev") distortion.

Usage::

    from intriguing_jax import metrics
    err = metrics.error_rate(model.apply, variables, images, labels)     # fraction in [0, 1]
    pred = metrics.predict(model.apply, variables, images)               # [N] int32
    d = metrics.rms_distortion(images, adversarial_images)               # [N]

Evaluation streams over the data in fixed-size batches (``distributed.stream_map``: the last batch padded,
each batch sharded over all devices, multi-host: every process passes the full data and receives all
predictions), so one compiled program serves any dataset size. ``params`` is a traced argument: every model
of one architecture shares the program. Progress lines are logged at ``--v=1``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import distributed
from intriguing_jax import precision as precision_lib
from intriguing_jax.types import ApplyFn, Array, Params, static_fn


def rms_distortion(x: Array, x_adv: Array) -> Array:
  """Per-example RMS pixel change sqrt(mean((x_adv - x)^2)), the paper's distortion (paper.md §4.2, A8).

  Args:
    x, x_adv: [batch, ...] arrays of the same shape; integer images (e.g. uint8) are taken as their values.

  Returns:
    [batch] distortions, in float32 or the inputs' wider float type.
  """
  dtype = jnp.promote_types(jnp.result_type(x, x_adv), jnp.float32)
  x = jnp.asarray(x, dtype)
  x_adv = jnp.asarray(x_adv, dtype)
  if x.shape != x_adv.shape:
    raise ValueError(f"rms_distortion: shapes differ, x {x.shape} vs x_adv {x_adv.shape}")
  diff = (x_adv - x).reshape(x.shape[0], -1)
  return jnp.sqrt(jnp.mean(diff * diff, axis=1))


def argmax_fn(apply_fn: ApplyFn, precision: Optional[str] = "highest") -> Callable:
  """``f(params, x) -> argmax(apply_fn(params, x), -1)`` (int32), traced under matmul ``precision``.

  Cached per (apply_fn, precision) -- equal Flax modules' ``apply`` count as one (``types.static_fn``) --, so
  the same function object, hence compiled program, is reused.
  """
  return _argmax_fn(static_fn(apply_fn), precision)


@functools.lru_cache(maxsize=64)
def _argmax_fn(apply_fn: ApplyFn, precision: Optional[str]) -> Callable:
  def argmax(params, xb):
    with precision_lib.scope(precision):
      return jnp.argmax(apply_fn(params, xb), axis=-1).astype(jnp.int32)
  return argmax


def predict(apply_fn: ApplyFn, params: Params, x: Array, *, batch_size: int = 1000,
            precision: Optional[str] = "highest") -> np.ndarray:
  """Predicted labels ``argmax(apply_fn(params, x))`` for a dataset of any size.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits [B, K]`` (a Flax ``model.apply``); hashable and reused
      across calls, so its compiled program is.
    params: the model's parameters (Flax: the whole variables dict); traced.
    x: [N, ...] inputs.
    batch_size: examples per compiled batch (rounded up to a multiple of the device count).
    precision: matmul precision of the evaluation (:mod:`intriguing_jax.precision`); "highest" (float32) so
      an adversarial example the attack verified at float32 is classified the same way on a GPU (TF32) or
      TPU; None keeps the ambient setting.

  Returns:
    [N] int32 numpy array.
  """
  if batch_size < 1:
    raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
  precision_lib.validate(precision)
  x = np.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"predict: x must be [N, ...], got shape {x.shape}")
  if x.shape[0] == 0:
    return np.zeros((0,), np.int32)
  return distributed.stream_map(argmax_fn(apply_fn, precision), x, broadcast=(params,),
                                chunk_size=min(batch_size, x.shape[0]), name="predict")


def error_rate(apply_fn: ApplyFn, params: Params, x: Array, labels: Array, *, batch_size: int = 1000,
               precision: Optional[str] = "highest") -> float:
  """Fraction of examples whose predicted label differs from ``labels`` (paper.md A9: plain error rate).

  ``labels``: [N] integers. Other arguments as in :func:`predict`.
  """
  labels = np.asarray(labels)
  if labels.shape != (np.shape(x)[0],):
    raise ValueError(f"error_rate: labels shape {labels.shape} does not match {np.shape(x)[0]} examples")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"error_rate: labels must be integers, got dtype {labels.dtype}")
  if labels.shape[0] == 0:
    raise ValueError("error_rate: empty dataset")
  pred = predict(apply_fn, params, x, batch_size=batch_size, precision=precision)
  return float(np.mean(pred != labels))
