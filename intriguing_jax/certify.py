"""Certified L2 radii from Lipschitz bounds: the lower end of the bracket the attack closes from above.

Usage::

    from intriguing_jax import certify
    lip = certify.lipschitz_matrix(model, variables, (28, 28, 1))   # [K, K] bounds of z_i - z_j
    cert = certify.certify(model.apply, variables, x, lip, target=targets)
    cert.radius            # [B] no L2 perturbation smaller than this changes the prediction
    cert.radius_to_target  # [B] no L2 perturbation smaller than this makes the model predict `target`
    certify.certified_accuracy(cert, labels, 0.3)

Maths (paper §4.3; ``shared/spectral.md``). For logits ``z(x)`` and the predicted class ``i``, the class
changes to ``j`` only where ``z_j >= z_i``. If ``L_ij`` bounds the Lipschitz constant of ``z_i - z_j`` (L2
input norm), then ``|(z_i - z_j)(x + r) - (z_i - z_j)(x)| <= L_ij ||r||_2``, so::

    radius(x)            = min_{j != i} (z_i(x) - z_j(x)) / L_ij       (any class but i)
    radius_to_target(x)  = (z_i(x) - z_t(x)) / L_it                    (class t; 0 when i == t)

are sound lower bounds on the minimal L2 distortion, untargeted and toward ``t``. The box [0, 1] only
removes perturbations, so they stay sound with it. ``L_ij`` (:func:`lipschitz_matrix`) is the paper's
product of per-layer bounds (``spectral.lipschitz_table``: sigmoid 1/4, max-pool, exact conv/dense norms)
with the last dense layer ``W`` replaced by the exact norm of the row pair, ``||W[:, i] - W[:, j]||_2``:
``L_ij = ||W[:, i] - W[:, j]||_2 * prod(bounds of the layers before W)``, never larger than the global
``sqrt(2) * prod(all bounds)``. For a linear model (FC10) ``z_i - z_j`` is affine, so ``L_ij`` is its exact
gradient norm and, without the box, ``radius`` is the exact minimal L2 distortion (the nearest point of the
other classes lies on the hyperplane ``z_i = z_j`` of the minimising j).

Radii are L2 norms of pixel changes (pixels in [0, 1]); ``rms`` converts them to the paper's RMS
distortion, ``radius / sqrt(D)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import models
from intriguing_jax import precision
from intriguing_jax import spectral
from intriguing_jax import tables
from intriguing_jax import types


class LipschitzMatrix(NamedTuple):
  """Lipschitz bounds of the logit differences of one network (L2 input norm)."""
  pairwise: np.ndarray  # [K, K] L_ij bounding z_i - z_j (diagonal 0)
  prefix: float         # product of the bounds of the layers before the last dense layer
  global_bound: float   # the paper's product of every layer's bound (bounds ||z(x) - z(x')||_2)


class Certificate(NamedTuple):
  """Certified radii of a batch (L2, pixels in [0, 1]): float32 arrays of shape [B]."""
  prediction: Any        # [B] int32 predicted class i
  radius: Any            # [B] min_{j != i} margin_ij / L_ij: no smaller perturbation changes the class
  radius_to_target: Any  # [B] margin_it / L_it toward ``target`` (NaN when no target is given)


def lipschitz_matrix(model: nn.Module, variables: Any, input_shape: Sequence[int]) -> LipschitzMatrix:
  """Pairwise bounds ``L_ij`` of a Flax ``model`` that is a chain of layers ending in a dense layer (see
  the module docstring; ``spectral.lipschitz_table`` checks the chain). ValueError otherwise."""
  rows, summary = spectral.lipschitz_table(model, variables, input_shape)
  if not rows or rows[-1]["type"] != "dense":
    raise ValueError(f"lipschitz_matrix: {type(model).__name__} must end in a dense layer (its logits), "
                     f"its last layer is {rows[-1]['type'] if rows else 'missing'}")
  variables = variables if "params" in variables else {"params": variables}
  path = models.weight_layer_paths(model, variables, input_shape)[-1]
  w = np.asarray(models.get_param(variables, path)["kernel"], np.float64)  # [H, K]
  prefix = float(np.prod([r["upper"] for r in rows[:-1]]))
  diff = w[:, :, None] - w[:, None, :]
  pairwise = prefix * np.sqrt(np.sum(diff * diff, axis=0))
  return LipschitzMatrix(pairwise.astype(np.float32), prefix, float(summary["product_upper"]))


def radii(logits: jax.Array, lipschitz: Any, target: Optional[jax.Array] = None) -> Certificate:
  """Certified radii from ``logits`` [B, K] and the [K, K] ``lipschitz`` bounds (a :class:`LipschitzMatrix`
  or its ``pairwise`` array); ``target`` [B] int or None. Pure jnp: jit- and vmap-able, differentiable in
  the logits and the bounds (a training penalty can use it)."""
  lip = jnp.asarray(lipschitz.pairwise if isinstance(lipschitz, LipschitzMatrix) else lipschitz)
  k = logits.shape[-1]
  if lip.shape != (k, k):
    raise ValueError(f"lipschitz must be [{k}, {k}] for {k} logits, got shape {lip.shape}")
  pred = jnp.argmax(logits, axis=-1)
  top = jnp.take_along_axis(logits, pred[:, None], axis=-1)
  lip_rows = lip[pred]                                                 # [B, K]: L_{i j}
  ratio = (top - logits) / jnp.where(lip_rows > 0, lip_rows, 1.0)
  ratio = jnp.where((jnp.arange(k)[None] == pred[:, None]) | (lip_rows <= 0), jnp.inf, ratio)
  radius = jnp.min(ratio, axis=-1)
  if target is None:
    to_target = jnp.full(radius.shape, jnp.nan, radius.dtype)
  else:
    target = jnp.asarray(target)
    to_target = jnp.where(target == pred, 0.0, jnp.take_along_axis(ratio, target[:, None], axis=-1)[:, 0])
  return Certificate(pred.astype(jnp.int32), radius, to_target)


def certify(apply_fn: Callable, params: Any, x: Any, lipschitz: Any, *, target: Optional[Any] = None,
            batch_size: int = 1000) -> Certificate:
  """:func:`radii` of ``apply_fn(params, x)`` for ``x`` [N, ...] in batches of ``batch_size``; numpy."""
  x = np.asarray(x, np.float32)
  if x.ndim < 2:
    raise ValueError(f"x must be [N, ...] inputs, got shape {x.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if target is not None:
    target = np.asarray(target)
    if target.shape != (x.shape[0],):
      raise ValueError(f"target must have shape ({x.shape[0]},), got {target.shape}")
    if not np.issubdtype(target.dtype, np.integer):
      raise ValueError(f"target must be integer labels, got dtype {target.dtype}")
    k = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)).shape[-1]
    if target.size and (target.min() < 0 or target.max() >= k):
      raise ValueError(f"target out of range [0, {k}): min {target.min()}, max {target.max()}")
  fn = _radii_fn(types.static_fn(apply_fn))
  lip = jnp.asarray(lipschitz.pairwise if isinstance(lipschitz, LipschitzMatrix) else lipschitz)
  parts = []
  for s in range(0, x.shape[0], batch_size):
    t = None if target is None else jnp.asarray(target[s:s + batch_size], jnp.int32)
    parts.append(jax.tree.map(np.asarray, fn(params, jnp.asarray(x[s:s + batch_size]), lip, t)))
  return Certificate(*(np.concatenate(p) for p in zip(*parts)))


@functools.lru_cache(maxsize=64)
def _radii_fn(apply_fn: Callable) -> Callable:
  """Jitted ``(params, x, lip, target) -> radii(apply_fn(params, x), lip, target)``, logits at the highest
  matmul precision; cached per ``types.static_fn(apply_fn)``."""
  def fn(params, x, lip, target):
    with precision.scope("highest"):
      return radii(apply_fn(params, x), lip, target)
  return jax.jit(fn)


def rms(radius: Any, input_size: int) -> np.ndarray:
  """An L2 radius in the paper's RMS units: ``radius / sqrt(input_size)`` (784 for MNIST)."""
  return np.asarray(radius) / math.sqrt(input_size)


def certified_accuracy(cert: Certificate, labels: Any, radius: float) -> float:
  """Fraction of examples classified correctly with a certified L2 radius of at least ``radius``."""
  labels = np.asarray(labels)
  if labels.shape != np.shape(cert.prediction):
    raise ValueError(f"labels must have shape {np.shape(cert.prediction)} (one per certified example), "
                     f"got {labels.shape}")
  return float(np.mean((np.asarray(cert.prediction) == labels) & (np.asarray(cert.radius) >= radius)))


def bracket(models: Mapping[str, tables.Model], adversarial: Mapping[str, tables.AdversarialSet],
            lipschitz: Mapping[str, LipschitzMatrix], *, radii_l2: Sequence[float] = (0.3, 1.0),
            batch_size: int = 1000) -> List[dict]:
  """Per model, the bracket certified radius <= minimal distortion <= the attack's distortion, in RMS.

  ``adversarial[name]``: the model's attacked set; ``lipschitz[name]``: its :func:`lipschitz_matrix`. One
  dict per model: ``model``, ``certified`` (mean untargeted radius), ``certified_to_target`` (mean radius
  toward the attack's targets), ``attack`` (mean attack distortion, all examples), ``ratio``
  (``certified_to_target / attack``), ``violations`` (examples whose radius to the target exceeds the
  attack's distortion: a successful attack there would contradict the bound), ``global_bound``,
  ``pair_bound`` (the largest ``L_ij``), and ``certified_accuracy_<r>`` for each L2 radius of ``radii_l2``.
  """
  rows = []
  for name, m in models.items():
    a, lip = adversarial[name], lipschitz[name]
    size = int(np.prod(a.x.shape[1:]))
    cert = certify(m.apply_fn, m.params, a.x, lip, target=a.targets, batch_size=batch_size)
    to_target = rms(cert.radius_to_target, size)
    # float32 logits: 1e-6 relative slack on the bound; attacked examples only where the attack succeeded.
    over = (to_target > a.distortion * (1 + 1e-6) + 1e-7) & a.success
    rows.append({"model": name, "certified": float(np.mean(rms(cert.radius, size))),
                 "certified_to_target": float(np.mean(to_target)), "attack": float(np.mean(a.distortion)),
                 "ratio": float(np.mean(to_target) / np.mean(a.distortion)), "violations": int(np.sum(over)),
                 "global_bound": lip.global_bound, "pair_bound": float(np.max(lip.pairwise)),
                 **{f"certified_accuracy_{r:g}": certified_accuracy(cert, a.labels, r) for r in radii_l2}})
  return rows
