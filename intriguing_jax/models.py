"""The paper's networks as Flax Linen modules, used purely (``init`` then ``apply``).

Usage::

    model = models.get_model("fc100-100-10")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    logits = model.apply(variables, x)                             # [B, 10]
    feats = model.apply(variables, x, method="features")           # {"hidden_0": [B, 100], "hidden_1": ...}
    logits = model.apply(variables, feats["hidden_0"], "hidden_0", method="head")  # the layers above

Contract shared by every model (paper.md §4.1, Tables 1, 3, 5): ``__call__(x, train=False) -> logits
[B, K]`` and ``features(x, train=False) -> {name: [B, ...]}`` (post-nonlinearity activation of every
hidden layer, in forward order); inputs are batched, ``[B, H, W, C]`` or ``[B, H*W*C]``. Every layer is a
submodule (the parameter-free ones too), so ``trace_layers`` reads the network's structure from the module
itself. Dropout needs ``rngs={"dropout": key}`` when ``train=True``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax.types import Array, Params

MNIST_SHAPE = (28, 28, 1)


class Activation(nn.Module):
  """Element-wise nonlinearity ``kind`` ("relu" or "sigmoid")."""
  kind: str

  def __call__(self, x: Array) -> Array:
    return {"relu": nn.relu, "sigmoid": nn.sigmoid}[self.kind](x)


class Flatten(nn.Module):
  """[B, ...] -> [B, D]."""

  def __call__(self, x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


class MaxPool(nn.Module):
  """Max pooling over [B, H, W, C] (``nn.max_pool``)."""
  window: Tuple[int, int]
  strides: Tuple[int, int]
  padding: str = "VALID"

  def __call__(self, x: Array) -> Array:
    return nn.max_pool(x, self.window, strides=self.strides, padding=self.padding)


class LocalResponseNorm(nn.Module):
  """AlexNet's local response normalisation across channels of x [..., C] (Krizhevsky et al. 2012, §3.3):
  ``b_c = a_c / (bias + alpha / n * sum_{|c'-c| <= depth_radius} a_{c'}^2) ** beta``, ``n = 2 * depth_radius
  + 1`` (the Caffe convention, alpha divided by the window size)."""
  depth_radius: int = 2
  bias: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75

  def __call__(self, x: Array) -> Array:
    n, r = 2 * self.depth_radius + 1, self.depth_radius
    pad = [(0, 0)] * (x.ndim - 1) + [(r, r)]
    window = jax.lax.reduce_window(jnp.square(x), 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (n,), (1,) * x.ndim,
                                   pad)
    return x / jnp.power(self.bias + (self.alpha / n) * window, self.beta)


def _check_batched(x: Array, name: str, image_shape: Optional[Tuple[int, ...]] = None) -> Array:
  """x itself, or x [B, H*W*C] reshaped to [B, *image_shape] when ``image_shape`` is given."""
  if x.ndim < 2:
    raise ValueError(f"{name}: x must be batched, [B, H, W, C] or [B, D]; got shape {x.shape}")
  if image_shape is None or x.shape[1:] == tuple(image_shape):
    return x
  if x.ndim == 2 and x.shape[1] == math.prod(image_shape):
    return x.reshape((x.shape[0],) + tuple(image_shape))
  raise ValueError(f"{name}: x of shape {x.shape} is neither [B, {', '.join(map(str, image_shape))}] "
                   f"nor [B, {math.prod(image_shape)}]")


class _Net(nn.Module):
  """``__call__`` and ``features`` from ``_forward(x, train) -> (logits, features)``."""

  def __post_init__(self):
    # A list given for a sequence field (widths=[16]) becomes a tuple: modules are hashed as static
    # arguments and cache keys, and a list field made them unhashable.
    for field in dataclasses.fields(self):
      if isinstance(getattr(self, field.name, None), list):
        object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
    super().__post_init__()

  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [B, H, W, C] or [B, H*W*C] -> logits [B, num_classes]."""
    return self._forward(x, train)[0]

  def features(self, x: Array, train: bool = False) -> Dict[str, Array]:
    return self._forward(x, train)[1]


class SigmoidMLP(_Net):
  """Fully connected sigmoid network with a softmax (logits) output: FC100-100-10 and friends.

  Dense layers ``hidden_0 .. hidden_{n-1}`` (widths ``widths``, sigmoid; ``()`` gives softmax regression)
  and ``output`` (``num_classes``). When training, dropout at ``input_dropout_rate`` on the pixels and at
  ``dropout_rate`` on the input of every later dense layer (0 = off).
  """
  widths: Sequence[int] = (100, 100)
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0

  def head(self, h: Array, layer: str, train: bool = False) -> Array:
    """Logits from the activation ``h`` of feature ``layer`` ("input": the pixels, as ``__call__``)."""
    return self._forward(h, train, layer)[0]

  @nn.compact
  def _forward(self, h: Array, train: bool, start: str = "input") -> Tuple[Array, Dict[str, Array]]:
    dense = [f"hidden_{i}" for i in range(len(self.widths))] + ["output"]
    starts = ["input"] + dense[:-1]
    if start not in starts:
      raise ValueError(f"{type(self).__name__}: unknown layer {start!r}; known: {starts}")
    rates = [self.input_dropout_rate] + [self.dropout_rate] * len(self.widths)  # before each dense layer
    if start == "input":
      h = Flatten(name="flatten")(_check_batched(h, type(self).__name__))
    feats = {}
    for j in range(starts.index(start), len(dense)):
      if rates[j] > 0:  # named as Flax names them on the whole forward pass (same dropout draws)
        name = f"Dropout_{sum(r > 0 for r in rates[:j])}"
        h = nn.Dropout(rates[j], deterministic=not train, name=name)(h)
      h = nn.Dense(self.widths[j] if j < len(self.widths) else self.num_classes, name=dense[j])(h)
      if j < len(self.widths):
        h = feats[dense[j]] = Activation("sigmoid", name=f"{dense[j]}_sigmoid")(h)
    return h, feats


class FC10(SigmoidMLP):
  """Softmax regression on raw pixels (the paper's FC10(λ); λ is set at training time)."""
  widths: Sequence[int] = ()


class AutoencoderClassifier(_Net):
  """AE400-10: sparse autoencoder (784 -> 400 -> 784, sigmoid) with a softmax on its code (paper.md A13).

  ``__call__`` is the classifier: logits = output(sigmoid(encoder(x))); ``features`` gives the code as
  "hidden_0"; ``reconstruct`` is the autoencoder path, ``(code, recon_logits)`` with
  ``sigmoid(recon_logits)`` the reconstruction. Untied weights ``encoder``, ``decoder``, ``output``.
  """
  code_size: int = 400
  num_classes: int = 10
  image_shape: Tuple[int, ...] = MNIST_SHAPE

  def setup(self):
    self.flatten = Flatten()
    self.encoder = nn.Dense(self.code_size)
    self.encoder_sigmoid = Activation("sigmoid")
    self.decoder = nn.Dense(math.prod(self.image_shape))
    self.output = nn.Dense(self.num_classes)

  def encode(self, x: Array) -> Array:
    """[B, 784] or [B, 28, 28, 1] -> code [B, code_size] in (0, 1)."""
    return self.encoder_sigmoid(self.encoder(self.flatten(_check_batched(x, "AutoencoderClassifier"))))

  def reconstruct(self, x: Array) -> Tuple[Array, Array]:
    """Returns (code [B, code_size], reconstruction logits [B, 784])."""
    code = self.encode(x)
    return code, self.decoder(code)

  def head(self, h: Array, layer: str, train: bool = False) -> Array:
    """Logits from the activation ``h`` of ``layer`` ("input" or "hidden_0")."""
    if layer not in ("input", "hidden_0"):
      raise ValueError(f"AutoencoderClassifier: unknown layer {layer!r}; known: ['input', 'hidden_0']")
    return self(h, train) if layer == "input" else self.output(h)

  def _forward(self, x: Array, train: bool) -> Tuple[Array, Dict[str, Array]]:
    del train
    code = self.encode(x)
    if self.is_initializing():
      self.decoder(code)  # create the decoder params too
    return self.output(code), {"hidden_0": code}


class MnistConvNet(_Net):
  """Small LeNet-like ReLU ConvNet for MNIST (paper §3 unit analysis; spectral bounds).

  conv1 5x5 1->c1 VALID, ReLU, max-pool 2x2/2 -> conv2 5x5 c1->c2 VALID, ReLU, max-pool 2x2/2 ->
  fc1 (4*4*c2 -> hidden), ReLU -> [dropout when training] -> output (hidden -> 10). Features: conv1,
  pool1, conv2, pool2, fc1.
  """
  channels: Tuple[int, int] = (16, 32)
  hidden: int = 128
  num_classes: int = 10
  dropout_rate: float = 0.0
  image_shape: Tuple[int, ...] = MNIST_SHAPE

  @nn.compact
  def _forward(self, x: Array, train: bool) -> Tuple[Array, Dict[str, Array]]:
    h = _check_batched(x, "MnistConvNet", self.image_shape)
    feats = {}
    for i, c in enumerate(self.channels):
      name = f"conv{i + 1}"
      h = nn.Conv(c, (5, 5), padding="VALID", name=name)(h)
      h = feats[name] = Activation("relu", name=f"{name}_relu")(h)
      h = feats[f"pool{i + 1}"] = MaxPool((2, 2), (2, 2), name=f"pool{i + 1}")(h)
    h = Flatten(name="flatten")(h)
    h = feats["fc1"] = Activation("relu", name="fc1_relu")(nn.Dense(self.hidden, name="fc1")(h))
    if self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, name="output")(h), feats


class AlexNet(_Net):
  """Single-tower AlexNet with the paper's Table 5 sizes (Krizhevsky et al. 2012; paper.md A18).

  conv1 11x11/4 3->96 VALID, ReLU, LRN, max-pool 3x3/2 -> conv2 5x5 96->256 SAME, ReLU, LRN, pool ->
  conv3 3x3 256->384, conv4 3x3 384->384, conv5 3x3 384->256 (SAME, ReLU), pool -> fc1 9216->4096,
  fc2 4096->4096 (ReLU, dropout) -> output 4096->1000. Input 227x227x3: 55 -> 27 -> 13 -> 6, 6*6*256=9216.
  Features: conv1..conv5 (post-ReLU), pool1, pool2, pool5, fc1, fc2. ``dropout_rate``: before fc2 and
  output when training; ``lrn``: LRN after conv1 and conv2. Never trained here (spectral analysis only).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  lrn: bool = True
  image_shape: Tuple[int, ...] = (227, 227, 3)

  CONVS = (("conv1", 96, (11, 11), (4, 4), "VALID"), ("conv2", 256, (5, 5), (1, 1), "SAME"),
           ("conv3", 384, (3, 3), (1, 1), "SAME"), ("conv4", 384, (3, 3), (1, 1), "SAME"),
           ("conv5", 256, (3, 3), (1, 1), "SAME"))
  POOLS = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}

  @nn.compact
  def _forward(self, x: Array, train: bool) -> Tuple[Array, Dict[str, Array]]:
    h = _check_batched(x, "AlexNet", self.image_shape)
    feats = {}
    for name, features, window, strides, padding in self.CONVS:
      h = nn.Conv(features, window, strides=strides, padding=padding, name=name)(h)
      h = feats[name] = Activation("relu", name=f"{name}_relu")(h)
      if self.lrn and name in ("conv1", "conv2"):
        h = LocalResponseNorm(name=f"{name}_lrn")(h)
      if name in self.POOLS:
        h = feats[self.POOLS[name]] = MaxPool((3, 3), (2, 2), name=self.POOLS[name])(h)
    h = Flatten(name="flatten")(h)
    for name in ("fc1", "fc2", "output"):
      if name != "fc1" and self.dropout_rate > 0:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
      if name == "output":
        return nn.Dense(self.num_classes, name="output")(h), feats
      h = feats[name] = Activation("relu", name=f"{name}_relu")(nn.Dense(4096, name=name)(h))


def get_param(variables: Params, param_path: Sequence[str]) -> Dict[str, Array]:
  """The ``{"kernel", "bias"}`` dict at ``param_path`` inside ``variables["params"]`` (or bare params)."""
  tree = variables.get("params", variables)
  for key in param_path:
    tree = tree[key]
  return tree


def count_params(variables: Params) -> int:
  """Total number of scalars in ``variables`` (any pytree)."""
  return int(sum(np.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(variables)))


LAYER_TYPES = (nn.Dense, nn.Conv, nn.Dropout, Activation, Flatten, MaxPool, LocalResponseNorm)


class LayerCall(NamedTuple):
  """One call of a layer during a forward pass (``trace_layers``): the module's path (for Dense/Conv the
  keys of its params inside ``variables["params"]``), the layer, and its per-example shapes."""
  path: Tuple[str, ...]
  module: nn.Module
  input_shape: Tuple[int, ...]
  output_shape: Tuple[int, ...]


def trace_layers(model: nn.Module, variables: Params, input_shape: Sequence[int]) -> List[LayerCall]:
  """The ``LAYER_TYPES`` calls of ``model.apply(variables, x)`` on one input of ``input_shape``, in order,
  traced with ``jax.eval_shape`` under ``nn.intercept_methods``; ValueError (with the model's own reason)
  when the model cannot take that input."""
  shape = tuple(int(v) for v in input_shape)
  calls: List[LayerCall] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not isinstance(context.module, LAYER_TYPES):
      return next_fun(*args, **kwargs)
    i = len(calls)
    calls.append(None)  # keeps the order in which the calls start
    out = next_fun(*args, **kwargs)
    calls[i] = LayerCall(tuple(context.module.path), context.module, tuple(args[0].shape[1:]),
                         tuple(out.shape[1:]))
    return out

  x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  try:
    with nn.intercept_methods(record):   # a new function: jax's trace cache must not skip the interceptor
      jax.eval_shape(lambda v, z: model.apply(v, z), variables, x)
  except (ValueError, TypeError, flax.errors.FlaxError) as e:
    raise ValueError(f"{type(model).__name__} cannot take an input of shape {shape}: {e}") from e
  return calls


def weight_layer_paths(model: nn.Module, variables: Params,
                       input_shape: Sequence[int]) -> List[Tuple[str, ...]]:
  """Param paths (keys inside ``variables["params"]``) of the Dense/Conv layers, in forward order."""
  calls = trace_layers(model, variables, input_shape)
  return [c.path for c in calls if isinstance(c.module, (nn.Dense, nn.Conv))]


@dataclasses.dataclass(frozen=True)
class _Features:
  model: nn.Module

  def __call__(self, params: Params, x: Array) -> Dict[str, Array]:
    return self.model.apply(params, x, method="features")


def feature_fn(model: nn.Module):
  """Hashable ``fn(variables, x) -> {name: [B, ...]}``: ``model.features`` (equal models, equal fns)."""
  return _Features(model)


MODEL_NAMES = ("fc10", "fc100-100-10", "fc200-200-10", "fc123-456-10", "ae400-10", "mnist_conv", "alexnet")
_FC_RE = re.compile(r"^fc(\d+(?:-\d+)*)$")


def _fc_sizes(name: str) -> Optional[Tuple[int, ...]]:
  m = _FC_RE.match(name.lower().strip())
  return tuple(int(s) for s in m.group(1).split("-")) if m else None


def model_name_widths(name: str) -> Optional[Tuple[int, ...]]:
  """Hidden widths of an "fc<w1>-...-<classes>" name ((100, 100) for "fc100-100-10"), else None."""
  sizes = _fc_sizes(name)
  return sizes[:-1] if sizes else None


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The model called ``name`` (case-insensitive; ``MODEL_NAMES`` or any "fc<w1>-...-<classes>"), with
  ``kwargs`` overriding module attributes (e.g. ``dropout_rate=0.5``); ValueError for an unknown name."""
  key = name.lower().strip()
  named = {"num_classes", "widths", "code_size"} & set(kwargs)
  if named and key not in ("mnist_conv", "alexnet"):
    raise ValueError(f"get_model: {sorted(named)} of {name!r} are set by its name; change the name instead")
  if key in ("mnist_conv", "alexnet"):
    return {"mnist_conv": MnistConvNet, "alexnet": AlexNet}[key](**kwargs)
  m = re.match(r"^ae(\d+)-(\d+)$", key)
  if m:
    if int(m.group(1)) < 1 or int(m.group(2)) < 1:
      raise ValueError(f"get_model: code size and classes must be >= 1 in {name!r}")
    return AutoencoderClassifier(code_size=int(m.group(1)), num_classes=int(m.group(2)), **kwargs)
  sizes = _fc_sizes(key)
  if sizes:
    if any(s < 1 for s in sizes):
      raise ValueError(f"get_model: layer widths must be >= 1 in {name!r}")
    if len(sizes) == 1:
      return FC10(num_classes=sizes[0], **kwargs)
    return SigmoidMLP(widths=sizes[:-1], num_classes=sizes[-1], **kwargs)
  raise ValueError(f"get_model: unknown model name {name!r}; known: {', '.join(MODEL_NAMES)} "
                   "or any 'fc<w1>-...-<classes>'")
