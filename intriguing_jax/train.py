"""Training: cross-entropy + per-layer weight decay, vmapped hyper-parameter sweeps, resumable runs.

Usage::

    from intriguing_jax import data, models, train

    images, labels = data.load_mnist("train")
    # The paper's models with their default recipes (restored when already trained in the workdir):
    model, variables = train.get_or_train("fc100-100-10", images, labels, workdir="runs/models")
    model, variables = train.get_or_train("fc100-100-10", x1, y1, workdir="runs/models",
                                          run_name="fc100-100-10_p1")          # Table 3, P1 model

    # One run with explicit settings (resumes from workdir/ckpt when interrupted):
    config = train.TrainConfig(epochs=30, weight_decay=(1e-5, 1e-5, 1e-6))
    result = train.train_model(models.get_model("fc100-100-10"), images, labels, config, workdir=w)
    result.variables                                    # {"params": ...}, for model.apply

    # Three FC10 models differing only in λ, as ONE compiled program (params stacked on axis 0):
    sweep = train.train_sweep(models.get_model("fc10"), images, labels, config,
                              weight_decays=[1e-4, 1e-2, 1.0], seeds=[0])
    sweep.variables[2]                                  # ordinary variables of the λ=1 model
    # The k members are sharded over all devices (k padded to a multiple of the device count with copies of
    # member 0, dropped on return; the training data replicated). mesh=distributed.data_mesh(devs) picks devices.

Loss (default): ``mean_i CE(x_i, y_i) + Σ_layers ½ λ_layer Σ w²`` over dense/conv kernels, λ listed
input -> output, biases not decayed (``decay_form="half_sum"``). Of the conventions tried on FC10 this is
the one that reproduces Table 1 (FC10(1e-4) 6.75% / 7.42%, FC10(1e-2) 9.87% / 9.29%, FC10(1) 23.0% /
21.7%; paper 6.7/7.4, 10/9.4, 21.2/20); the alternatives stay available as ``TrainConfig`` options:
``decay_form="per_unit"`` (λΣw²/k, k = the layer's output units, paper.md A12), ``"sum"`` (λΣw²),
``data_term="sum"`` (summed data term), ``decay_bias=True``. Evidence in notes/models.md.

Each epoch is one jitted ``lax.scan`` over its mini-batches (the data stays on the device; the order is
``jax.random.permutation(fold_in(data_key, epoch))``, the dropout key of a step is
``fold_in(state.rng, state.step)``), so a run resumed from an epoch checkpoint repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from intriguing_jax import checkpoint
from intriguing_jax import distributed
from intriguing_jax import metrics
from intriguing_jax import models as models_lib
from intriguing_jax import precision as precision_lib
from intriguing_jax import progress
from intriguing_jax.types import Array, Params, PRNGKey

__all__ = [
    "TrainConfig", "TrainState", "TrainResult", "SweepResult", "train_model", "train_sweep", "get_or_train",
    "RECIPES", "weight_decay_penalty", "decay_layer_specs", "make_optimizer", "evaluate",
    "data_fingerprint", "load_run", "unstack", "default_run_name", "sweep_members", "count_errors_fn",
]

_OPTIMIZERS = ("adam", "sgd", "momentum")
_SCHEDULES = ("constant", "cosine")
_DECAY_FORMS = ("per_unit", "sum", "half_sum")
_DATA_TERMS = ("mean", "sum")
_TASKS = ("classify", "autoencode")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static training settings (everything that is not swept).

  Attributes:
    epochs: passes over the training set (the last incomplete mini-batch of an epoch is dropped).
    batch_size: examples per step.
    optimizer: "adam", "sgd" or "momentum" (Nesterov-free heavy ball, ``momentum``).
    learning_rate: peak learning rate.
    schedule: "constant" or "cosine" (cosine decay from ``learning_rate`` to
      ``final_lr_fraction * learning_rate`` over all steps, after ``warmup_epochs`` of linear warm-up).
    final_lr_fraction: see ``schedule``.
    warmup_epochs: linear warm-up length (may be fractional; 0 = none).
    momentum: for "momentum".
    weight_decay: λ per weight (dense/conv) layer, input -> output; one value applies to every layer.
    decay_form: "half_sum" (½ λ Σw², default: reproduces Table 1), "per_unit" (λ Σw²/k, k = the
      layer's output units; paper.md A12) or "sum" (λ Σw²).
    data_term: "mean" (mean cross-entropy over the batch + penalty) or "sum" (Σ over the training set
      + penalty, i.e. mean + penalty / num_train per batch).
    decay_bias: also decay biases (same form, same λ).
    task: "classify" (cross-entropy on labels) or "autoencode" (sparse autoencoder pre-training of a
      model with ``reconstruct``; binary cross-entropy on pixels + KL sparsity; decays encoder and decoder).
    sparsity_target: ρ of the KL sparsity penalty (autoencode).
    sparsity_weight: β of the KL sparsity penalty (autoencode).
    recon_loss: "bce" (binary cross-entropy, summed over pixels) or "mse" (½ Σ squared error, as in the
      UFLDL sparse autoencoder), averaged over the batch (autoencode).
    trainable: top-level param names to train (others frozen); None = all.
    checkpoint_every: epochs between checkpoints (the last epoch is always saved).
    eval_batch_size: batch size of the per-epoch evaluation.
  """
  epochs: int = 20
  batch_size: int = 128
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  schedule: str = "cosine"
  final_lr_fraction: float = 0.0
  warmup_epochs: float = 0.0
  momentum: float = 0.9
  weight_decay: Tuple[float, ...] = (0.0,)
  decay_form: str = "half_sum"
  data_term: str = "mean"
  decay_bias: bool = False
  task: str = "classify"
  sparsity_target: float = 0.05
  sparsity_weight: float = 3.0
  recon_loss: str = "bce"
  trainable: Optional[Tuple[str, ...]] = None
  checkpoint_every: int = 1
  eval_batch_size: int = 2000

  def __post_init__(self):
    if isinstance(self.weight_decay, (int, float)):
      object.__setattr__(self, "weight_decay", (float(self.weight_decay),))
    else:
      object.__setattr__(self, "weight_decay", tuple(float(v) for v in self.weight_decay))
    if self.trainable is not None:
      object.__setattr__(self, "trainable", tuple(self.trainable))
    _check_int("epochs", self.epochs, 1)
    _check_int("batch_size", self.batch_size, 1)
    _check_int("checkpoint_every", self.checkpoint_every, 1)
    _check_int("eval_batch_size", self.eval_batch_size, 1)
    for name, value, choices in (("optimizer", self.optimizer, _OPTIMIZERS), ("schedule", self.schedule, _SCHEDULES),
                                 ("decay_form", self.decay_form, _DECAY_FORMS),
                                 ("data_term", self.data_term, _DATA_TERMS), ("task", self.task, _TASKS),
                                 ("recon_loss", self.recon_loss, ("bce", "mse"))):
      if value not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {value!r}")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(f"TrainConfig.learning_rate must be a positive finite number, got {self.learning_rate}")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      raise ValueError(f"TrainConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    if not 0.0 <= self.warmup_epochs < self.epochs:
      raise ValueError(f"TrainConfig.warmup_epochs must be in [0, epochs), got {self.warmup_epochs}")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum}")
    _check_decays("TrainConfig.weight_decay", self.weight_decay)
    if not 0.0 < self.sparsity_target < 1.0:
      raise ValueError(f"TrainConfig.sparsity_target must be in (0, 1), got {self.sparsity_target}")
    if self.sparsity_weight < 0:
      raise ValueError(f"TrainConfig.sparsity_weight must be >= 0, got {self.sparsity_weight}")

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["weight_decay"] = list(self.weight_decay)
    d["trainable"] = None if self.trainable is None else list(self.trainable)
    return d


def config_mismatch(stored: Dict[str, Any], config: TrainConfig) -> List[str]:
  """Names of the settings where a stored run's config (``result.json``'s "config") differs from ``config``.

  A field the stored config lacks -- one added to ``TrainConfig`` after that run was trained -- matches when
  ``config`` holds the field's default: new fields default to the behaviour runs had before them, so old
  finished runs stay usable. A stored key that ``TrainConfig`` no longer has always differs.
  """
  current = json.loads(json.dumps(config.to_dict()))
  defaults = json.loads(json.dumps(TrainConfig().to_dict()))
  diff = []
  for k in sorted(set(stored) | set(current)):
    if k not in current:
      diff.append(k)
    elif k in stored:
      if stored[k] != current[k]:
        diff.append(k)
    elif current[k] != defaults[k]:
      diff.append(k)
  return diff


def _check_int(name, value, lower):
  if not isinstance(value, (int, np.integer)) or value < lower:
    raise ValueError(f"TrainConfig.{name} must be an integer >= {lower}, got {value!r}")


def _check_decays(name, values):
  for v in values:
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f"{name}: every λ must be finite and >= 0, got {tuple(values)}")


class TrainState(struct.PyTreeNode):
  """Everything that a resumed run needs (checkpointed each epoch).

  Attributes:
    step: int32 [] optimiser steps taken.
    epoch: int32 [] completed epochs.
    params: the "params" collection.
    opt_state: optax state.
    rng: dropout base key (uint32 [2]); step t uses ``fold_in(rng, t)``.
  """
  step: Array
  epoch: Array
  params: Params
  opt_state: Any
  rng: PRNGKey


class TrainResult(NamedTuple):
  """Output of :func:`train_model`: ``variables`` = {"params": ...} for ``model.apply``."""
  variables: Params
  state: TrainState
  history: List[Dict[str, Any]]


class SweepResult(NamedTuple):
  """Output of :func:`train_sweep`.

  Attributes:
    variables: list of k ordinary per-model variables ({"params": ...}), in sweep order.
    stacked_variables: the same with a leading [k] axis on every leaf.
    weight_decays: [k, num_layers] λ of each member.
    seeds: [k] init seeds.
    state: stacked TrainState.
    history: per-epoch metrics (lists of k values).
  """
  variables: List[Params]
  stacked_variables: Params
  weight_decays: np.ndarray
  seeds: np.ndarray
  state: TrainState
  history: List[Dict[str, Any]]


# ----------------------------------------------------------------------------------------------------
# Loss pieces.


def decay_layer_specs(model, params: Params, config: TrainConfig) -> List[Tuple[Tuple[str, ...], int]]:
  """(param_path, k = output units) of the decayed layers, in λ order.

  Classification: the model's dense/conv layers (``models.weight_layers``). Autoencoding: encoder, decoder.
  """
  if config.task == "autoencode":
    paths = [("encoder",), ("decoder",)]
  else:
    paths = [tuple(d["param_path"]) for d in models_lib.weight_layers(model)]
  return [(p, int(models_lib.get_param(params, p)["kernel"].shape[-1])) for p in paths]


def sweep_members(model, x_example, config: TrainConfig, weight_decays: Sequence[Any], seeds: Sequence[int],
                  who: str) -> Tuple[np.ndarray, List[int]]:
  """The k members of a sweep: (per-layer λ [k, num_decayed_layers], k seeds).

  ``weight_decays`` entries are scalars, per-layer lists or None (``config.weight_decay``); a length-1
  ``weight_decays`` or ``seeds`` is broadcast to the other's length.

  Raises:
    ValueError: empty or mismatched lengths, or a λ list of the wrong length (the message starts with ``who``).
  """
  weight_decays = list(weight_decays)
  seeds = [int(s) for s in seeds]
  k = max(len(weight_decays), len(seeds))
  if len(weight_decays) not in (1, k) or len(seeds) not in (1, k) or k == 0:
    raise ValueError(f"{who}: weight_decays ({len(weight_decays)}) and seeds ({len(seeds)}) must have "
                     "the same length, or one of them length 1")
  weight_decays = weight_decays * k if len(weight_decays) == 1 else weight_decays
  seeds = seeds * k if len(seeds) == 1 else seeds
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(x_example)))["params"]
  num_layers = len(decay_layer_specs(model, {"params": template}, config))
  decays = np.stack([_broadcast_decays(config.weight_decay if w is None else w, num_layers,
                                       f"{who}: weight_decays[{i}]") for i, w in enumerate(weight_decays)])
  return decays, seeds


def _broadcast_decays(values, num_layers: int, name: str) -> np.ndarray:
  values = np.atleast_1d(np.asarray(values, np.float64))
  if values.ndim != 1:
    raise ValueError(f"{name}: expected a scalar or a list of per-layer λ, got shape {values.shape}")
  if values.shape[0] == 1:
    values = np.repeat(values, num_layers)
  if values.shape[0] != num_layers:
    raise ValueError(f"{name}: {values.shape[0]} λ values given for a model with {num_layers} weight layers")
  _check_decays(name, values.tolist())
  return values.astype(np.float32)


def weight_decay_penalty(params: Params, decays: Array, specs, config: TrainConfig) -> Array:
  """The weight-decay term, ``Σ_l λ_l · scale_l · Σ w_l²`` (see ``TrainConfig.decay_form``).

  Args:
    params: the "params" collection.
    decays: [num_layers] λ, in the order of ``specs``.
    specs: ``decay_layer_specs(...)``.
    config: gives decay_form, decay_bias and trainable (frozen layers are not decayed).

  Returns:
    Scalar penalty (not yet divided by num_train for ``data_term="sum"``).
  """
  total = jnp.zeros((), jnp.float32)
  for l, (path, k) in enumerate(specs):
    if config.trainable is not None and path[0] not in config.trainable:
      continue
    layer = models_lib.get_param(params, path)
    sq = jnp.sum(jnp.square(layer["kernel"]))
    if config.decay_bias and "bias" in layer:
      sq = sq + jnp.sum(jnp.square(layer["bias"]))
    scale = {"per_unit": 1.0 / k, "sum": 1.0, "half_sum": 0.5}[config.decay_form]
    total = total + decays[l] * scale * sq
  return total


def _kl_sparsity(rho: float, rho_hat: Array) -> Array:
  rho_hat = jnp.clip(rho_hat, 1e-6, 1 - 1e-6)
  return jnp.sum(rho * jnp.log(rho / rho_hat) + (1 - rho) * jnp.log((1 - rho) / (1 - rho_hat)))


def _make_loss_fn(model, config: TrainConfig, specs, num_train: int):
  """loss_fn(params, x, y, decays, dropout_key) -> (loss, (data_loss, error))."""

  def loss_fn(params, x, y, decays, dropout_key):
    variables = {"params": params}
    if config.task == "classify":
      logits = model.apply(variables, x, train=True, rngs={"dropout": dropout_key})
      data_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      error = jnp.mean((jnp.argmax(logits, -1) != y).astype(jnp.float32))
    else:
      code, recon_logits = model.apply(variables, x, method="reconstruct")
      target = x.reshape(x.shape[0], -1)
      if config.recon_loss == "bce":
        recon = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(recon_logits, target), axis=-1))
      else:
        recon = jnp.mean(0.5 * jnp.sum(jnp.square(jax.nn.sigmoid(recon_logits) - target), axis=-1))
      data_loss = recon + config.sparsity_weight * _kl_sparsity(config.sparsity_target, jnp.mean(code, axis=0))
      error = jnp.mean(jnp.square(jax.nn.sigmoid(recon_logits) - target))  # reconstruction MSE
    penalty = weight_decay_penalty(params, decays, specs, config)
    if config.data_term == "sum":
      penalty = penalty / num_train
    return data_loss + penalty, (data_loss, error)

  return loss_fn


def make_optimizer(config: TrainConfig, steps_per_epoch: int, params: Params) -> optax.GradientTransformation:
  """The optax transformation of ``config`` (schedule over ``epochs * steps_per_epoch`` steps, frozen layers)."""
  total = config.epochs * steps_per_epoch
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "constant":
    lr = config.learning_rate
  elif warmup == 0:
    lr = optax.cosine_decay_schedule(config.learning_rate, total, alpha=config.final_lr_fraction)
  else:
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.learning_rate, peak_value=config.learning_rate,
        warmup_steps=warmup, decay_steps=total, end_value=config.final_lr_fraction * config.learning_rate)
  if config.optimizer == "adam":
    tx = optax.adam(lr)
  elif config.optimizer == "momentum":
    tx = optax.sgd(lr, momentum=config.momentum)
  else:
    tx = optax.sgd(lr)
  if config.trainable is not None:
    missing = [name for name in config.trainable if name not in params]
    if missing:
      raise ValueError(f"TrainConfig.trainable names unknown params {missing}; the model has {sorted(params)}")
    labels = {name: jax.tree.map(lambda _, n=name: "train" if n in config.trainable else "frozen", sub)
              for name, sub in params.items()}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


# ----------------------------------------------------------------------------------------------------
# Compiled pieces.


@functools.lru_cache(maxsize=32)
def _compiled_fns(model, config: TrainConfig, example_shape: Tuple[int, ...], num_train: int, stacked: bool):
  """(tx, specs, init_fn, epoch_fn, count_fn) for a (model, static config, data size); cached so that runs differing
  only in λ, seeds or data values reuse one compiled program (λ is a traced argument).

  ``config`` must have ``weight_decay=(0.0,)`` (λ is not part of the key).
  """
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + example_shape)))["params"]
  specs = decay_layer_specs(model, {"params": template}, config)
  steps = num_train // config.batch_size
  tx = make_optimizer(config, steps, template)
  loss_fn = _make_loss_fn(model, config, specs, num_train)

  def step_fn(state: TrainState, x, y, decays):
    dropout_key = jax.random.fold_in(state.rng, state.step)
    (loss, (data_loss, err)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, x, y, decays, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, jnp.stack([loss, data_loss, err])

  if stacked:
    step_fn = jax.vmap(step_fn, in_axes=(0, None, None, 0))

  def epoch_fn(state, images, labels, decays, perm_key):
    """One epoch: a scan over the mini-batches of permutation(perm_key); returns mean (loss, data, error)."""
    perm = jax.random.permutation(perm_key, num_train)[: steps * config.batch_size]
    perm = perm.reshape(steps, config.batch_size)

    def body(st, idx):
      return step_fn(st, images[idx], labels[idx], decays)

    state, stats = jax.lax.scan(body, state, perm)
    stats = jnp.mean(stats, axis=0)  # [3] or [k, 3]
    state = state.replace(epoch=state.epoch + 1)
    return state, stats

  def init_fn(key):
    return model.init(key, jnp.zeros((1,) + example_shape, jnp.float32))["params"]

  if stacked:
    init_fn = jax.vmap(init_fn)
  return tx, specs, jax.jit(init_fn), jax.jit(epoch_fn, donate_argnums=(0,)), count_errors_fn(model, stacked)


@functools.lru_cache(maxsize=32)
def count_errors_fn(model, stacked: bool = False) -> Callable:
  """``count(params, x, y) -> number of errors`` of a Flax model, jitted (rows with ``y = -1`` are padding).

  The model is traced under float32 matmuls ("highest") on every backend, so reported errors do not
  depend on a GPU's TF32 default. ``stacked``: ``params`` have a leading member axis and the count is [k]
  (``jax.vmap``). Cached per (model, stacked); use with :func:`evaluate`.
  """
  def count(params, x, y):
    with precision_lib.scope("highest"):
      logits = model.apply({"params": params}, x)
    return jnp.sum(((jnp.argmax(logits, -1) != y) & (y >= 0)).astype(jnp.int32))

  return jax.jit(jax.vmap(count, in_axes=(0, None, None)) if stacked else count)


def evaluate(count_fn, params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int, *,
             mesh: Optional[Mesh] = None, shard_examples: bool = True) -> np.ndarray:
  """Error rate(s) with a jitted ``count_fn`` over fixed-size chunks (the ragged tail padded and masked).

  Args:
    count_fn: ``count_fn(params, x [B, ...], y [B]) -> errors`` (a scalar, or [k] for stacked params),
      ignoring rows with ``y = -1`` (the padding).
    params: passed to ``count_fn`` as is (with ``mesh`` and ``shard_examples``: replicated over ``mesh``).
    images, labels: [N, ...] and [N].
    batch_size: examples per chunk (with ``mesh`` and ``shard_examples``: rounded up to a multiple of the
      mesh size).
    mesh: None: every chunk on the default device (as before). A 1-D mesh (``distributed.data_mesh()``):
      with ``shard_examples=True`` each chunk's rows are sharded over the mesh and ``params`` replicated
      (XLA sums the per-device counts); with ``shard_examples=False`` the chunk is replicated and ``params``
      are used as placed by the caller (e.g. sweep members sharded over the mesh).

  Returns:
    errors / N (numpy; [k] for stacked params).
  """
  n = images.shape[0]
  bs = min(batch_size, n)
  place = None
  if mesh is not None:
    if shard_examples:
      bs = distributed.round_up(bs, mesh.size)
      params = distributed.put_replicated(params, mesh)
      place = distributed.put_batch
    else:
      place = distributed.put_replicated
  total = 0
  for start in range(0, n, bs):
    xb, yb = images[start:start + bs], labels[start:start + bs]
    k = xb.shape[0]
    if k < bs:
      xb = np.concatenate([xb, np.zeros((bs - k,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.full((bs - k,), -1, yb.dtype)])  # masked out by count_fn
    if place is None:
      total = total + np.asarray(count_fn(params, jnp.asarray(xb), jnp.asarray(yb)))
    else:
      total = total + _to_host(count_fn(params, *place((xb, yb), mesh)))
  return np.asarray(total) / n


def _to_host(a) -> np.ndarray:
  """A (possibly multi-host) array as numpy: replicated outputs are read locally, sharded ones gathered."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    if a.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    return distributed.gather(a)
  return np.asarray(a)


# ----------------------------------------------------------------------------------------------------
# Input checks.


def _check_data(images, labels, name="images"):
  """Validates a dataset before anything is compiled; returns float32 images and int32 labels (no copy
  when they already have these dtypes)."""
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim < 2:
    raise ValueError(f"{name}: expected [N, ...] images, got shape {images.shape}")
  if labels.shape != (images.shape[0],):
    raise ValueError(f"{name}: labels shape {labels.shape} does not match {images.shape[0]} images")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{name}: images must be floating point in [0, 1], got dtype {images.dtype}")
  if not np.isfinite(np.sum(images, dtype=np.float64)):  # one pass; any NaN/inf makes the sum non-finite
    raise ValueError(f"{name}: images contain NaN or inf")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
  return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def data_fingerprint(images, labels) -> str:
  """Short content hash of a dataset, to tell training sets apart in a workdir (not a security hash).

  Covers the shape, every label, every 7th image in full and the float64 sum of all pixels.
  """
  images = np.asarray(images, np.float32)
  h = hashlib.blake2b(digest_size=8)
  h.update(str(images.shape).encode())
  h.update(np.ascontiguousarray(np.asarray(labels, np.int32)).tobytes())
  h.update(np.ascontiguousarray(images[::7]).tobytes())
  h.update(np.float64(np.sum(images, dtype=np.float64)).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Training loops.


def _copy_params(init_params):
  """The "params" of ``init_params``, copied (the epoch function donates its input state)."""
  params = init_params["params"] if "params" in init_params else init_params
  return jax.tree.map(lambda a: jnp.array(a, copy=True), params)


def _run(model, images, labels, config: TrainConfig, *, decays: np.ndarray, seeds: Sequence[int], data_seed: int,
         stacked: bool, workdir: Optional[str], eval_data, init_params, stop_after_epoch: Optional[int],
         log_prefix: str, mesh: Optional[Mesh] = None):
  """Shared loop of train_model (stacked=False, one member) and train_sweep (stacked=True).

  Stacked: the k members are sharded over ``mesh`` (default: all devices), padded to a multiple of its
  size with copies of member 0; checkpoints, history and the returned state hold the k real members only
  (so a run resumes on any number of devices). Single model: trained on the default device; its per-epoch
  evaluation shards the evaluation batch over ``mesh``.
  """
  images, labels = _check_data(images, labels)
  if eval_data is not None:
    eval_images, eval_labels = _check_data(*eval_data, name="eval_data")
  num_train = images.shape[0]
  if num_train < config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} is larger than the {num_train} training examples")
  if stop_after_epoch is not None and not 1 <= stop_after_epoch <= config.epochs:
    raise ValueError(f"stop_after_epoch must be in [1, epochs={config.epochs}], got {stop_after_epoch}")
  steps_per_epoch = num_train // config.batch_size
  tx, specs, init_fn, epoch_fn, count_fn = _compiled_fns(
      model, dataclasses.replace(config, weight_decay=(0.0,)), tuple(images.shape[1:]), num_train, stacked)
  if stacked:
    keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    init_keys, drop_keys = jax.vmap(lambda k: jax.random.split(k))(keys).transpose(1, 0, 2)
    params = init_fn(init_keys)
  else:
    init_key, drop_key = jax.random.split(jax.random.PRNGKey(int(seeds[0])))
    params = init_fn(init_key) if init_params is None else _copy_params(init_params)
  if decays.shape[-1] != len(specs):
    raise ValueError(f"weight_decay: {decays.shape[-1]} λ values for a model with {len(specs)} decayed layers "
                     f"({[p for p, _ in specs]})")
  if stacked:
    opt_state = jax.vmap(tx.init)(params)
    state = TrainState(step=jnp.zeros((len(seeds),), jnp.int32), epoch=jnp.zeros((len(seeds),), jnp.int32),
                       params=params, opt_state=opt_state, rng=drop_keys)
  else:
    state = TrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params), rng=drop_key)

  ckpt_dir = os.path.join(workdir, "ckpt") if workdir else None
  if workdir:
    run_info = {"config": config.to_dict(), "seeds": [int(s) for s in seeds], "data_seed": int(data_seed),
                "weight_decays": np.asarray(decays).tolist(), "num_train": int(num_train),
                "data_fingerprint": data_fingerprint(images, labels), "model": repr(model)}
    checkpoint.guard_run_config(workdir, run_info)
    restored, step = checkpoint.restore_checkpoint(ckpt_dir, target=state)
    if step is not None:
      state = jax.tree.map(jnp.asarray, restored)
      logging.info("%sresumed from %s at epoch %d", log_prefix, ckpt_dir, step)

  if eval_data is None or config.task != "classify":
    count_fn = None
  writer = progress.MetricWriter(workdir, prefix=log_prefix)
  data_key = jax.random.PRNGKey(int(data_seed))
  history = []
  start_epoch = int(np.max(np.asarray(state.epoch)))
  mesh = distributed.data_mesh() if mesh is None else mesh
  k = len(seeds) if stacked else 1
  if stacked:
    # Members sharded over the mesh (padded with copies of member 0), training data replicated.
    kp = distributed.round_up(k, mesh.size)
    if kp != k:
      logging.info("%ssharding %d members over %d devices (%d padding copies)", log_prefix, k, mesh.size, kp - k)
    state = distributed.put_batch(distributed.pad_batch(state, kp), mesh)
    decays_d = distributed.put_batch(distributed.pad_batch(np.asarray(decays), kp), mesh)
    images_d, labels_d = distributed.put_replicated((images, labels), mesh)
  else:
    images_d, labels_d, decays_d = jnp.asarray(images), jnp.asarray(labels), jnp.asarray(decays)
  last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
  for epoch in range(start_epoch, last_epoch):
    t0 = time.perf_counter()
    perm_key = jax.random.fold_in(data_key, epoch)
    if stacked:
      perm_key = distributed.put_replicated(perm_key, mesh)  # every input on the mesh (multi-host safe)
    state, stats = epoch_fn(state, images_d, labels_d, decays_d, perm_key)
    stats = _to_host(stats)[:k] if stacked else np.asarray(stats)  # blocks; padded members dropped
    seconds = time.perf_counter() - t0
    record = {"epoch": epoch + 1, "loss": stats[..., 0], "data_loss": stats[..., 1],
              ("train_batch_error" if config.task == "classify" else "recon_mse"): stats[..., 2],
              "seconds": seconds,
              "examples_per_sec": steps_per_epoch * config.batch_size * len(seeds if stacked else [0]) / seconds}
    if count_fn is not None:
      err = evaluate(count_fn, state.params, eval_images, eval_labels, config.eval_batch_size, mesh=mesh,
                     shard_examples=not stacked)
      record["eval_error"] = err[:k] if stacked else err
    history.append(record)
    writer.write(**record)
    if ckpt_dir and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == last_epoch):
      # The k real members, on the host (gathered across processes; process 0 writes).
      saved = distributed.unpad(distributed.gather(state), k) if stacked else state
      if jax.process_index() == 0:
        checkpoint.save_checkpoint(ckpt_dir, saved, step=epoch + 1)
  if stacked:
    state = jax.tree.map(jnp.asarray, distributed.unpad(distributed.gather(state), k))
  return state, history


def train_model(model, images, labels, config: TrainConfig, *, seed: int = 0, data_seed: Optional[int] = None,
                workdir: Optional[str] = None, eval_data: Optional[Tuple[Any, Any]] = None,
                init_params: Optional[Params] = None, stop_after_epoch: Optional[int] = None) -> TrainResult:
  """Trains one model; resumes from ``workdir/ckpt`` when a checkpoint is there.

  Args:
    model: a Linen module from ``models`` (or any with the same contract).
    images: [N, ...] float32 in [0, 1]; labels: [N] int.
    config: training settings; ``config.weight_decay`` gives the per-layer λ.
    seed: init (and dropout) seed.
    data_seed: seed of the per-epoch shuffling (default: ``seed``).
    workdir: where checkpoints, ``metrics.jsonl`` and ``run_config.json`` go (None: nothing is written).
    eval_data: optional (images, labels) whose error is logged each epoch.
    init_params: start from these variables instead of a random init (e.g. a pre-trained encoder).
    stop_after_epoch: return after this epoch, as if interrupted (resume later with the same call).

  Returns:
    TrainResult(variables={"params": ...}, state, history).

  Raises:
    ValueError: bad data (shape, dtype, NaN), λ list of the wrong length, or a workdir holding a run with
      other settings.
  """
  images, labels = _check_data(images, labels)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1])))["params"]
  num_layers = len(decay_layer_specs(model, {"params": template}, config))
  decays = _broadcast_decays(config.weight_decay, num_layers, "TrainConfig.weight_decay")
  state, history = _run(model, images, labels, config, decays=decays, seeds=[seed],
                        data_seed=seed if data_seed is None else data_seed, stacked=False, workdir=workdir,
                        eval_data=eval_data, init_params=init_params, stop_after_epoch=stop_after_epoch,
                        log_prefix="")
  return TrainResult({"params": state.params}, state, history)


def unstack(tree: Any, k: int) -> List[Any]:
  """Splits a pytree with a leading [k] axis into k pytrees."""
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(k)]


def train_sweep(model, images, labels, config: TrainConfig, *, weight_decays: Sequence[Any] = (None,),
                seeds: Sequence[int] = (0,), data_seed: int = 0, workdir: Optional[str] = None,
                eval_data: Optional[Tuple[Any, Any]] = None, stop_after_epoch: Optional[int] = None,
                mesh: Optional[Mesh] = None) -> SweepResult:
  """Trains k models that differ only in λ and/or init seed as ONE compiled program.

  Parameters are stacked on a leading [k] axis; ``jax.vmap`` runs init, the train step and evaluation
  over the members, all members see the same mini-batches (order from ``data_seed``). Member i with
  seed s and λ l ends where ``train_model(..., config with weight_decay=l, seed=s, data_seed=data_seed)``
  ends, up to float rounding. The member axis is sharded over the devices of ``mesh`` (``jax.sharding``;
  k padded to a multiple of the device count with copies of member 0, the copies dropped from everything
  returned or saved; the training data replicated on every device), so the same call uses one CPU, one
  GPU or all local/global devices; the result equals the unsharded sweep up to float rounding.

  Args:
    weight_decays: k entries, each a scalar or per-layer list (None: ``config.weight_decay``); a length-1
      list is broadcast to the length of ``seeds``.
    seeds: k init seeds (or one, broadcast to the length of ``weight_decays``).
    mesh: a 1-D mesh (``distributed.data_mesh(devices)``) whose devices share the members; default all
      devices. ``distributed.data_mesh(jax.devices()[:1])`` runs the sweep unsharded on one device.
    (other arguments as in :func:`train_model`.)

  Returns:
    SweepResult with ordinary per-model ``variables``.
  """
  images, labels = _check_data(images, labels)
  decays, seeds = sweep_members(model, images[:1], config, weight_decays, seeds, "train_sweep")
  k = len(seeds)
  state, history = _run(model, images, labels, config, decays=decays, seeds=seeds, data_seed=data_seed,
                        stacked=True, workdir=workdir, eval_data=eval_data, init_params=None,
                        stop_after_epoch=stop_after_epoch, log_prefix="[sweep] ", mesh=mesh)
  stacked_vars = {"params": state.params}
  return SweepResult(unstack(stacked_vars, k), stacked_vars, decays, np.asarray(seeds), state, history)


# ----------------------------------------------------------------------------------------------------
# Recipes and get_or_train.

_SIGMOID = dict(epochs=40, batch_size=128, optimizer="adam", learning_rate=1e-2, schedule="cosine",
                weight_decay=(1e-5, 1e-5, 1e-6), decay_form="half_sum", data_term="mean")
_FC10 = dict(epochs=20, batch_size=128, optimizer="adam", learning_rate=3e-3, schedule="cosine",
             decay_form="half_sum", data_term="mean")

# Default recipe per named model: {"model": get_model name, "model_kwargs", "config": TrainConfig kwargs,
# "pretrain": TrainConfig kwargs of an unsupervised stage (AE only)}. Evidence: notes/models.md.
RECIPES: Dict[str, Dict[str, Any]] = {
    "fc10": {"model": "fc10", "config": dict(_FC10, weight_decay=(1e-4,))},
    "fc10-1e-4": {"model": "fc10", "config": dict(_FC10, weight_decay=(1e-4,))},
    "fc10-1e-2": {"model": "fc10", "config": dict(_FC10, weight_decay=(1e-2,))},
    "fc10-1": {"model": "fc10", "config": dict(_FC10, weight_decay=(1.0,))},
    "fc100-100-10": {"model": "fc100-100-10", "config": dict(_SIGMOID)},
    "fc200-200-10": {"model": "fc200-200-10", "config": dict(_SIGMOID)},
    "fc123-456-10": {"model": "fc123-456-10", "config": dict(_SIGMOID)},
    # Table 3 (30000 training images): 10x Table 1's λ meets every Table 3 goal, Table 1's λ does not
    # (FC100-100-10' on P2: 2.51% test); evidence in notes/models.md.
    "fc100-100-10-t3": {"model": "fc100-100-10", "config": dict(_SIGMOID, weight_decay=(1e-4, 1e-4, 1e-5))},
    "fc123-456-10-t3": {"model": "fc123-456-10", "config": dict(_SIGMOID, weight_decay=(1e-4, 1e-4, 1e-5))},
    "ae400-10": {"model": "ae400-10",
                 "pretrain": dict(task="autoencode", epochs=40, batch_size=128, learning_rate=1e-3,
                                  weight_decay=(3e-3, 3e-3), sparsity_target=0.05, sparsity_weight=3.0,
                                  recon_loss="bce"),
                 "config": dict(epochs=50, batch_size=128, learning_rate=1e-2, weight_decay=(1e-6,))},
    "mnist_conv": {"model": "mnist_conv", "config": dict(epochs=3, batch_size=128, learning_rate=1e-3,
                                                         weight_decay=(0.0,))},
}


def _recipe(name: str) -> Dict[str, Any]:
  key = name.lower()
  if key in RECIPES:
    return RECIPES[key]
  if models_lib.model_name_widths(key):
    return {"model": key, "config": dict(_SIGMOID)}
  raise ValueError(f"get_or_train: no recipe for {name!r}; known: {', '.join(sorted(RECIPES))} "
                   "or any 'fc<w1>-<w2>-10'")


def load_run(run_dir: str, model) -> Tuple[Params, Dict[str, Any]]:
  """(variables, result.json contents) of a finished run written by :func:`get_or_train`."""
  result = checkpoint.read_json(os.path.join(run_dir, "result.json"))
  variables = checkpoint.load_pytree(os.path.join(run_dir, "final.msgpack"))
  return jax.tree.map(jnp.asarray, variables), result


def default_run_name(name: str, *, seed: int = 0, epochs: Optional[int] = None,
                     overrides: Optional[Dict[str, Any]] = None, data_tag: str = "") -> str:
  """``name`` [+ ``_<data_tag>``] [+ ``_seed<seed>``] [+ ``_<hash of epochs/overrides>``].

  E.g. "fc100-100-10", "fc100-100-10_p2_seed1", "fc10_3f9a0c1e".
  """
  run_name = name.lower() + (f"_{data_tag}" if data_tag else "") + (f"_seed{seed}" if seed else "")
  if overrides or epochs is not None:
    tag = json.dumps({"epochs": epochs, **(overrides or {})}, sort_keys=True, default=str)
    run_name += "_" + hashlib.blake2b(tag.encode(), digest_size=4).hexdigest()
  return run_name


def get_or_train(name: str, images, labels, *, workdir: str, seed: int = 0, epochs: Optional[int] = None,
                 run_name: Optional[str] = None, eval_data: Optional[Tuple[Any, Any]] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, **overrides: Any) -> Tuple[Any, Params]:
  """Trains the named model with its default recipe, or restores it when already trained.

  The run lives in ``workdir/<run_name>`` (default run_name: ``name``, plus ``_seed<seed>`` for seed != 0
  and a hash of the overrides when given). A finished run (``final.msgpack`` + ``result.json``) is
  restored; an interrupted one resumes from its checkpoint.

  Args:
    name: a key of ``RECIPES`` ("fc10-1e-4", "fc10-1e-2", "fc10-1", "fc100-100-10", "fc200-200-10",
      "fc123-456-10", "ae400-10", "mnist_conv"; Table 3: "fc100-100-10-t3", "fc123-456-10-t3") or any
      "fc<w1>-<w2>-10".
    images, labels: training set ([N, 28, 28, 1] float32 in [0, 1], [N] int).
    workdir: parent directory of the runs (e.g. "/work/main/runs/models").
    seed: init seed (also the shuffling seed).
    epochs: overrides the recipe's epochs (of both stages, for a recipe with unsupervised pre-training).
    run_name: directory name under ``workdir`` (needed to keep e.g. P1 and full-data runs apart);
      default ``default_run_name(name, seed=seed, epochs=epochs, overrides=...)``.
    eval_data: optional (images, labels) evaluated each epoch and at the end (e.g. the test set).
    model_kwargs: module attributes overriding the recipe's (e.g. ``{"dropout_rate": 0.5}``).
    **overrides: ``TrainConfig`` fields replacing the recipe's (e.g. ``weight_decay=(1e-3,)``).

  Returns:
    (model, variables) with ``model.apply(variables, x)`` the logits.

  Raises:
    ValueError: unknown name, unknown override, or ``workdir/<run_name>`` trained on other data.
  """
  recipe = _recipe(name)
  model_kwargs = dict(recipe.get("model_kwargs", {}), **(model_kwargs or {}))
  model = models_lib.get_model(recipe["model"], **model_kwargs)
  bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(TrainConfig)}]
  if bad:
    raise ValueError(f"get_or_train: unknown TrainConfig overrides {bad}")
  cfg = dict(recipe["config"], **overrides)
  if epochs is not None:
    cfg["epochs"] = epochs
  config = TrainConfig(**cfg)
  if run_name is None:
    extra = dict(overrides, **({"model_kwargs": model_kwargs} if model_kwargs else {}))
    run_name = default_run_name(name, seed=seed, epochs=epochs, overrides=extra)
  run_dir = os.path.join(workdir, run_name)
  images, labels = _check_data(images, labels)
  fingerprint = data_fingerprint(images, labels)
  if os.path.exists(os.path.join(run_dir, "result.json")):
    variables, result = load_run(run_dir, model)
    if result.get("data_fingerprint") != fingerprint:
      raise ValueError(f"{run_dir} was trained on another dataset (fingerprint {result.get('data_fingerprint')} "
                       f"vs {fingerprint}); pass another run_name")
    diff = config_mismatch(result.get("config") or {}, config)
    if diff:
      raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(diff)}); pass the same "
                       "overrides or another run_name")
    logging.info("get_or_train: restored %s from %s", name, run_dir)
    return model, variables

  timer = time.perf_counter()
  pretrain_seconds = 0.0
  if "pretrain" in recipe:
    # Stage 1: unsupervised sparse-autoencoder training. Stage 2: softmax on the frozen code. The code is
    # computed once, so stage 2 is softmax regression on [N, code_size] features (the same objective as
    # training ``output`` with ``trainable=("output",)``, at a fraction of the cost).
    pre_cfg = TrainConfig(**dict(recipe["pretrain"], **({"epochs": epochs} if epochs is not None else {})))
    pre = train_model(model, images, labels, pre_cfg, seed=seed, workdir=os.path.join(run_dir, "pretrain"))
    pretrain_seconds = time.perf_counter() - timer
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    codes = np.concatenate([np.asarray(encode(pre.variables, jnp.asarray(images[i:i + 5000])))
                            for i in range(0, images.shape[0], 5000)])
    eval_codes = None
    if eval_data is not None:
      ex, ey = _check_data(*eval_data, name="eval_data")
      eval_codes = (np.concatenate([np.asarray(encode(pre.variables, jnp.asarray(ex[i:i + 5000])))
                                    for i in range(0, ex.shape[0], 5000)]), ey)
    head = models_lib.FC10(num_classes=model.num_classes, image_shape=(codes.shape[1],))
    res = train_model(head, codes, labels, config, seed=seed, workdir=os.path.join(run_dir, "train"),
                      eval_data=eval_codes)
    params = dict(pre.variables["params"])
    params["output"] = res.variables["params"]["output"]
    res = res._replace(variables={"params": params})
  else:
    res = train_model(model, images, labels, config, seed=seed, workdir=os.path.join(run_dir, "train"),
                      eval_data=eval_data)
  seconds = time.perf_counter() - timer
  logits_fn = functools.partial(model.apply, res.variables)
  result = {"name": name, "run_name": run_name, "model": recipe["model"], "model_kwargs": model_kwargs, "seed": seed,
            "config": config.to_dict(), "data_fingerprint": fingerprint, "num_train": int(images.shape[0]),
            "train_error": metrics.error_rate(logits_fn, images, labels), "train_seconds": seconds,
            "pretrain_seconds": pretrain_seconds}
  if "pretrain" in recipe:
    result["pretrain_config"] = pre_cfg.to_dict()
  if eval_data is not None:
    result["eval_error"] = metrics.error_rate(logits_fn, *_check_data(*eval_data, name="eval_data"))
  checkpoint.save_pytree(os.path.join(run_dir, "final.msgpack"), res.variables)
  checkpoint.atomic_write_json(os.path.join(run_dir, "result.json"), result)
  logging.info("get_or_train: %s trained in %.1fs: %s", name, seconds, result)
  return model, res.variables
