"""Adversarial training with pools of adversarial examples (paper §4.2, paper.md §4.5 and §9 A21).

Usage::

    from intriguing_jax import adversarial_training as at, data, models, train

    images, labels = data.load_mnist("train")
    model = models.get_model("fc100-100-10")
    config = train.TrainConfig(epochs=40, weight_decay=(1e-5, 1e-5, 1e-6))      # weight decay, no dropout
    pool_config = at.PoolConfig(layers=("input", "hidden_0", "hidden_1"), pool_size=5000,
                                refresh_every=50, refresh_fraction=0.05, mix_ratio=0.5)
    result = at.train_with_pool(model, images, labels, config, pool_config, workdir="runs/adv")
    result.variables                    # {"params": ...} for model.apply; resumes from workdir/ckpt

    # k models (seeds and/or λ) as ONE vmapped program; member i is train_with_pool(seed=seeds[i], data_seed=0,
    # config with weight_decay=weight_decays[i]) computed with vmap's float rounding:
    sweep = at.train_with_pool_sweep(model, images, labels, config, pool_config, seeds=range(8), data_seed=0)
    sweep.variables[3]                  # seed 3's {"params": ...}; sweep.history[-1]["loss"] is a [8] list

    # The same machinery for any model and loss, from pure functions (params -> logits):
    layers = [at.PoolLayer("input", feature_fn=lambda p, x: x, head_fn=my_apply, box=(0.0, 1.0))]
    epoch_fn = at.make_epoch_fn(my_apply, layers, tx, pool_config, batch_size=128, num_train=n,
                                loss_fn=my_per_example_loss, penalty_fn=my_penalty)

The method. The paper trained a 100-100-10 sigmoid network to below 1.2% test error "by keeping a pool of
adversarial examples a random subset of which is continuously replaced by newly generated adversarial
examples and which is mixed into the original training set all the time", with one pool per layer: the
examples of layer k are perturbed layer-k activations, found by the attack run on the sub-network above
layer k, and "used to train all the layers above". Sizes, rates and schedules are not given (A21); every
one of them is a ``PoolConfig`` field. Here:

* One pool per entry of ``PoolConfig.layers``: ``pool_size`` stored inputs of the layer (pixels for
  "input", post-activation features for a hidden layer) with the TRUE label of the clean example.
* Generation (``generate_adversarial``): training examples drawn at random, mapped to the layer by
  ``feature_fn``, attacked through ``head_fn`` (the network above the layer) by the attack engine
  (``attack.py``: box-constrained L-BFGS with a c grid) with cheap settings (few iterations, two c values,
  no bisection by default), toward random wrong targets (or untargeted).
* Schedule: ``warmup_steps`` of clean training, then the pools are filled completely (in chunks of
  ``refresh_size`` examples) with the current network, then every ``refresh_every`` steps a random
  ``refresh_fraction`` of each pool is replaced by new examples of the current network.
* Mixing: every training step uses ``batch_size`` clean examples plus, from each pool, a uniform sample,
  so that pool examples make up ``mix_ratio`` of the mixed batch (split evenly over the pools). The loss is
  the mean per-example loss over the whole mixed batch (pool-k examples through ``head_fn`` of layer k, so
  they only train the layers above k) plus the penalty. Before the pools are filled the pool part has
  weight zero.

Everything runs in one jitted ``lax.scan`` per epoch (the refresh is a ``lax.cond`` branch inside it,
executed only on refresh steps; in a sweep, the branch is taken for all members together and runs one
vmapped attack over their k x refresh_size examples). A run checkpoints, atomically, its whole state
(params, optimiser, pools, the step of birth of every pool entry, rng) each epoch and resumes from the
last one; the data order, pool samples and attack targets derive from ``fold_in(key, step)``, so a
resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from intriguing_jax import attack as attack_lib
from intriguing_jax import checkpoint
from intriguing_jax import models as models_lib
from intriguing_jax import progress
from intriguing_jax import train as train_lib
from intriguing_jax.types import Array, Params, PRNGKey

__all__ = [
    "PoolConfig", "PoolLayer", "PoolTrainState", "PoolTrainResult", "model_pool_layers", "mlp_head_fn",
    "generate_adversarial", "make_generate_fn", "init_state", "mixed_batch_sizes", "sample_mixed_batch", "make_epoch_fn",
    "train_with_pool", "train_with_pool_sweep", "PoolSweepResult", "softmax_cross_entropy",
    "pool_schedule",
]

INPUT = "input"
_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu}

# Salts of the per-step keys derived from the state's rng (fold_in(fold_in(rng, salt), step)).
_SALT_REFRESH, _SALT_SAMPLE, _SALT_DROPOUT = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """Static settings of the adversarial pools (paper.md A21: all unspecified in the paper).

  Attributes:
    layers: which pools: "input" (pixels) and/or feature names of the model (e.g. "hidden_0").
    pool_size: stored examples per pool.
    refresh_every: steps between two refreshes.
    refresh_fraction: fraction of each pool replaced by new examples at each refresh; the number of new
      examples per pool and refresh is ``refresh_size = max(1, round(refresh_fraction * pool_size))``.
    mix_ratio: fraction of each mixed training batch drawn from the pools (all pools together), in (0, 1).
    warmup_steps: clean training steps before the pools are filled and mixed in.
    untargeted: attack away from the true label instead of toward a random wrong target.
    maxiter: L-BFGS-B iterations per solve (cheap: the pools need many examples, not minimal ones).
    history_size: L-BFGS memory.
    tol: L-BFGS-B projected-gradient tolerance.
    c_grid: penalty weights of the pool attack (the engine's default continuous schedule tries them from
      the largest down and keeps the first success).
    num_bisection: bisection rounds on c after the grid (0: none).
    refine: move each success back toward the clean point, to the decision boundary (attack.py step 3);
      without it the c-grid minimiser overshoots deep into the target class. Skipped when
      ``perturbation_rms`` is set: the refinement only slides the point along the same direction, which
      the RMS rescaling discards (the stored examples are the same to float32 round-off; measured on the
      trained FC100-100-10: at most 1.2e-7 apart), so it would only cost time.
    refine_rounds: rounds of the engine's linearised-boundary projection before the bisection (0: the
      cheap bisection along x -> x_adv only).
    refine_steps: bisection steps of the refinement.
    perturbation_scale: the stored example is ``clip(h + s (h_adv - h), box)`` with ``s`` this value: 1 keeps
      the attack's point (at the decision boundary when refined); s < 1 stops short of the boundary (still
      classified correctly), s > 1 pushes past it, deeper into the target class.
    pool_loss_weight: weight of one pool example relative to one clean example in the batch's mean loss
      (1: every example counts the same).
    perturbation_rms: if set, the stored example is ``clip(h + e (h_adv - h) / RMS(h_adv - h), box)`` with
      ``e`` this value: the attack's direction at a FIXED RMS distortion (the paper's measure), whatever the
      example's distance to the boundary: examples closer to the boundary than ``e`` cross it, the others
      stop short of it. Excludes ``perturbation_scale != 1``. None (default): ``perturbation_scale`` rules.
  """
  layers: Tuple[str, ...] = (INPUT,)
  pool_size: int = 5000
  refresh_every: int = 50
  refresh_fraction: float = 0.05
  mix_ratio: float = 0.5
  warmup_steps: int = 0
  untargeted: bool = False
  maxiter: int = 10
  history_size: int = 5
  tol: float = 1e-3
  c_grid: Tuple[float, ...] = (0.1, 1.0)
  num_bisection: int = 0
  refine: bool = True
  refine_rounds: int = 0
  refine_steps: int = 10
  perturbation_scale: float = 1.0
  pool_loss_weight: float = 1.0
  perturbation_rms: Optional[float] = None

  # Knobs added after the first real runs; ``to_dict`` leaves them out at their defaults so that the
  # settings stored by those runs still match (checkpoint.guard_run_config, the script's restore check).
  _LATE_DEFAULTS = (("perturbation_scale", 1.0), ("pool_loss_weight", 1.0), ("perturbation_rms", None))

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(str(l) for l in self.layers))
    object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
    if not self.layers:
      raise ValueError("PoolConfig.layers must name at least one layer (e.g. ('input',))")
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"PoolConfig.layers has duplicates: {self.layers}")
    for name in ("pool_size", "refresh_every", "maxiter", "history_size"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"PoolConfig.{name} must be an integer >= 1, got {v!r}")
    for name in ("warmup_steps", "num_bisection", "refine_rounds", "refine_steps"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"PoolConfig.{name} must be an integer >= 0, got {v!r}")
    if not 0.0 < self.refresh_fraction <= 1.0:
      raise ValueError(f"PoolConfig.refresh_fraction must be in (0, 1], got {self.refresh_fraction}")
    if not 0.0 < self.mix_ratio < 1.0:
      raise ValueError(f"PoolConfig.mix_ratio must be in (0, 1), got {self.mix_ratio}")
    optional = ("perturbation_rms",)                   # None = off
    for name in ("perturbation_scale", "pool_loss_weight") + optional:
      v = getattr(self, name)
      if v is None and name in optional:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
          math.isfinite(v) and v > 0):
        none = "None or " if name in optional else ""
        raise ValueError(f"PoolConfig.{name} must be {none}a finite number > 0, got {v!r}")
      object.__setattr__(self, name, float(v))
    if self.perturbation_rms is not None and self.perturbation_scale != 1.0:
      raise ValueError("PoolConfig: set perturbation_rms or perturbation_scale, not both "
                       f"(got {self.perturbation_rms!r} and {self.perturbation_scale!r})")
    self.attack_options((0.0, 1.0)).validate()

  @property
  def refresh_size(self) -> int:
    """New examples per pool and refresh."""
    return max(1, int(round(self.refresh_fraction * self.pool_size)))

  def attack_options(self, box: Tuple[float, float]) -> attack_lib.AttackOptions:
    """The attack engine's options for a pool whose values live in ``box``."""
    refine = self.refine and self.perturbation_rms is None  # the rescaling keeps only the direction
    return attack_lib.AttackOptions(
        untargeted=self.untargeted, box=(float(box[0]), float(box[1])), maxiter=self.maxiter,
        history_size=self.history_size, tol=self.tol, c_grid=self.c_grid, num_bisection=self.num_bisection,
        warm_start=True, refine=refine, refine_rounds=self.refine_rounds, refine_steps=self.refine_steps)

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layers"], d["c_grid"] = list(self.layers), list(self.c_grid)
    for name, default in self._LATE_DEFAULTS:
      if d[name] == default:
        del d[name]
    return d


class PoolLayer(NamedTuple):
  """One pool's layer, as pure functions of the trained parameters.

  Attributes:
    name: pool name ("input" or a feature name).
    feature_fn: ``feature_fn(params, x) -> h`` maps a batch of inputs [B, ...] to the layer's values
      [B, *layer_shape] (identity for the input layer).
    head_fn: ``head_fn(params, h) -> logits`` [B, num_classes], the network above the layer (the whole
      network for the input layer). Pool examples of this layer train only what ``head_fn`` uses.
    box: (lower, upper) bounds of the layer's values (pixels and sigmoid activations: (0, 1)).
    train_head_fn: optional ``train_head_fn(params, h, key) -> logits``, the head as trained (e.g. with
      dropout drawn from ``key``), used for the pool examples' loss; None = ``head_fn``. The attack always
      uses the deterministic ``head_fn``.
  """
  name: str
  feature_fn: Callable[[Params, Array], Array]
  head_fn: Callable[[Params, Array], Array]
  box: Tuple[float, float] = (0.0, 1.0)
  train_head_fn: Optional[Callable[[Params, Array, PRNGKey], Array]] = None


class PoolTrainState(struct.PyTreeNode):
  """Everything a resumed run needs (checkpointed each epoch).

  Attributes:
    step: int32 [] optimiser steps taken.
    epoch: int32 [] completed epochs.
    params: trained parameters (for Flax models the "params" collection).
    opt_state: optax state.
    rng: uint32 [2] base key; step t draws its keys from ``fold_in(fold_in(rng, salt), t)``.
    pools: name -> [pool_size, *layer_shape] stored adversarial layer values.
    pool_labels: name -> [pool_size] int32 true labels.
    pool_born: name -> [pool_size] int32 step at which each entry was generated (-1: never filled).
    filled: bool [] whether the pools have been filled (pool examples count in the loss from then on).
    num_refreshes: int32 [] refresh events so far (the initial fill counts as one).
  """
  step: Array
  epoch: Array
  params: Params
  opt_state: Any
  rng: PRNGKey
  pools: Dict[str, Array]
  pool_labels: Dict[str, Array]
  pool_born: Dict[str, Array]
  filled: Array
  num_refreshes: Array


class PoolTrainResult(NamedTuple):
  """Output of :func:`train_with_pool`: ``variables`` = {"params": ...} for ``model.apply``."""
  variables: Params
  state: PoolTrainState
  history: List[Dict[str, Any]]


# ----------------------------------------------------------------------------------------------------
# Layers of a Flax model.


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example cross-entropy [B] (the default ``loss_fn``)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mlp_head_fn(model, feature: str, *, dropout_rate: float = 0.0) -> Callable[..., Array]:
  """``head(params, h, key=None) -> logits``: the layers of ``model`` above its feature ``feature``.

  With ``dropout_rate`` > 0 and a ``key``, dropout is applied to the input of every dense layer of the head
  (inverted dropout, as ``models.SigmoidMLP`` does when training: dropout on the input of every dense layer
  after the first); without a key the head is deterministic.

  Built from ``model.architecture()`` (dense, sigmoid, relu, flatten, dropout = identity at evaluation,
  softmax = the logits), so it covers the fully connected models (SigmoidMLP, FC10, AE400-10).

  Args:
    model: a module of ``models`` with ``architecture()``.
    feature: a key of the model's ``return_features`` dict.

  Raises:
    ValueError: unknown feature, or a layer above it that is not fully connected (conv, pooling...):
      pass a hand-written ``PoolLayer`` for such models.
  """
  arch = model.architecture()
  idx = [i for i, d in enumerate(arch) if d.get("feature") == feature]
  if not idx:
    known = [d["feature"] for d in arch if "feature" in d]
    raise ValueError(f"mlp_head_fn: {type(model).__name__} has no feature {feature!r}; known: {known}")
  i = idx[0]
  rest = arch[i + 1:]
  if arch[i]["type"] in ("dense", "conv") and rest and rest[0]["type"] in _ACTIVATIONS:
    rest = rest[1:]  # the feature is post-activation: that activation is already applied
  for d in rest:
    if d["type"] not in ("dense", "flatten", "dropout", "softmax") and d["type"] not in _ACTIVATIONS:
      raise ValueError(f"mlp_head_fn: layer {d['name']!r} of type {d['type']!r} above {feature!r} is not "
                       "supported; build a PoolLayer with your own head_fn")
  rest = tuple((d["type"], tuple(d.get("param_path", ()))) for d in rest)

  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"mlp_head_fn: dropout_rate must be in [0, 1), got {dropout_rate}")

  def head(params, h, key=None):
    for i, (kind, path) in enumerate(rest):
      if kind == "dense":
        if key is not None and dropout_rate > 0:
          keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout_rate, h.shape)
          h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0)
        layer = models_lib.get_param(params, path)
        h = h @ layer["kernel"] + layer["bias"][None, :]
      elif kind == "flatten":
        h = h.reshape(h.shape[0], -1)
      elif kind in _ACTIVATIONS:
        h = _ACTIVATIONS[kind](h)
    return h

  return head


def model_pool_layers(model, names: Sequence[str], *, box: Tuple[float, float] = (0.0, 1.0)) -> List[PoolLayer]:
  """PoolLayers of a Flax model whose parameters are the "params" collection.

  "input" attacks the whole network (``model.apply``); a feature name attacks the layers above it
  (:func:`mlp_head_fn`), its values given by ``model.apply(..., return_features=True)``. For a
  ``models.SigmoidMLP`` with dropout, the pool examples are trained through the network with dropout
  (``train_head_fn``: ``model.apply(train=True)`` for "input", the head with dropout on the input of each
  dense layer for hidden features); the attack and the features use the network without dropout.

  Args:
    model: a module of ``models``.
    names: pool names, e.g. ("input", "hidden_0", "hidden_1").
    box: bounds of every pool's values ((0, 1) fits pixels and sigmoid activations).
  """
  layers = []
  rate = _dropout_rates(model)
  for name in names:
    if name == INPUT:
      train_head = functools.partial(_train_apply, model) if any(rate) else None
      layers.append(PoolLayer(INPUT, _identity_features, functools.partial(_apply_params, model), box, train_head))
    else:
      head = mlp_head_fn(model, name, dropout_rate=rate[1])
      layers.append(PoolLayer(name, functools.partial(_model_feature, model, name), head, box,
                              head if rate[1] else None))
  return layers


def _dropout_rates(model) -> Tuple[float, float]:
  """(input_dropout_rate, dropout_rate) of a model; dropout is supported for ``models.SigmoidMLP`` only."""
  rates = (float(getattr(model, "input_dropout_rate", 0.0) or 0.0), float(getattr(model, "dropout_rate", 0.0) or 0.0))
  if any(rates) and not isinstance(model, models_lib.SigmoidMLP):
    raise ValueError(f"adversarial_training supports dropout only for models.SigmoidMLP, not "
                     f"{type(model).__name__}; pass PoolLayers and train_apply_fn of your own")
  return rates


def _train_apply(model, params, x, key):
  return model.apply({"params": params}, x, train=True, rngs={"dropout": key})


def _identity_features(params, x):
  del params
  return x


def _apply_params(model, params, x):
  return model.apply({"params": params}, x)


def _model_feature(model, name, params, x):
  return model.apply({"params": params}, x, return_features=True)[1][name]


# ----------------------------------------------------------------------------------------------------
# Generation, pools, mixed batches.


def generate_adversarial(layer: PoolLayer, params: Params, x: Array, labels: Array, key: PRNGKey,
                         config: PoolConfig, num_classes: int) -> Tuple[Array, attack_lib.AttackResult]:
  """Adversarial layer values for a batch of clean inputs, with the attack engine (pure, jittable).

  Args:
    layer: the pool's layer.
    params: current parameters (traced).
    x: [R, ...] clean inputs.
    labels: [R] their true labels.
    key: draws the random wrong targets (unused when ``config.untargeted``).
    config: attack settings (``maxiter``, ``c_grid``, ...).
    num_classes: number of classes.

  Returns:
    (h_adv [R, *layer_shape], AttackResult of the engine, on the layer's values). ``h_adv`` is the
    engine's ``x_adv`` moved along ``x_adv - h`` by ``config.perturbation_scale``, or to the RMS distance
    ``config.perturbation_rms`` along it (and clipped to the box); the AttackResult is the engine's, unscaled.
    An example whose attack did not move it (zero direction) stays at ``h``.
  """
  h = jax.lax.stop_gradient(layer.feature_fn(params, x))
  target = labels if config.untargeted else attack_lib.random_targets(key, labels, num_classes)
  params = jax.lax.stop_gradient(params)
  # The engine as a pure function, traced inline (attack.lbfgs_attack checks inputs on the host and
  # cannot run under jit).
  attack_fn = attack_lib.make_attack(layer.head_fn, options=config.attack_options(layer.box))
  res = attack_fn(params, h, target.astype(jnp.int32))
  h_adv = res.x_adv
  if config.perturbation_rms is not None:
    h_adv = place_at_rms(h, h_adv, config.perturbation_rms, layer.box)
  elif config.perturbation_scale != 1.0:
    h_adv = jnp.clip(h + config.perturbation_scale * (h_adv - h), layer.box[0], layer.box[1])
  return jax.lax.stop_gradient(h_adv), res


def place_at_rms(h: Array, h_adv: Array, rms: float, box: Tuple[float, float]) -> Array:
  """``clip(h + rms (h_adv - h) / RMS(h_adv - h), box)`` per example: the direction h -> h_adv at RMS ``rms``.

  Rows with ``h_adv == h`` (no direction) stay at ``h``. ``PoolConfig.perturbation_rms``'s placement.
  """
  delta = h_adv - h
  norm = jnp.sqrt(jnp.mean(jnp.square(delta.reshape(delta.shape[0], -1)), axis=1))
  factor = jnp.where(norm > 0, rms / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jnp.clip(h + factor.reshape((-1,) + (1,) * (delta.ndim - 1)) * delta, box[0], box[1])


def make_generate_fn(layers: Sequence[PoolLayer], config: PoolConfig, num_classes: int):
  """``generate(params, images, labels, key) -> {name: (h_adv, AttackResult)}``, jitted.

  One refresh's worth of generation (``config.refresh_size`` random source examples per pool) outside the
  training loop: for timing the generation against the training steps, and for inspecting the pools.
  """
  r = config.refresh_size

  def generate(params, images, labels, key):
    out = {}
    for i, layer in enumerate(layers):
      k_src, k_tgt = jax.random.split(jax.random.fold_in(key, i))
      idx = jax.random.randint(k_src, (r,), 0, images.shape[0])
      out[layer.name] = generate_adversarial(layer, params, images[idx], labels[idx], k_tgt, config, num_classes)
    return out

  return jax.jit(generate)


def mixed_batch_sizes(batch_size: int, config: PoolConfig) -> Dict[str, int]:
  """Examples drawn from each pool per step for ``batch_size`` clean examples.

  The pools together give ``round(batch_size * r / (1 - r))`` examples (r = ``mix_ratio``), split evenly
  over the pools (the remainder to the first ones).

  Raises:
    ValueError: when that leaves a pool with no example.
  """
  r = config.mix_ratio
  total = int(round(batch_size * r / (1.0 - r)))
  k = len(config.layers)
  if total < k:
    raise ValueError(f"mix_ratio={r} with batch_size={batch_size} gives {total} pool examples per step, "
                     f"fewer than the {k} pools; raise mix_ratio or batch_size")
  base, extra = divmod(total, k)
  return {name: base + (1 if i < extra else 0) for i, name in enumerate(config.layers)}


def sample_mixed_batch(state: PoolTrainState, key: PRNGKey, sizes: Dict[str, int]) -> Dict[str, Tuple[Array, Array]]:
  """Uniform samples (with replacement) from each pool: name -> (h [b_k, ...], labels [b_k])."""
  out = {}
  for i, (name, b) in enumerate(sizes.items()):
    size = state.pool_labels[name].shape[0]
    idx = jax.random.randint(jax.random.fold_in(key, i), (b,), 0, size)
    out[name] = (state.pools[name][idx], state.pool_labels[name][idx])
  return out


def pool_schedule(step: int, config: PoolConfig) -> str:
  """What happens to the pools before step ``step`` (0-based): "fill", "refresh" or "none"."""
  if step == config.warmup_steps:
    return "fill"
  if step > config.warmup_steps and (step - config.warmup_steps) % config.refresh_every == 0:
    return "refresh"
  return "none"


def init_state(layers: Sequence[PoolLayer], params: Params, tx: optax.GradientTransformation, x_example: Array,
               config: PoolConfig, rng: PRNGKey) -> PoolTrainState:
  """A fresh state: empty pools shaped like each layer's values for ``x_example`` ([1, ...] input)."""
  pools, pool_labels, pool_born = {}, {}, {}
  for layer in layers:
    spec = jax.eval_shape(layer.feature_fn, params, x_example)
    pools[layer.name] = jnp.zeros((config.pool_size,) + tuple(spec.shape[1:]), spec.dtype)
    pool_labels[layer.name] = jnp.zeros((config.pool_size,), jnp.int32)
    pool_born[layer.name] = jnp.full((config.pool_size,), -1, jnp.int32)
  return PoolTrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), rng=rng, pools=pools, pool_labels=pool_labels,
                        pool_born=pool_born, filled=jnp.zeros((), bool), num_refreshes=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# The compiled epoch.

# Per-step statistics, in this order; the per-pool ones are appended for each pool.
STEP_STATS = ("loss", "data_loss", "clean_loss", "pool_loss", "clean_error", "pool_error", "refreshed")
POOL_STATS = ("attack_success", "attack_distortion")


def make_epoch_fn(apply_fn: Callable[[Params, Array], Array], layers: Sequence[PoolLayer],
                  tx: optax.GradientTransformation, config: PoolConfig, *, batch_size: int, num_train: int,
                  num_classes: int, loss_fn: Callable[[Array, Array], Array] = softmax_cross_entropy,
                  penalty_fn: Optional[Callable[..., Array]] = None,
                  train_apply_fn: Optional[Callable[[Params, Array, PRNGKey], Array]] = None,
                  stacked: bool = False):
  """The jitted epoch of pool training, for any model and loss given as pure functions.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` [B, num_classes] of clean inputs.
    layers: one PoolLayer per pool, in ``config.layers`` order.
    tx: the optimiser.
    config: pool settings.
    batch_size: clean examples per step; the pools add ``mixed_batch_sizes(batch_size, config)``.
    num_train: training set size; an epoch is ``num_train // batch_size`` steps.
    num_classes: number of classes (random attack targets).
    loss_fn: ``loss_fn(logits, labels) -> [B]`` per-example loss.
    penalty_fn: ``penalty_fn(params) -> scalar`` added to the mean loss (e.g. weight decay); None = 0.
      With a ``hyper`` argument (stacked epochs): ``penalty_fn(params, hyper_i)``, member i's hyper-parameters.
    train_apply_fn: optional ``train_apply_fn(params, x, key) -> logits`` for the clean examples' loss (e.g.
      with dropout from ``key``; each step draws a fresh key); None = ``apply_fn``. Pool examples use each
      layer's ``train_head_fn`` likewise.
    stacked: train k models at once: every leaf of the state has a leading member axis [k] (see
      :func:`train_with_pool_sweep`), ``jax.vmap`` runs the attack and the step over the members, all
      members see the same mini-batches. The refresh schedule is read from member 0's step (members start
      together), so that a refresh stays a branch taken only on refresh steps: a per-member condition
      would turn it into a select that runs the attack on every step.

  Returns:
    ``epoch_fn(state, images, labels, perm_key) -> (state, stats)``, jitted with the state donated;
    ``stats`` is [steps, len(STEP_STATS) + len(POOL_STATS) * num_pools] per-step values (the pool ones
    are means over the pools' latest generated examples, 0 on steps without a refresh). Stacked:
    ``epoch_fn(state, images, labels, perm_key, hyper=None)`` with ``hyper`` None or a pytree with a
    leading [k] axis (passed to ``penalty_fn``), and ``stats`` [steps, k, ...].
  """
  names = tuple(l.name for l in layers)
  if names != tuple(config.layers):
    raise ValueError(f"make_epoch_fn: layers {names} differ from config.layers {config.layers}")
  sizes = mixed_batch_sizes(batch_size, config)
  steps = num_train // batch_size
  if steps < 1:
    raise ValueError(f"batch_size {batch_size} is larger than the {num_train} training examples")
  r = config.refresh_size
  num_fill_chunks = -(-config.pool_size // r)
  num_pools = len(layers)

  def refresh_slots(state, images, labels, key, slots):
    """Replaces pool entries ``slots`` ([r] per pool) with new examples of the current params."""
    pools, plabels, pborn = dict(state.pools), dict(state.pool_labels), dict(state.pool_born)
    stats = []
    for i, layer in enumerate(layers):
      k_src, k_tgt = jax.random.split(jax.random.fold_in(key, i))
      idx = jax.random.randint(k_src, (r,), 0, images.shape[0])
      y = labels[idx]
      h_adv, res = generate_adversarial(layer, state.params, images[idx], y, k_tgt, config, num_classes)
      s = slots[i]
      pools[layer.name] = pools[layer.name].at[s].set(h_adv)
      plabels[layer.name] = plabels[layer.name].at[s].set(y)
      pborn[layer.name] = pborn[layer.name].at[s].set(state.step)
      ok = res.success.astype(jnp.float32)
      stats += [jnp.mean(ok), jnp.sum(ok * res.distortion) / jnp.maximum(jnp.sum(ok), 1.0)]
    state = state.replace(pools=pools, pool_labels=plabels, pool_born=pborn)
    return state, jnp.stack(stats)

  def regenerate(state, images, labels, key):
    """Initial fill (all entries, in chunks of r) or refresh (r random entries of each pool).

    Both go through ONE ``refresh_slots`` (one attack program per pool): the fill is a loop whose trip
    count is ``num_fill_chunks`` instead of 1.
    """
    is_fill = ~state.filled
    k_slots = jax.random.fold_in(key, 1_000_003)
    random_slots = jnp.stack([jax.random.choice(jax.random.fold_in(k_slots, i), config.pool_size, (r,),
                                                replace=False) for i in range(num_pools)])

    def body(c, carry):
      st, acc = carry
      seq = jnp.broadcast_to((c * r + jnp.arange(r)) % config.pool_size, (num_pools, r))
      slots = jnp.where(is_fill, seq, random_slots)
      st, stats = refresh_slots(st, images, labels, jax.random.fold_in(key, c), slots)
      return st, acc + stats

    trips = jnp.where(is_fill, num_fill_chunks, 1)
    acc0 = jnp.zeros((num_pools * len(POOL_STATS),), jnp.float32)
    state, acc = jax.lax.fori_loop(0, trips, body, (state, acc0))
    state = state.replace(filled=jnp.ones((), bool), num_refreshes=state.num_refreshes + 1)
    return state, acc / trips.astype(jnp.float32), jnp.ones((), jnp.float32)

  def no_refresh(state, images, labels, key):
    del images, labels, key
    return state, jnp.zeros((num_pools * len(POOL_STATS),), jnp.float32), jnp.zeros((), jnp.float32)

  def loss_and_stats(params, x, y, pool_batch, pool_weight, key, hyper):
    logits_clean = apply_fn(params, x) if train_apply_fn is None else train_apply_fn(params, x, key)
    clean = loss_fn(logits_clean, y)
    clean_err = jnp.mean((jnp.argmax(logits_clean, -1) != y).astype(jnp.float32))
    pool_sum, pool_count, pool_err = 0.0, 0, 0.0
    for i, layer in enumerate(layers):
      h, yp = pool_batch[layer.name]
      if layer.train_head_fn is None:
        logits = layer.head_fn(params, h)
      else:
        logits = layer.train_head_fn(params, h, jax.random.fold_in(key, i + 1))
      pool_sum = pool_sum + jnp.sum(loss_fn(logits, yp))
      pool_err = pool_err + jnp.sum((jnp.argmax(logits, -1) != yp).astype(jnp.float32))
      pool_count += yp.shape[0]
    pool_weight = pool_weight * config.pool_loss_weight
    data_loss = (jnp.sum(clean) + pool_weight * pool_sum) / (clean.shape[0] + pool_weight * pool_count)
    if penalty_fn is None:
      penalty = 0.0
    else:
      penalty = penalty_fn(params) if hyper is None else penalty_fn(params, hyper)
    aux = jnp.stack([data_loss, jnp.mean(clean), pool_sum / pool_count, clean_err, pool_err / pool_count])
    return data_loss + penalty, aux

  def is_due(step):
    return (step >= config.warmup_steps) & ((step - config.warmup_steps) % config.refresh_every == 0)

  def refresh_key(rng, step):
    return jax.random.fold_in(jax.random.fold_in(rng, _SALT_REFRESH), step)

  def step_fn(state, x, y, images, labels):
    state, pool_stats, refreshed = jax.lax.cond(is_due(state.step), regenerate, no_refresh, state, images, labels,
                                                refresh_key(state.rng, state.step))
    return update(state, x, y, pool_stats, refreshed, None)

  def stacked_step_fn(state, x, y, images, labels, hyper):
    keys = jax.vmap(refresh_key)(state.rng, state.step)
    member = (0, None, None, 0)
    state, pool_stats, refreshed = jax.lax.cond(is_due(state.step[0]), jax.vmap(regenerate, in_axes=member),
                                                jax.vmap(no_refresh, in_axes=member), state, images, labels, keys)
    return jax.vmap(update, in_axes=(0, None, None, 0, 0, 0))(state, x, y, pool_stats, refreshed, hyper)

  def update(state, x, y, pool_stats, refreshed, hyper):
    """Samples the pool rows of the batch and takes one optimiser step (one member)."""
    k_sample = jax.random.fold_in(jax.random.fold_in(state.rng, _SALT_SAMPLE), state.step)
    pool_batch = sample_mixed_batch(state, k_sample, sizes)
    pool_weight = state.filled.astype(jnp.float32)
    k_dropout = jax.random.fold_in(jax.random.fold_in(state.rng, _SALT_DROPOUT), state.step)
    (loss, aux), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params, x, y, pool_batch,
                                                                          pool_weight, k_dropout, hyper)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return state, jnp.concatenate([loss[None], aux, refreshed[None], pool_stats])

  def epoch_fn(state, images, labels, perm_key, hyper=None):
    if hyper is not None and not stacked:
      raise ValueError("make_epoch_fn: hyper is for stacked epochs (stacked=True)")
    perm = jax.random.permutation(perm_key, num_train)[: steps * batch_size].reshape(steps, batch_size)

    def body(st, idx):
      if stacked:
        return stacked_step_fn(st, images[idx], labels[idx], images, labels, hyper)
      return step_fn(st, images[idx], labels[idx], images, labels)

    state, stats = jax.lax.scan(body, state, perm)
    return state.replace(epoch=state.epoch + 1), stats

  return jax.jit(epoch_fn, donate_argnums=(0,))


def _summarise(stats: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
  """Epoch summary of the per-step stats: means, and pool stats averaged over refresh steps."""
  base = len(STEP_STATS)
  out = {n: float(np.mean(stats[:, i])) for i, n in enumerate(STEP_STATS) if n != "refreshed"}
  refreshed = stats[:, base - 1] > 0
  out["num_refreshes"] = int(np.sum(refreshed))
  for j, name in enumerate(names):
    for k, stat in enumerate(POOL_STATS):
      col = stats[refreshed, base + j * len(POOL_STATS) + k]
      out[f"{name}/{stat}"] = float(np.mean(col)) if col.size else float("nan")
  return out


# ----------------------------------------------------------------------------------------------------
# The training loop for the models of ``models``.


def train_with_pool(model, images, labels, config: train_lib.TrainConfig, pool_config: PoolConfig, *,
                    seed: int = 0, data_seed: Optional[int] = None, workdir: Optional[str] = None,
                    eval_data: Optional[Tuple[Any, Any]] = None, layers: Optional[Sequence[PoolLayer]] = None,
                    stop_after_epoch: Optional[int] = None) -> PoolTrainResult:
  """Trains a Flax model with adversarial pools mixed into every batch; resumes from ``workdir/ckpt``.

  The loss is ``train.TrainConfig``'s (cross-entropy + per-layer weight decay, ``decay_form`` etc.),
  with the optimiser and schedule of ``train.make_optimizer``; the mini-batch order is the same as
  ``train.train_model``'s for the same ``data_seed``. The paper's pool network used no dropout; a
  ``models.SigmoidMLP`` with ``dropout_rate``/``input_dropout_rate`` is trained with dropout on the clean
  and the pool examples (see :func:`model_pool_layers`), evaluated and attacked without.

  Args:
    model: a module of ``models`` (the default pool layers need ``mlp_head_fn`` support for hidden layers).
    images: [N, ...] float32 in [0, 1]; labels: [N] int.
    config: training settings (``task`` must be "classify").
    pool_config: pool settings.
    seed: init and pool seed.
    data_seed: seed of the per-epoch shuffling (default: ``seed``).
    workdir: checkpoints, ``metrics.jsonl`` and ``run_config.json`` (None: nothing is written).
    eval_data: optional (images, labels) whose error is logged each epoch.
    layers: PoolLayers to use instead of ``model_pool_layers(model, pool_config.layers)``.
    stop_after_epoch: return after this epoch, as if interrupted.

  Returns:
    PoolTrainResult(variables={"params": ...}, state, history).

  Raises:
    ValueError: bad data, settings, or a workdir holding a run with other settings -- before compiling.
  """
  images, labels, eval_data, num_classes = _check_inputs(model, images, labels, config, pool_config, eval_data,
                                                         stop_after_epoch, "train_with_pool")
  if layers is not None and any(_dropout_rates(model)):
    raise ValueError("train_with_pool: custom layers with a dropout model are not supported; build the epoch "
                     "with make_epoch_fn(train_apply_fn=...) instead")
  custom_layers = layers is not None
  num_train = images.shape[0]
  steps_per_epoch = num_train // config.batch_size
  x0 = jnp.asarray(images[:1])
  init_key, rng = jax.random.split(jax.random.PRNGKey(int(seed)))
  params = model.init(init_key, x0)["params"]
  specs = train_lib.decay_layer_specs(model, {"params": params}, config)
  decays = train_lib._broadcast_decays(config.weight_decay, len(specs), "TrainConfig.weight_decay")  # pylint: disable=protected-access
  if layers is None:
    layers = model_pool_layers(model, pool_config.layers)
  elif tuple(l.name for l in layers) != pool_config.layers:
    raise ValueError(f"layers {[l.name for l in layers]} differ from pool_config.layers {pool_config.layers}")
  tx = train_lib.make_optimizer(config, steps_per_epoch, params)
  state = init_state(layers, params, tx, x0, pool_config, rng)

  ckpt_dir = os.path.join(workdir, "ckpt") if workdir else None
  data_seed = seed if data_seed is None else data_seed
  run_info = {"config": config.to_dict(), "pool_config": pool_config.to_dict(), "seed": int(seed),
              "data_seed": int(data_seed), "num_train": int(num_train),
              "data_fingerprint": train_lib.data_fingerprint(images, labels), "model": repr(model)}
  if workdir:
    checkpoint.guard_run_config(workdir, run_info)
    restored, step = checkpoint.restore_checkpoint(ckpt_dir, target=state)
    if step is not None:
      state = jax.tree.map(jnp.asarray, restored)
      logging.info("adversarial_training: resumed from %s at epoch %d", ckpt_dir, step)

  if custom_layers:
    epoch_fn = _build_epoch_fn(model, config, pool_config, images.shape[1:], num_train, num_classes,
                               tuple(decays.tolist()), tuple(layers))
  else:  # cached: a second run with the same settings reuses the compiled program
    epoch_fn = _cached_epoch_fn(model, config, pool_config, images.shape[1:], num_train, num_classes,
                                tuple(decays.tolist()))
  count_fn = train_lib.count_errors_fn(model) if eval_data is not None else None
  writer = progress.MetricWriter(workdir, prefix="[adv] ")
  data_key = jax.random.PRNGKey(int(data_seed))
  images_d, labels_d = jnp.asarray(images), jnp.asarray(labels)
  history = []
  last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
  for epoch in range(int(state.epoch), last_epoch):
    t0 = time.perf_counter()
    state, stats = epoch_fn(state, images_d, labels_d, jax.random.fold_in(data_key, epoch))
    stats = np.asarray(stats)  # blocks
    seconds = time.perf_counter() - t0
    record = {"epoch": epoch + 1, **_summarise(stats, pool_config.layers), "seconds": seconds}
    if count_fn is not None:
      record["eval_error"] = float(train_lib.evaluate(count_fn, state.params, *eval_data, config.eval_batch_size))
    history.append(record)
    writer.write(**record)
    if ckpt_dir and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == last_epoch):
      checkpoint.save_checkpoint(ckpt_dir, state, step=epoch + 1)
  return PoolTrainResult({"params": state.params}, state, history)


def _check_inputs(model, images, labels, config, pool_config, eval_data, stop_after_epoch, who):
  """Checks shared by train_with_pool and train_with_pool_sweep, before anything is compiled.

  Returns (images float32, labels int32, eval_data checked or None, num_classes).
  """
  images, labels = train_lib._check_data(images, labels)  # pylint: disable=protected-access
  if eval_data is not None:
    eval_data = train_lib._check_data(*eval_data, name="eval_data")  # pylint: disable=protected-access
  if config.task != "classify":
    raise ValueError(f"{who}: config.task must be 'classify', got {config.task!r}")
  if np.any(images < 0) or np.any(images > 1):
    raise ValueError(f"images must lie in [0, 1] (the attack box), got [{images.min()}, {images.max()}]")
  num_train = images.shape[0]
  if num_train < config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} is larger than the {num_train} training examples")
  if stop_after_epoch is not None and not 1 <= stop_after_epoch <= config.epochs:
    raise ValueError(f"stop_after_epoch must be in [1, epochs={config.epochs}], got {stop_after_epoch}")
  _dropout_rates(model)  # raises for dropout in a model other than SigmoidMLP
  mixed_batch_sizes(config.batch_size, pool_config)  # validates the mix
  x0 = jnp.asarray(images[:1])
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0)["params"])
  num_classes = int(jax.eval_shape(lambda p: model.apply({"params": p}, x0), params).shape[-1])
  if np.any(labels < 0) or np.any(labels >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  return images, labels, eval_data, num_classes


class PoolSweepResult(NamedTuple):
  """Output of :func:`train_with_pool_sweep`.

  Attributes:
    variables: k ordinary {"params": ...}, one per member, for ``model.apply``.
    stacked_variables: {"params": ...} with a leading [k] axis.
    weight_decays: [k, num_decayed_layers] λ of each member.
    seeds: [k] init/pool seeds.
    state: the stacked PoolTrainState (every leaf [k, ...]).
    history: per epoch, each statistic as a [k] list (one value per member), plus "seconds".
  """
  variables: List[Params]
  stacked_variables: Params
  weight_decays: np.ndarray
  seeds: np.ndarray
  state: PoolTrainState
  history: List[Dict[str, Any]]


def train_with_pool_sweep(model, images, labels, config: train_lib.TrainConfig, pool_config: PoolConfig, *,
                          weight_decays: Sequence[Any] = (None,), seeds: Sequence[int] = (0,), data_seed: int = 0,
                          workdir: Optional[str] = None, eval_data: Optional[Tuple[Any, Any]] = None,
                          stop_after_epoch: Optional[int] = None) -> PoolSweepResult:
  """Trains k models with adversarial pools, differing in init/pool seed and/or λ, as ONE compiled program.

  What ``train.train_sweep`` is to ``train_model``: the states are stacked on a leading [k] axis and
  ``jax.vmap`` runs the pool attacks (k x refresh_size examples per pool in one L-BFGS program) and the
  training steps over the members; every member sees the same mini-batches (order from ``data_seed``)
  and refreshes its own pools on the same steps. Member i is ``train_with_pool(model, ..., config with
  weight_decay=weight_decays[i], pool_config, seed=seeds[i], data_seed=data_seed)`` computed with vmap's
  float rounding. Over a few hundred steps the two agree to ~1e-5 (tests). Over a long run the rounding
  differences grow, through dropout and the attack's discrete choices, into a different draw of the same
  setting: 150 epochs of the FC100-100-10 default on the validation split ended at 1.43 % vs 1.42 % alone.
  For many-seed comparisons of a setting (on MNIST, the test error of one setting varies by ~0.05 points
  between seeds) and for λ sweeps. Meant for accelerators, where a refresh of 16 examples is latency-bound
  (H200: 4.9 ms for 16, 6.9 ms for 256). On 2 CPU cores it is barely faster per model than one run alone
  (1.03-1.07x at k = 4-8, ``scripts/bench_pool_sweep.py``), and slower than two runs in two processes.
  Runs on the default device (the members are not sharded). Resumes from ``workdir/ckpt``.

  Args:
    weight_decays: k entries, each a scalar or per-layer list (None: ``config.weight_decay``); a length-1
      list is broadcast to the length of ``seeds``.
    seeds: k init and pool seeds (or one, broadcast to the length of ``weight_decays``).
    data_seed: seed of the shared per-epoch shuffling.
    (other arguments as in :func:`train_with_pool`; the pool layers are ``model_pool_layers``'.)

  Returns:
    PoolSweepResult.

  Raises:
    ValueError: bad data or settings, mismatched ``weight_decays``/``seeds``, or a workdir holding a run with
      other settings -- before compiling.
  """
  images, labels, eval_data, num_classes = _check_inputs(model, images, labels, config, pool_config, eval_data,
                                                         stop_after_epoch, "train_with_pool_sweep")
  decays, seeds = train_lib.sweep_members(model, images[:1], config, weight_decays, seeds, "train_with_pool_sweep")
  k = len(seeds)
  num_train = images.shape[0]
  x0 = jnp.asarray(images[:1])
  layers = model_pool_layers(model, pool_config.layers)
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  init_keys, rngs = jax.vmap(jax.random.split)(keys).transpose(1, 0, 2)
  params = jax.vmap(lambda key: model.init(key, x0)["params"])(init_keys)
  base = dataclasses.replace(config, weight_decay=(0.0,))  # λ is traced (``hyper``), not compiled in
  tx = train_lib.make_optimizer(base, num_train // config.batch_size, jax.tree.map(lambda a: a[0], params))
  state = jax.vmap(lambda p, r: init_state(layers, p, tx, x0, pool_config, r))(params, rngs)

  ckpt_dir = os.path.join(workdir, "ckpt") if workdir else None
  if workdir:
    run_info = {"config": config.to_dict(), "pool_config": pool_config.to_dict(), "seeds": seeds,
                "weight_decays": decays.tolist(), "data_seed": int(data_seed), "num_train": int(num_train),
                "data_fingerprint": train_lib.data_fingerprint(images, labels), "model": repr(model)}
    checkpoint.guard_run_config(workdir, run_info)
    restored, step = checkpoint.restore_checkpoint(ckpt_dir, target=state)
    if step is not None:
      state = jax.tree.map(jnp.asarray, restored)
      logging.info("adversarial_training: sweep resumed from %s at epoch %d", ckpt_dir, step)

  epoch_fn = _cached_sweep_epoch_fn(model, base, pool_config, tuple(images.shape[1:]), num_train, num_classes)
  count_fn = train_lib.count_errors_fn(model, stacked=True) if eval_data is not None else None
  writer = progress.MetricWriter(workdir, prefix="[adv sweep] ")
  data_key = jax.random.PRNGKey(int(data_seed))
  images_d, labels_d, decays_d = jnp.asarray(images), jnp.asarray(labels), jnp.asarray(decays, jnp.float32)
  history = []
  last_epoch = config.epochs if stop_after_epoch is None else stop_after_epoch
  for epoch in range(int(np.max(np.asarray(state.epoch))), last_epoch):
    t0 = time.perf_counter()
    state, stats = epoch_fn(state, images_d, labels_d, jax.random.fold_in(data_key, epoch), decays_d)
    stats = np.asarray(stats)  # blocks; [steps, k, columns]
    seconds = time.perf_counter() - t0
    members = [_summarise(stats[:, i], pool_config.layers) for i in range(k)]
    record = {"epoch": epoch + 1, **{n: [m[n] for m in members] for n in members[0]}, "seconds": seconds}
    if count_fn is not None:
      record["eval_error"] = train_lib.evaluate(count_fn, state.params, *eval_data, config.eval_batch_size).tolist()
    history.append(record)
    writer.write(**record)
    if ckpt_dir and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == last_epoch):
      checkpoint.save_checkpoint(ckpt_dir, state, step=epoch + 1)
  stacked_vars = {"params": state.params}
  return PoolSweepResult(train_lib.unstack(stacked_vars, k), stacked_vars, decays, np.asarray(seeds), state, history)


def _build_sweep_epoch_fn(model, config, pool_config, input_shape, num_train, num_classes):
  """The stacked make_epoch_fn of train_with_pool_sweep: λ per member is the traced ``hyper`` argument."""
  x0 = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0)["params"])
  specs = tuple(train_lib.decay_layer_specs(model, {"params": params}, config))
  tx = train_lib.make_optimizer(config, num_train // config.batch_size, params)

  def penalty_fn(p, decays):
    return _penalty(p, decays=decays, specs=specs, config=config, num_train=num_train)

  train_apply = functools.partial(_train_apply, model) if any(_dropout_rates(model)) else None
  return make_epoch_fn(functools.partial(_apply_params, model), model_pool_layers(model, pool_config.layers), tx,
                       pool_config, batch_size=config.batch_size, num_train=num_train, num_classes=num_classes,
                       penalty_fn=penalty_fn, train_apply_fn=train_apply, stacked=True)


_cached_sweep_epoch_fn = functools.lru_cache(maxsize=4)(_build_sweep_epoch_fn)


def _build_epoch_fn(model, config, pool_config, input_shape, num_train, num_classes, decays, layers=None):
  """make_epoch_fn for a Flax model trained with ``config``'s loss and optimiser."""
  x0 = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0)["params"])
  specs = tuple(train_lib.decay_layer_specs(model, {"params": params}, config))
  tx = train_lib.make_optimizer(config, num_train // config.batch_size, params)
  if layers is None:
    layers = model_pool_layers(model, pool_config.layers)
  penalty_fn = functools.partial(_penalty, decays=np.asarray(decays, np.float32), specs=specs, config=config,
                                 num_train=num_train)
  train_apply = functools.partial(_train_apply, model) if any(_dropout_rates(model)) else None
  return make_epoch_fn(functools.partial(_apply_params, model), layers, tx, pool_config,
                       batch_size=config.batch_size, num_train=num_train, num_classes=num_classes,
                       penalty_fn=penalty_fn, train_apply_fn=train_apply)


_cached_epoch_fn = functools.lru_cache(maxsize=8)(_build_epoch_fn)


def _penalty(params, *, decays, specs, config, num_train):
  p = train_lib.weight_decay_penalty(params, decays, specs, config)
  return p / num_train if config.data_term == "sum" else p
