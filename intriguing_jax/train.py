"""Training: cross-entropy + per-layer weight decay, vmapped hyper-parameter sweeps, resumable runs.

Usage::

    model, variables = train.get_or_train("fc100-100-10", images, labels, workdir="runs/models")  # recipe
    config = train.TrainConfig(epochs=30, weight_decay=(1e-5, 1e-5, 1e-6))
    result = train.train_model(models.get_model("fc100-100-10"), images, labels, config, workdir=w)
    sweep = train.train_sweep(models.get_model("fc10"), images, labels, config,     # ONE compiled program
                              weight_decays=[1e-4, 1e-2, 1.0], seeds=[0])           # sweep.variables[2]: λ=1

    config = train.TrainConfig(lipschitz_penalty="hinge", lipschitz_strength=1e-2)  # + μ Σ_l max(σ_l - 1, 0)²
    sweep = train.train_sweep(model, images, labels, config, lipschitz_strengths=[0.0, 1e-2, 1e-1])  # μ traced

Loss: ``mean_i CE(x_i, y_i) + Σ_l ½ λ_l Σ w_l²`` over the dense/conv kernels (``models.weight_layer_paths``,
λ listed input -> output), biases not decayed, plus with ``lipschitz_penalty`` a penalty of strength μ on
each such layer's exact operator norm σ_l (:func:`lipschitz_penalty`; notes/lipschitz.md). Epoch loop,
resume, sweeps and checkpoints: ``driver``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from intriguing_jax import checkpoint
from intriguing_jax import data as data_lib
from intriguing_jax import distributed
from intriguing_jax import driver
from intriguing_jax import metrics
from intriguing_jax import models as models_lib
from intriguing_jax import precision as precision_lib
from intriguing_jax.driver import TrainState
from intriguing_jax import types
from intriguing_jax.types import Array, Params

__all__ = [
    "TrainConfig", "TrainState", "TrainResult", "SweepResult", "train_model", "train_sweep", "get_or_train",
    "RECIPES", "recipe", "weight_decay_penalty", "decay_layer_paths", "make_optimizer", "evaluate",
    "make_evaluate", "data_fingerprint", "check_data", "load_run", "unstack", "default_run_name",
    "sweep_members", "count_errors_fn", "run_experiment", "Program", "program_parts", "fit",
    "Hyper", "PenaltyLayer", "penalty_layers", "layer_norms", "lipschitz_penalty", "make_penalty",
    "static_config",
]

_CHOICES = {"optimizer": ("adam", "sgd", "momentum"), "schedule": ("constant", "cosine"),
            "task": ("classify", "autoencode"), "recon_loss": ("bce", "mse"),
            "lipschitz_penalty": ("none", "sum", "hinge", "log", "parseval")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Static training settings (everything that is not swept); choices in ``_CHOICES``.

  Each epoch drops the last incomplete batch. ``schedule`` "cosine": decay from ``learning_rate`` to
  ``final_lr_fraction * learning_rate`` over all steps, after ``warmup_epochs`` (may be fractional) of
  linear warm-up. ``weight_decay``: λ per weight (dense/conv) layer, input -> output (one value: every
  layer). ``task`` "autoencode": sparse autoencoder pre-training of a model with ``reconstruct``
  (``recon_loss`` "bce" summed over pixels or "mse" ½ Σ squared error, batch mean, + β KL(ρ || mean code)
  with ρ, β = ``sparsity_target``, ``sparsity_weight``; decays encoder and decoder). ``trainable``:
  top-level param names to train (others frozen; None = all). The last epoch is always checkpointed.
  ``lipschitz_penalty``: the form of the penalty on the weight layers' exact operator norms σ_l
  (:func:`lipschitz_penalty`; "none": off, nothing compiled in), ``lipschitz_strength``: its μ (each sweep
  member's default, traced like λ), ``lipschitz_target``: the threshold of the "hinge" form.
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
  task: str = "classify"
  sparsity_target: float = 0.05
  sparsity_weight: float = 3.0
  recon_loss: str = "bce"
  trainable: Optional[Tuple[str, ...]] = None
  checkpoint_every: int = 1
  eval_batch_size: int = 2000
  lipschitz_penalty: str = "none"
  lipschitz_strength: float = 0.0
  lipschitz_target: float = 1.0

  def __post_init__(self):
    wd = np.atleast_1d(np.asarray(self.weight_decay, np.float64))
    object.__setattr__(self, "weight_decay", tuple(float(v) for v in wd))
    if self.trainable is not None:
      if isinstance(self.trainable, str):
        raise ValueError(f"TrainConfig.trainable must be a list of param names, got the string "
                         f"{self.trainable!r} (write ({self.trainable!r},))")
      object.__setattr__(self, "trainable", tuple(self.trainable))
    for name in ("epochs", "batch_size", "checkpoint_every", "eval_batch_size"):
      value = getattr(self, name)
      if not types.is_integer(value) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
    for name, choices in _CHOICES.items():
      if getattr(self, name) not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
    lr = self.learning_rate
    checks = (("learning_rate", math.isfinite(lr) and lr > 0, "finite and > 0"),
              ("final_lr_fraction", 0.0 <= self.final_lr_fraction <= 1.0, "in [0, 1]"),
              ("warmup_epochs", 0.0 <= self.warmup_epochs < self.epochs
               and (self.warmup_epochs == 0 or self.schedule == "cosine"),
               "in [0, epochs), and 0 unless schedule='cosine' (the only schedule with a warm-up)"),
              ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
              ("sparsity_target", 0.0 < self.sparsity_target < 1.0, "in (0, 1)"),
              ("sparsity_weight", self.sparsity_weight >= 0, ">= 0"),
              ("lipschitz_target", math.isfinite(self.lipschitz_target) and self.lipschitz_target > 0,
               "finite and > 0"))
    for name, ok, what in checks:
      if not ok:
        raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")
    _check_decays("TrainConfig.weight_decay", self.weight_decay)
    _check_strengths("TrainConfig.lipschitz_strength", [self.lipschitz_strength], self.lipschitz_penalty)
    if self.lipschitz_penalty != "none" and self.task != "classify":
      raise ValueError("TrainConfig.lipschitz_penalty needs task 'classify'")

  def to_dict(self) -> Dict[str, Any]:
    return checkpoint.jsonable(dataclasses.asdict(self))


def static_config(config: TrainConfig) -> TrainConfig:
  """``config`` with the traced hyper-parameters (λ, μ) zeroed: the key of a compiled program."""
  return dataclasses.replace(config, weight_decay=(0.0,), lipschitz_strength=0.0)


def _check_decays(name, values):
  for v in values:
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f"{name}: every λ must be finite and >= 0, got {tuple(values)}")


def _check_strengths(name, values, form):
  for v in values:
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f"{name}: every μ must be finite and >= 0, got {tuple(values)}")
    if v and form == "none":
      raise ValueError(f"{name}: μ = {v} > 0 needs TrainConfig.lipschitz_penalty (one of "
                       f"{_CHOICES['lipschitz_penalty'][1:]}), not 'none'")


class TrainResult(NamedTuple):
  """Output of :func:`train_model` (and ``adversarial_training.train_with_pool``): ``variables`` =
  {"params": ...} for ``model.apply``; ``history``: one record per epoch (``driver.run``)."""
  variables: Params
  state: TrainState
  history: List[Dict[str, Any]]


class SweepResult(NamedTuple):
  """Output of :func:`train_sweep` (and ``adversarial_training.train_with_pool_sweep``): the k members'
  ``variables`` in sweep order, the same ``stacked_variables`` (leading [k] axis), ``weight_decays``
  [k, num_layers], init ``seeds`` [k], the stacked ``state`` and ``history`` (lists of k values),
  ``lipschitz_strengths`` μ [k]."""
  variables: List[Params]
  stacked_variables: Params
  weight_decays: np.ndarray
  seeds: np.ndarray
  state: TrainState
  history: List[Dict[str, Any]]
  lipschitz_strengths: Optional[np.ndarray] = None


class Hyper(NamedTuple):
  """The traced per-member hyper-parameters (``driver``'s ``hyper``; a leading [k] axis in a sweep):
  ``weight_decay`` λ [num_layers], ``lipschitz_strength`` μ [] (unused unless ``lipschitz_penalty``)."""
  weight_decay: Array
  lipschitz_strength: Array


class PenaltyLayer(NamedTuple):
  """A weight layer as the Lipschitz penalty sees it: param ``path``, ``kind`` "dense" or "conv"; for a conv
  the circular ``grid`` (M_h, M_w) whose exact norm bounds the layer (``spectral.circular_conv_norm``) and
  its ``strides``."""
  path: Tuple[str, ...]
  kind: str
  grid: Optional[Tuple[int, int]] = None
  strides: Optional[Tuple[int, int]] = None


class Program(NamedTuple):
  """What a trainer compiles once per (model, static config, data shape); λ and seeds stay traced:
  jitted ``init(key) -> params`` (vmapped over [k] keys for a sweep), ``make_state(params, rng)``,
  ``driver.make_epoch_fn``'s ``epoch_fn``, ``summarise(stats [steps, C]) -> dict``."""
  num_layers: int
  init: Callable
  make_state: Callable
  epoch_fn: Callable
  summarise: Callable


# ----------------------------------------------------------------------------------------------------
# Loss pieces.


def _template(model, input_shape=models_lib.MNIST_SHAPE):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape)))


def decay_layer_paths(model, input_shape: Sequence[int], task: str = "classify") -> List[Tuple[str, ...]]:
  """Param paths of the decayed layers in λ order: the dense/conv layers, or (autoencode) encoder, decoder."""
  if task == "autoencode":
    return [("encoder",), ("decoder",)]
  return models_lib.weight_layer_paths(model, _template(model, input_shape), tuple(input_shape))


def weight_decay_penalty(params: Params, decays: Array, paths: Sequence[Tuple[str, ...]],
                         trainable: Optional[Sequence[str]] = None) -> Array:
  """``Σ_l ½ λ_l Σ w_l²`` over the kernels at ``paths`` (decays [num_layers]); frozen layers not decayed."""
  total = jnp.zeros((), jnp.float32)
  for l, path in enumerate(paths):
    if trainable is None or path[0] in trainable:
      total = total + decays[l] * 0.5 * jnp.sum(jnp.square(models_lib.get_param(params, path)["kernel"]))
  return total


def penalty_layers(model, input_shape: Sequence[int]) -> Tuple[PenaltyLayer, ...]:
  """The Dense/Conv layers of ``model`` on [*input_shape] inputs, forward order (= λ order), with the grid of
  each conv: ``M = ⌈(N + pad_lo + pad_hi)/s⌉`` per axis (N its input side), so that the circular norm on
  s·M is the exact norm of a circular layer and a certified upper bound on a zero-padded one (VALID with
  s | N: M = N/s, the value ``spectral.lipschitz_table`` reports). ValueError on grouped/dilated convs."""
  from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  shape = tuple(int(v) for v in input_shape)
  out = []
  for call in models_lib.trace_layers(model, _template(model, shape), shape):
    m = call.module
    if isinstance(m, nn.Dense):
      out.append(PenaltyLayer(call.path, "dense"))
    elif isinstance(m, nn.Conv):
      name = "/".join(call.path)
      if m.feature_group_count != 1 or any(d not in (None, 1) and tuple(np.ravel(d)) != (1, 1)
                                           for d in (m.input_dilation, m.kernel_dilation)):
        raise ValueError(f"lipschitz penalty: {name}: grouped or dilated convolutions are not supported")
      strides = spectral._pair(m.strides or 1, f"{name}.strides")  # pylint: disable=protected-access
      padding = ((m.padding, m.padding),) * 2 if isinstance(m.padding, int) else m.padding
      hw, window = call.input_shape[:2], tuple(m.kernel_size)
      pads = spectral.resolve_padding(padding, hw, window, strides)
      if pads == "CIRCULAR":
        spectral._check_divisible(hw, strides)  # pylint: disable=protected-access
        pads = ((0, 0), (0, 0))
      grid = tuple(-(-(n + lo + hi) // s) for n, (lo, hi), s in zip(hw, pads, strides))
      out.append(PenaltyLayer(call.path, "conv", grid, strides))
  return tuple(out)


def layer_norms(params: Params, layers: Sequence[PenaltyLayer]) -> Array:
  """σ_l [num_layers]: each layer's exact operator norm (dense: σ_max of the kernel; conv: the exact FFT norm
  on its grid, ``spectral.circular_conv_norm``), differentiable (``spectral.top_singular_value``)."""
  from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top
  norms = []
  for layer in layers:
    kernel = models_lib.get_param(params, layer.path)["kernel"]
    norms.append(spectral.top_singular_value(kernel) if layer.kind == "dense"
                 else spectral.circular_conv_norm(kernel, layer.grid, layer.strides))
  return jnp.stack(norms)


def _parseval(kernel: Array) -> Array:
  """``‖G − I‖²_F`` of the smaller Gram matrix of the kernel reshaped to [fan_in, out] (Cissé et al. 2017)."""
  w = kernel.reshape(-1, kernel.shape[-1])
  g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
  return jnp.sum(jnp.square(g - jnp.eye(g.shape[0], dtype=g.dtype)))


def lipschitz_penalty(params: Params, strength: Array, layers: Sequence[PenaltyLayer], form: str, *,
                      target: float = 1.0, trainable: Optional[Sequence[str]] = None) -> Array:
  """μ · Σ_l f(layer l) over the layers (frozen ones skipped), ``strength`` μ a traced scalar; ``form``:

  * "sum":      f = σ_l                    (the exact operator norm, ``layer_norms``)
  * "hinge":    f = max(σ_l − target, 0)²  (only norms above ``target`` cost)
  * "log":      f = log σ_l                (Σ = log of the product of the linear layers' bounds)
  * "parseval": f = ‖WᵀW − I‖²_F of the kernel reshaped to [fan_in, out] (smaller Gram side; no norm)
  """
  layers = [l for l in layers if trainable is None or l.path[0] in trainable]
  if not layers or form == "none":
    return jnp.zeros((), jnp.float32)
  if form == "parseval":
    return strength * sum(_parseval(models_lib.get_param(params, l.path)["kernel"]) for l in layers)
  sigma = layer_norms(params, layers)
  terms = {"sum": lambda: sigma, "hinge": lambda: jnp.square(jnp.maximum(sigma - target, 0.0)),
           "log": lambda: jnp.log(sigma)}[form]()
  return strength * jnp.sum(terms)


def make_penalty(model, config: TrainConfig, input_shape: Sequence[int],
                 paths: Sequence[Tuple[str, ...]]) -> Callable[[Params, Hyper], Array]:
  """``penalty(params, hyper) -> scalar``: weight decay (λ = ``hyper.weight_decay``) plus, unless
  ``config.lipschitz_penalty`` is "none", the Lipschitz penalty (μ = ``hyper.lipschitz_strength``)."""
  if config.lipschitz_penalty == "none":  # exactly the loss of before the penalty existed
    return lambda p, hyper: weight_decay_penalty(p, hyper.weight_decay, paths, config.trainable)
  layers = penalty_layers(model, input_shape)
  if [l.path for l in layers] != list(paths):
    raise ValueError(f"lipschitz penalty: layers {[l.path for l in layers]} differ from the decayed {paths}")
  return lambda p, hyper: (weight_decay_penalty(p, hyper.weight_decay, paths, config.trainable) +
                           lipschitz_penalty(p, hyper.lipschitz_strength, layers, config.lipschitz_penalty,
                                             target=config.lipschitz_target, trainable=config.trainable))


def _data_loss(model, config: TrainConfig, params, x, y, dropout_key):
  """(data loss, error) of a batch: cross-entropy and error rate, or reconstruction + sparsity and MSE."""
  variables = {"params": params}
  if config.task == "classify":
    logits = model.apply(variables, x, train=True, rngs={"dropout": dropout_key})
    error = jnp.mean((jnp.argmax(logits, -1) != y).astype(jnp.float32))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), error
  code, recon_logits = model.apply(variables, x, method="reconstruct")
  target = x.reshape(x.shape[0], -1)
  if config.recon_loss == "bce":
    recon = jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(recon_logits, target), axis=-1))
  else:
    recon = jnp.mean(0.5 * jnp.sum(jnp.square(jax.nn.sigmoid(recon_logits) - target), axis=-1))
  rho, rho_hat = config.sparsity_target, jnp.clip(jnp.mean(code, axis=0), 1e-6, 1 - 1e-6)
  kl = jnp.sum(rho * jnp.log(rho / rho_hat) + (1 - rho) * jnp.log((1 - rho) / (1 - rho_hat)))
  return recon + config.sparsity_weight * kl, jnp.mean(jnp.square(jax.nn.sigmoid(recon_logits) - target))


def make_optimizer(config: TrainConfig, steps_per_epoch: int, params: Params) -> optax.GradientTransformation:
  """The optax transformation of ``config`` (lr schedule over ``epochs * steps_per_epoch`` steps)."""
  total = config.epochs * steps_per_epoch
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "constant":
    lr = config.learning_rate
  elif warmup == 0:
    lr = optax.cosine_decay_schedule(config.learning_rate, total, alpha=config.final_lr_fraction)
  else:
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup, decay_steps=total,
        end_value=config.final_lr_fraction * config.learning_rate)
  tx = {"adam": lambda: optax.adam(lr), "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
        "sgd": lambda: optax.sgd(lr)}[config.optimizer]()
  if config.trainable is None:
    return tx
  missing = [name for name in config.trainable if name not in params]
  if missing:
    raise ValueError(f"TrainConfig.trainable names unknown params {missing}; the model has {sorted(params)}")
  labels = {name: jax.tree.map(lambda _, n=name: "train" if n in config.trainable else "frozen", sub)
            for name, sub in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def program_parts(model, config: TrainConfig, input_shape: Tuple[int, ...], num_train: int):
  """(decayed paths, optimiser, ``init(key) -> params``) of ``model`` on [1, *input_shape] inputs."""
  x0 = jnp.zeros((1,) + input_shape, jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x0)["params"]
  paths = decay_layer_paths(model, input_shape, config.task)
  if num_train < config.batch_size:   # before the schedule, which would fail on 0 steps per epoch
    raise ValueError(f"batch_size {config.batch_size} is larger than the {num_train} training examples")
  tx = make_optimizer(config, num_train // config.batch_size, params)
  return paths, tx, lambda key: model.init(key, x0)["params"]


@functools.lru_cache(maxsize=32)
def _compiled(model, config: TrainConfig, input_shape: Tuple[int, ...], num_train: int, stacked: bool):
  """The :class:`Program` of ``config``, which must be :func:`static_config` (λ and μ are the driver's
  traced ``hyper``); cached, so runs differing only in λ, μ, seeds or data values reuse one program."""
  paths, tx, init = program_parts(model, config, input_shape, num_train)
  penalty = make_penalty(model, config, input_shape, paths)

  def loss_fn(params, x, y, hyper, key):
    data_loss, error = _data_loss(model, config, params, x, y, key)
    return data_loss + penalty(params, hyper), (data_loss, error)

  def step_fn(state, t, x, y, images, labels, hyper):
    del t, images, labels
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (data_loss, err)), grads = grad_fn(state.params, x, y, hyper, key)
    return driver.apply_gradients(state, grads, tx), jnp.stack([loss, data_loss, err])

  epoch_fn = driver.make_epoch_fn(step_fn, num_train=num_train, batch_size=config.batch_size, stacked=stacked)
  return Program(len(paths), jax.jit(jax.vmap(init) if stacked else init),
                 lambda p, r: TrainState(**driver.state_fields(p, tx, r)), epoch_fn,
                 functools.partial(_summarise, config.task))


def _summarise(task: str, stats: np.ndarray) -> Dict[str, float]:
  error = "train_batch_error" if task == "classify" else "recon_mse"
  return dict(zip(("loss", "data_loss", error), map(float, np.mean(stats, axis=0))))


# ----------------------------------------------------------------------------------------------------
# Evaluation and input checks.


@functools.lru_cache(maxsize=32)
def count_errors_fn(model, stacked: bool = False) -> Callable:
  """``count(params, x, y) -> number of errors`` of a Flax model, jitted (rows with ``y = -1`` are padding;
  ``stacked``: params [k, ...], count [k]), under "highest" matmul precision so that no backend's TF32
  default changes reported errors."""
  def count(params, x, y):
    with precision_lib.scope("highest"):
      logits = model.apply({"params": params}, x)
    return jnp.sum(((jnp.argmax(logits, -1) != y) & (y >= 0)).astype(jnp.int32))

  return jax.jit(jax.vmap(count, in_axes=(0, None, None)) if stacked else count)


def evaluate(count_fn, params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int, *,
             mesh: Optional[Mesh] = None, shard_examples: bool = True) -> np.ndarray:
  """errors / N (numpy; [k] for stacked params) of ``count_fn(params, x [B, ...], y [B])`` over chunks of
  ``batch_size`` rows, the ragged tail padded with ``y = -1``. On a 1-D ``mesh``, with ``shard_examples``
  each chunk's rows are sharded (``batch_size`` rounded up to the mesh size) and ``params`` replicated;
  without, the chunk is replicated and ``params`` used as placed (e.g. sweep members sharded)."""
  n = images.shape[0]
  bs, place = min(batch_size, n), None
  if mesh is not None:
    if shard_examples:
      bs = distributed.round_up(bs, mesh.size)
      params = distributed.put_replicated(params, mesh)
    place = distributed.put_batch if shard_examples else distributed.put_replicated
  total = 0
  for start in range(0, n, bs):
    xb, yb = images[start:start + bs], labels[start:start + bs]
    if xb.shape[0] < bs:
      pad = bs - xb.shape[0]
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.full((pad,), -1, yb.dtype)])  # masked out by count_fn
    if place is None:
      total = total + np.asarray(count_fn(params, jnp.asarray(xb), jnp.asarray(yb)))
    else:  # multi-host: replicated outputs are read locally, sharded ones gathered
      a = count_fn(params, *place((xb, yb), mesh))
      if isinstance(a, jax.Array) and not a.is_fully_addressable:
        a = a.addressable_data(0) if a.is_fully_replicated else distributed.gather(a)
      total = total + np.asarray(a)
  return np.asarray(total) / n


def make_evaluate(model, eval_data, batch_size: int, members: Optional[int] = None,
                  mesh: Optional[Mesh] = None) -> Optional[Callable[[Params], Any]]:
  """``evaluate(params) -> error`` on ``eval_data`` (float; a [k] list for ``members`` stacked params);
  None without ``eval_data``. The driver's per-epoch evaluation."""
  if eval_data is None:
    return None
  ex, ey = check_data(*eval_data, name="eval_data")
  count = count_errors_fn(model, stacked=members is not None)
  mesh = distributed.data_mesh() if mesh is None else mesh
  if members is None:
    return lambda params: float(evaluate(count, params, ex, ey, batch_size, mesh=mesh))
  return lambda p: evaluate(count, p, ex, ey, batch_size, mesh=mesh, shard_examples=False)[:members].tolist()


def check_data(images, labels, name="images"):
  """(float32 images, int32 labels) of a dataset checked before anything is compiled (ValueError on
  unbatched or non-float images, NaN/inf, mismatched or non-integer labels)."""
  images, labels = np.asarray(images), np.asarray(labels)
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
  """Short content hash of a dataset (shape, labels, every 7th image, the pixel sum); not for security."""
  images = np.asarray(images, np.float32)
  h = hashlib.blake2b(digest_size=8)
  h.update(str(images.shape).encode())
  h.update(np.ascontiguousarray(np.asarray(labels, np.int32)).tobytes())
  h.update(np.ascontiguousarray(images[::7]).tobytes())
  h.update(np.float64(np.sum(images, dtype=np.float64)).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Training.


def sweep_members(num_layers: int, config: TrainConfig, weight_decays: Sequence[Any], seeds: Sequence[int],
                  who: str, lipschitz_strengths: Sequence[Optional[float]] = (None,)
                  ) -> Tuple[Hyper, List[int]]:
  """The k members of a sweep: (:class:`Hyper` of numpy float32 λ [k, num_layers] and μ [k], k seeds).
  ``weight_decays`` entries are scalars, per-layer lists or None (``config.weight_decay``);
  ``lipschitz_strengths`` entries scalars or None (``config.lipschitz_strength``); a length-1 list is
  broadcast. ValueError (starting with ``who``) on empty or mismatched lengths or a bad λ or μ."""
  weight_decays, seeds, mus = list(weight_decays), [int(s) for s in seeds], list(lipschitz_strengths)
  k = max(len(weight_decays), len(seeds), len(mus))
  if any(len(v) not in (1, k) for v in (weight_decays, seeds, mus)) or k == 0:
    raise ValueError(f"{who}: weight_decays ({len(weight_decays)}) and seeds ({len(seeds)}) and "
                     f"lipschitz_strengths ({len(mus)}) must have the same length, or length 1")
  mus = [float(config.lipschitz_strength if m is None else m) for m in (mus * k if len(mus) == 1 else mus)]
  _check_strengths(f"{who}: lipschitz_strengths", mus, config.lipschitz_penalty)
  weight_decays = weight_decays * k if len(weight_decays) == 1 else weight_decays
  decays = []
  for i, w in enumerate(weight_decays):
    values = np.atleast_1d(np.asarray(config.weight_decay if w is None else w, np.float64))
    values = np.repeat(values, num_layers) if values.shape == (1,) else values
    if values.shape != (num_layers,):
      raise ValueError(f"{who}: weight_decays[{i}]: {values.size} λ values given for a model with "
                       f"{num_layers} weight layers")
    _check_decays(f"{who}: weight_decays[{i}]", values.tolist())
    decays.append(values.astype(np.float32))
  return Hyper(np.stack(decays), np.asarray(mus, np.float32)), seeds * k if len(seeds) == 1 else seeds


def unstack(tree: Any, k: int) -> List[Any]:
  """Splits a pytree with a leading [k] axis into k pytrees."""
  return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(k)]


def _check_fits(model, params: Params, want: Params) -> None:
  """ValueError naming the first difference unless ``params`` has the structure and shapes of ``want``."""
  got_paths = {jax.tree_util.keystr(p): np.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(want)}
  diff = [f"{k}: {got_paths.get(k, 'missing')} given, {want_paths.get(k, 'none')} expected"
          for k in sorted(set(got_paths) | set(want_paths)) if got_paths.get(k) != want_paths.get(k)]
  if diff:
    raise ValueError(f"init_params do not fit {type(model).__name__}: {'; '.join(diff[:4])}")


def fit(model, images, labels, config: TrainConfig, program: Program, *, stacked: bool, weight_decays, seeds,
        data_seed: int, workdir, eval_data, stop_after_epoch, mesh, who: str, prefix: str = "",
        init_params: Optional[Params] = None, run_info: Optional[Dict[str, Any]] = None,
        lipschitz_strengths: Sequence[Optional[float]] = (None,)):
  """Every trainer's run on checked data: members' λ and μ (:func:`sweep_members`), keys
  ``split(PRNGKey(seed))`` (init, rng), fresh states, ``driver.run``. Returns a :class:`TrainResult`, or
  (``stacked``) a :class:`SweepResult`; ``run_info`` adds entries to the settings guarded in the workdir."""
  hyper, seeds = sweep_members(program.num_layers, config, weight_decays, seeds, who, lipschitz_strengths)
  decays, mus = hyper
  keys = jnp.stack([jax.random.split(jax.random.PRNGKey(s)) for s in seeds])  # [k, 2 (init, rng), 2]
  if stacked:
    state = jax.vmap(program.make_state)(program.init(keys[:, 0]), keys[:, 1])
  else:
    if init_params and "params" not in init_params:   # bare params, as a Flax init's ["params"]
      init_params = {"params": init_params}
    if init_params:
      _check_fits(model, init_params["params"], jax.eval_shape(program.init, keys[0, 0]))
    params = jax.tree.map(jnp.copy, init_params["params"]) if init_params else program.init(keys[0, 0])
    state, decays, mus = program.make_state(params, keys[0, 1]), decays[0], mus[0]
  members = len(seeds) if stacked else None
  run_info = {"config": config.to_dict(), "seeds": seeds, "data_seed": int(data_seed),
              "weight_decays": decays.tolist(), "num_train": int(images.shape[0]),
              "data_fingerprint": data_fingerprint(images, labels), "model": repr(model),
              **({"lipschitz_strengths": mus.tolist()} if config.lipschitz_penalty != "none" else {}),
              **(run_info or {})}
  evaluate_fn = make_evaluate(model, eval_data, config.eval_batch_size, members, mesh) \
      if config.task == "classify" else None
  state, history = driver.run(
      state, program.epoch_fn, images, labels, Hyper(jnp.asarray(decays), jnp.asarray(mus)),
      epochs=config.epochs, data_seed=data_seed,
      summarise=program.summarise, evaluate=evaluate_fn, checkpoint_every=config.checkpoint_every,
      workdir=workdir, run_info=run_info, stop_after_epoch=stop_after_epoch, members=members, mesh=mesh,
      prefix=prefix)
  variables = {"params": state.params}
  if not stacked:
    return TrainResult(variables, state, history)
  return SweepResult(unstack(variables, len(seeds)), variables, decays, np.asarray(seeds), state, history,
                     mus)


def check_label_range(model, images, labels, name="labels") -> int:
  """The number of classes K of ``model`` (its logits' last axis, by ``jax.eval_shape``); ValueError unless
  every label lies in [0, K)."""
  x0 = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), jnp.float32)
  k = int(jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.PRNGKey(0), x0), x0).shape[-1])
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(f"{name} must lie in [0, {k}) for a model of {k} classes, got [{labels.min()}, "
                     f"{labels.max()}]")
  return k


def _train(model, images, labels, config: TrainConfig, stacked: bool, **kw):
  images, labels = check_data(images, labels)
  if config.task == "classify":
    check_label_range(model, images, labels)
    if kw.get("eval_data") is not None:
      check_label_range(model, *check_data(*kw["eval_data"], name="eval_data"), name="eval_data labels")
  program = _compiled(model, static_config(config), tuple(images.shape[1:]), images.shape[0], stacked)
  return fit(model, images, labels, config, program, stacked=stacked, **kw)


def train_model(model, images, labels, config: TrainConfig, *, seed: int = 0, data_seed: Optional[int] = None,
                workdir: Optional[str] = None, eval_data: Optional[Tuple[Any, Any]] = None,
                init_params: Optional[Params] = None, stop_after_epoch: Optional[int] = None,
                mesh: Optional[Mesh] = None) -> TrainResult:
  """Trains one model (a ``models`` Linen module) on images [N, ...] float32 in [0, 1], labels [N] int;
  resumes from ``workdir/ckpt`` when a checkpoint is there. ``seed``: init and dropout; ``data_seed``:
  per-epoch shuffling (default ``seed``); ``workdir``: checkpoints, ``metrics.jsonl``, ``run_config.json``
  (None: nothing written); ``eval_data``: (images, labels) evaluated each epoch; ``init_params``:
  {"params": ...} or bare params (shapes checked) instead of a random init; ``stop_after_epoch``: return
  after this epoch as if interrupted.
  ValueError on bad data, a λ list of the wrong length, or a workdir holding a run with other settings."""
  return _train(model, images, labels, config, False, weight_decays=[None], seeds=[seed],
                data_seed=seed if data_seed is None else data_seed, workdir=workdir, eval_data=eval_data,
                init_params=init_params, stop_after_epoch=stop_after_epoch, mesh=mesh,
                who="TrainConfig.weight_decay")


def train_sweep(model, images, labels, config: TrainConfig, *, weight_decays: Sequence[Any] = (None,),
                seeds: Sequence[int] = (0,), data_seed: int = 0, workdir: Optional[str] = None,
                eval_data: Optional[Tuple[Any, Any]] = None, stop_after_epoch: Optional[int] = None,
                mesh: Optional[Mesh] = None,
                lipschitz_strengths: Sequence[Optional[float]] = (None,)) -> SweepResult:
  """Trains k models that differ only in λ, μ (``lipschitz_strengths``, with ``config.lipschitz_penalty``)
  and/or init seed (:func:`sweep_members`) as ONE program: the step vmapped over states stacked on a
  leading [k] axis, the same batches for all (``data_seed``); member i ends where ``train_model(...,
  weight_decay=λ_i, lipschitz_strength=μ_i, seed=seeds[i], data_seed=data_seed)`` does, up to float
  rounding. Members are sharded over the 1-D ``mesh`` (default all devices; padded with copies of member 0,
  dropped from all outputs). Other arguments as in :func:`train_model`."""
  return _train(model, images, labels, config, True, weight_decays=weight_decays, seeds=seeds,
                data_seed=data_seed, workdir=workdir, eval_data=eval_data, stop_after_epoch=stop_after_epoch,
                mesh=mesh, who="train_sweep", prefix="[sweep] ", lipschitz_strengths=lipschitz_strengths)


# ----------------------------------------------------------------------------------------------------
# Recipes and get_or_train.

_SIGMOID = dict(epochs=40, batch_size=128, optimizer="adam", learning_rate=1e-2, schedule="cosine",
                weight_decay=(1e-5, 1e-5, 1e-6))
_FC10 = dict(epochs=20, batch_size=128, optimizer="adam", learning_rate=3e-3, schedule="cosine")

# Default recipe per named model: {"model": get_model name, "config": TrainConfig kwargs, "pretrain":
# TrainConfig kwargs of an unsupervised stage (AE only)}. Evidence: notes/models.md.
RECIPES: Dict[str, Dict[str, Any]] = {
    **{"fc10" + tag: {"model": "fc10", "config": dict(_FC10, weight_decay=(wd,))}
       for tag, wd in (("", 1e-4), ("-1e-4", 1e-4), ("-1e-2", 1e-2), ("-1", 1.0))},
    **{n: {"model": n, "config": dict(_SIGMOID)} for n in ("fc100-100-10", "fc200-200-10", "fc123-456-10")},
    # Table 3 (30000 training images): 10x Table 1's λ meets every Table 3 goal (notes/models.md).
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


def recipe(name: str) -> Dict[str, Any]:
  """The recipe of ``name``: a key of ``RECIPES`` or any "fc<w1>-<w2>-10" (the sigmoid recipe)."""
  key = name.lower()
  if key in RECIPES:
    return RECIPES[key]
  widths = models_lib.model_name_widths(key)
  if widths and len(widths) == 2 and key.endswith("-10"):   # its λ: two hidden layers, 10 classes
    return {"model": key, "config": dict(_SIGMOID)}
  raise ValueError(f"no training recipe for {name!r}; known: {', '.join(sorted(RECIPES))} or any "
                   "'fc<w1>-<w2>-10'")


def load_run(run_dir: str, model, input_shape: Sequence[int] = models_lib.MNIST_SHAPE) -> Tuple[Params, Dict]:
  """(variables, result.json contents) of a finished run; the variables' shapes are checked against
  ``model`` on ``input_shape`` (a file of another architecture names the differing shapes)."""
  result = checkpoint.read_json(os.path.join(run_dir, "result.json"))
  variables = checkpoint.load_pytree(os.path.join(run_dir, "final.msgpack"), _template(model, input_shape))
  return jax.tree.map(jnp.asarray, variables), result


def default_run_name(name: str, *, seed: int = 0, epochs: Optional[int] = None,
                     overrides: Optional[Dict[str, Any]] = None, data_tag: str = "") -> str:
  """``name`` [+ ``_<data_tag>``] [+ ``_seed<seed>``] [+ ``_<hash of epochs/overrides>``]."""
  run_name = name.lower() + (f"_{data_tag}" if data_tag else "") + (f"_seed{seed}" if seed else "")
  if overrides or epochs is not None:
    tag = json.dumps({"epochs": epochs, **(overrides or {})}, sort_keys=True, default=str)
    run_name += "_" + hashlib.blake2b(tag.encode(), digest_size=4).hexdigest()
  return run_name


def _resolve(name: str, epochs: Optional[int], overrides: Dict[str, Any], model_kwargs: Dict[str, Any]):
  """(recipe, TrainConfig, pre-training TrainConfig or None, run-name extras) of a request; validated."""
  rec = recipe(name)
  bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
  if bad:
    raise ValueError(f"get_or_train: unknown TrainConfig overrides {bad}")
  epochs_kw = {} if epochs is None else {"epochs": epochs}
  config = TrainConfig(**{**rec["config"], **overrides, **epochs_kw})
  pre_cfg = TrainConfig(**{**rec["pretrain"], **epochs_kw}) if "pretrain" in rec else None
  return rec, config, pre_cfg, dict(overrides, **({"model_kwargs": model_kwargs} if model_kwargs else {}))


def _train_recipe(name, model, config, pre_cfg, images, labels, *, seed, run_dir, eval_data):
  """Trains a recipe (with its autoencoder pre-training stage, if any); returns (variables, result)."""
  timer = time.perf_counter()
  if pre_cfg is None:
    variables = train_model(model, images, labels, config, seed=seed, workdir=os.path.join(run_dir, "train"),
                            eval_data=eval_data).variables
  else:  # softmax regression on the frozen code, computed once (= training "output" alone)
    pre = train_model(model, images, labels, pre_cfg, seed=seed, workdir=os.path.join(run_dir, "pretrain"))
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    codes = lambda x: np.concatenate([np.asarray(encode(pre.variables, jnp.asarray(x[i:i + 5000])))
                                      for i in range(0, x.shape[0], 5000)])
    eval_codes = None if eval_data is None else (codes(eval_data[0]), eval_data[1])
    head = models_lib.FC10(num_classes=model.num_classes)
    res = train_model(head, codes(images), labels, config, seed=seed, workdir=os.path.join(run_dir, "train"),
                      eval_data=eval_codes)
    variables = {"params": {**pre.variables["params"], "output": res.variables["params"]["output"]}}
  result = {"name": name, "config": config.to_dict(), "train_seconds": time.perf_counter() - timer,
            "num_train": int(images.shape[0]),
            "train_error": metrics.error_rate(model.apply, variables, images, labels)}
  if eval_data is not None:
    result["eval_error"] = metrics.error_rate(model.apply, variables, *eval_data)
  logging.info("get_or_train: %s trained in %.0f s, train error %.2f%%", name, result["train_seconds"],
               100 * result["train_error"])
  logging.vlog(1, "get_or_train: %s: %s", name, result)
  return variables, result


def get_or_train(name: str, images, labels, *, workdir: str, seed: int = 0, epochs: Optional[int] = None,
                 run_name: Optional[str] = None, eval_data: Optional[Tuple[Any, Any]] = None,
                 model_kwargs: Optional[Dict[str, Any]] = None, **overrides: Any) -> Tuple[Any, Params]:
  """(model, variables) of the named model (:func:`recipe`) trained with its recipe in
  ``workdir/<run_name>`` (default :func:`default_run_name`), restored when finished there with the same
  settings and data (``driver.restore_or_run``), resumed when interrupted. ``epochs`` overrides both
  stages' epochs; ``model_kwargs``: module attributes (e.g. ``{"dropout_rate": 0.5}``); ``overrides``:
  ``TrainConfig`` fields replacing the recipe's. ValueError on an unknown name or override, or a run
  directory of other settings or data (the differing ones named)."""
  model_kwargs = dict(model_kwargs or {})
  rec, config, pre_cfg, extra = _resolve(name, epochs, overrides, model_kwargs)
  model = models_lib.get_model(rec["model"], **model_kwargs)
  run_name = run_name or default_run_name(name, seed=seed, epochs=epochs, overrides=extra)
  images, labels = check_data(images, labels)
  eval_data = None if eval_data is None else check_data(*eval_data, name="eval_data")
  settings = {"model": rec["model"], "model_kwargs": model_kwargs, "seed": seed, "config": config.to_dict(),
              "pretrain_config": pre_cfg and pre_cfg.to_dict(),
              "data_fingerprint": data_fingerprint(images, labels)}
  run_dir = os.path.join(workdir, run_name)
  variables, _ = driver.restore_or_run(
      run_dir, settings, lambda: _train_recipe(name, model, config, pre_cfg, images, labels, seed=seed,
                                               run_dir=run_dir, eval_data=eval_data),
      target=_template(model, images.shape[1:]), who=f"get_or_train({name})")
  return model, variables


# ----------------------------------------------------------------------------------------------------
# The experiment of scripts/train.py.


def run_experiment(config, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Trains (or restores) ``config.model`` (``configs/train.py``'s ConfigDict, validated before loading
  data) with its recipe and overrides; ``sweep_weight_decays``: one vmapped ``train_sweep`` in
  ``workdir/<run name>_sweep``. Writes ``errors.json`` in the run directory; returns and logs its errors."""
  overrides = {k: v for k, v in config.overrides.items() if v is not None}
  model_kwargs = {k: v for k, v in config.model_kwargs.items() if v is not None}
  rec, train_config, _, extra = _resolve(config.model, config.epochs, overrides, model_kwargs)
  sweep = list(config.sweep_weight_decays)
  if sweep and "pretrain" in rec:
    raise ValueError("sweep_weight_decays does not support a recipe with pre-training (ae400-10)")
  if config.split not in ("full", "p1", "p2"):
    raise ValueError(f"split must be 'full', 'p1' or 'p2', got {config.split!r}")
  (x, y), test = data_lib.load_mnist("train", data_dir), data_lib.load_mnist("test", data_dir)
  p1, p2 = data_lib.split_p1_p2(x, y)
  train_set = {"full": (x, y), "p1": p1, "p2": p2}[config.split]
  tag = "" if config.split == "full" else config.split
  run_name = default_run_name(config.model, seed=config.seed, epochs=config.epochs,
                              overrides=dict(extra, sweep=sweep) if sweep else extra, data_tag=tag)
  sets = {"train": train_set, "test": test, **({"p1": p1, "p2": p2} if tag else {})}
  model = models_lib.get_model(rec["model"], **model_kwargs)
  if sweep:
    run_dir = os.path.join(workdir, run_name + "_sweep")
    res = train_sweep(model, *train_set, train_config, weight_decays=sweep, seeds=[config.seed],
                      data_seed=config.seed, workdir=run_dir, eval_data=test)
    members = [(v, {"weight_decay": lam.tolist()}) for lam, v in zip(res.weight_decays, res.variables)]
  else:
    run_dir = os.path.join(workdir, run_name)
    model, variables = get_or_train(config.model, *train_set, workdir=workdir, seed=config.seed,
                                    epochs=config.epochs, run_name=run_name, eval_data=test,
                                    model_kwargs=model_kwargs or None, **overrides)
    members = [(variables, {})]
  rows = [{**row, **{f"{k}_error": metrics.error_rate(model.apply, v, *s) for k, s in sets.items()}}
          for v, row in members]
  out = {"model": config.model, "split": config.split, "run_dir": run_dir, "rows": rows}
  checkpoint.atomic_write_json(os.path.join(run_dir, "errors.json"), out)
  for row in rows:
    logging.info("%s [%s]: %s", config.model, config.split, row)
  return out
