"""The paper's networks as Flax Linen modules, used purely (``init`` then ``apply``).

Usage::

    import jax
    from intriguing_jax import models

    model = models.get_model("fc100-100-10")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    logits = model.apply(variables, x)                          # [B, 10]
    logits, feats = model.apply(variables, x, return_features=True)
    feats["hidden_0"]                                           # [B, 100], post-sigmoid
    for layer in model.architecture():                          # ordered layer descriptors
      if layer["type"] in ("dense", "conv"):
        kernel = models.get_param(variables, layer["param_path"])["kernel"]

Models (paper.md §4.1, Table 1, Table 3, Table 5):

* ``FC10``: softmax regression 784 -> 10 on raw pixels ("fc10"; λ is a training setting).
* ``SigmoidMLP(widths)``: fully connected sigmoid nets, "fc100-100-10", "fc200-200-10", "fc123-456-10"
  (any "fc<w1>-<w2>-...-10" name is parsed).
* ``AutoencoderClassifier``: AE400-10, a sparse autoencoder 784 -> 400 -> 784 (sigmoid, untied weights)
  whose frozen encoder feeds a softmax 400 -> 10 (paper.md A13). ``reconstruct`` is the AE path.
* ``MnistConvNet``: a small LeNet-like ReLU ConvNet for unit analysis (paper §3) and spectral bounds.
* ``AlexNet``: single-tower AlexNet with the paper's Table 5 layer sizes; 227x227x3 input so that conv5
  pools to 6x6x256 = 9216. Never trained here; for spectral analysis of given or random weights.

Contract shared by every model: ``__call__(x, *, train=False, return_features=False)``; inputs are
batched, ``[B, H, W, C]`` or ``[B, H*W*C]`` (reshaped as needed). With ``return_features=True`` the call
returns ``(logits, features)``, ``features`` an ordered dict name -> post-nonlinearity activation of every
hidden layer. ``architecture()`` lists layer descriptors (dicts) in forward order; dense/conv ones carry
``param_path`` (keys into ``variables["params"]``), ``input_shape``/``output_shape`` (per example),
``strides``, ``padding`` and ``window`` where relevant, and ``feature`` when their post-activation value is
returned under that features key. Dropout needs ``rngs={"dropout": key}`` when ``train=True``.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax.types import Array, Params

MNIST_SHAPE = (28, 28, 1)

__all__ = [
    "FC10", "SigmoidMLP", "AutoencoderClassifier", "MnistConvNet", "AlexNet", "get_model", "MODEL_NAMES",
    "get_param", "weight_layers", "count_params", "local_response_norm", "model_name_widths",
]


# ----------------------------------------------------------------------------------------------------
# Helpers.


def get_param(variables: Params, param_path: Sequence[str]) -> Dict[str, Array]:
  """The ``{"kernel", "bias"}`` dict at ``param_path`` inside ``variables["params"]`` (or bare params)."""
  tree = variables["params"] if "params" in variables else variables
  for key in param_path:
    tree = tree[key]
  return tree


def weight_layers(model: nn.Module) -> List[Dict[str, Any]]:
  """The dense/conv descriptors of ``model.architecture()``, in forward order (the per-layer λ order)."""
  return [d for d in model.architecture() if d["type"] in ("dense", "conv")]


def count_params(variables: Params) -> int:
  """Total number of scalars in ``variables`` (any pytree)."""
  return int(sum(np.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(variables)))


def _check_batched(x: Array, name: str) -> None:
  if x.ndim < 2:
    raise ValueError(f"{name}: x must be batched, [B, H, W, C] or [B, D]; got shape {x.shape}")


def _flatten(x: Array) -> Array:
  return x.reshape(x.shape[0], -1)


def _to_image(x: Array, image_shape: Tuple[int, ...], name: str) -> Array:
  _check_batched(x, name)
  if x.shape[1:] == tuple(image_shape):
    return x
  if x.ndim == 2 and x.shape[1] == math.prod(image_shape):
    return x.reshape((x.shape[0],) + tuple(image_shape))
  raise ValueError(f"{name}: x of shape {x.shape} is neither [B, {', '.join(map(str, image_shape))}] "
                   f"nor [B, {math.prod(image_shape)}]")


def local_response_norm(x: Array, *, depth_radius: int = 2, bias: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75) -> Array:
  """AlexNet's local response normalisation across channels (Krizhevsky et al. 2012, §3.3).

  ``b_c = a_c / (bias + alpha / n * sum_{|c'-c| <= depth_radius} a_{c'}^2) ** beta`` with
  ``n = 2 * depth_radius + 1`` (the Caffe convention, alpha divided by the window size).

  Args:
    x: [..., C] activations (channels last).

  Returns:
    Array of the shape of ``x``.
  """
  n = 2 * depth_radius + 1
  sq = jnp.square(x)
  pad = [(0, 0)] * (x.ndim - 1) + [(depth_radius, depth_radius)]
  window = jax.lax.reduce_window(sq, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (n,), (1,) * x.ndim, pad)
  return x / jnp.power(bias + (alpha / n) * window, beta)


def _conv_out(size: int, window: int, stride: int, padding: str) -> int:
  if padding == "SAME":
    return -(-size // stride)
  return (size - window) // stride + 1


# ----------------------------------------------------------------------------------------------------
# Fully connected models.


class SigmoidMLP(nn.Module):
  """Fully connected sigmoid network with a softmax (logits) output: FC100-100-10 and friends.

  Attributes:
    widths: hidden layer widths, input -> output (``()`` gives softmax regression).
    num_classes: output width.
    dropout_rate: dropout on the input of every dense layer after the first when training (0 = off).
    input_dropout_rate: dropout on the pixels when training (0 = off).
    image_shape: per-example input shape used in ``architecture()`` (inputs are flattened).
  """
  widths: Sequence[int] = (100, 100)
  num_classes: int = 10
  dropout_rate: float = 0.0
  input_dropout_rate: float = 0.0
  image_shape: Tuple[int, ...] = MNIST_SHAPE

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, return_features: bool = False):
    """Args: x: [B, 28, 28, 1] or [B, 784] in [0, 1]. Returns logits [B, num_classes] (and features)."""
    _check_batched(x, type(self).__name__)
    h = _flatten(x)
    features = collections.OrderedDict()
    if self.input_dropout_rate > 0:
      h = nn.Dropout(self.input_dropout_rate, deterministic=not train)(h)
    for i, width in enumerate(self.widths):
      if i > 0 and self.dropout_rate > 0:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
      h = nn.sigmoid(nn.Dense(width, name=f"hidden_{i}")(h))
      features[f"hidden_{i}"] = h
    if self.widths and self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, name="output")(h)
    return (logits, features) if return_features else logits

  @nn.nowrap
  def architecture(self) -> List[Dict[str, Any]]:
    """Layer descriptors in forward order (see module docstring)."""
    d_in = math.prod(self.image_shape)
    layers = [{"name": "flatten", "type": "flatten", "input_shape": tuple(self.image_shape),
               "output_shape": (d_in,)}]
    for i, width in enumerate(self.widths):
      layers.append({"name": f"hidden_{i}", "type": "dense", "param_path": (f"hidden_{i}",),
                     "input_shape": (d_in,), "output_shape": (width,), "feature": f"hidden_{i}"})
      layers.append({"name": f"hidden_{i}_sigmoid", "type": "sigmoid", "input_shape": (width,),
                     "output_shape": (width,)})
      d_in = width
    layers.append({"name": "output", "type": "dense", "param_path": ("output",), "input_shape": (d_in,),
                   "output_shape": (self.num_classes,)})
    layers.append({"name": "softmax", "type": "softmax", "input_shape": (self.num_classes,),
                   "output_shape": (self.num_classes,)})
    return layers


class FC10(SigmoidMLP):
  """Softmax regression on raw pixels (the paper's FC10(λ); λ is set at training time)."""
  widths: Sequence[int] = ()


# ----------------------------------------------------------------------------------------------------
# AE400-10.


class AutoencoderClassifier(nn.Module):
  """AE400-10: sparse autoencoder (784 -> 400 -> 784, sigmoid) with a softmax on its code (paper.md A13).

  ``__call__`` is the classifier: logits = output(sigmoid(encoder(x))). ``reconstruct`` is the
  autoencoder path used for unsupervised pre-training; it returns ``(code, recon_logits)`` where
  ``sigmoid(recon_logits)`` is the reconstruction. Weights are untied. Params: ``encoder``, ``decoder``,
  ``output``; training freezes ``encoder`` (and ignores ``decoder``) in the classifier stage.

  Attributes:
    code_size: hidden units (400).
    num_classes: output width.
    image_shape: per-example input shape.
  """
  code_size: int = 400
  num_classes: int = 10
  image_shape: Tuple[int, ...] = MNIST_SHAPE

  def setup(self):
    self.encoder = nn.Dense(self.code_size)
    self.decoder = nn.Dense(math.prod(self.image_shape))
    self.output = nn.Dense(self.num_classes)

  def encode(self, x: Array) -> Array:
    """[B, 784] or [B, 28, 28, 1] -> code [B, code_size] in (0, 1)."""
    _check_batched(x, "AutoencoderClassifier")
    return nn.sigmoid(self.encoder(_flatten(x)))

  def reconstruct(self, x: Array) -> Tuple[Array, Array]:
    """Returns (code [B, code_size], reconstruction logits [B, 784])."""
    code = self.encode(x)
    return code, self.decoder(code)

  def __call__(self, x: Array, *, train: bool = False, return_features: bool = False):
    """Args: x: [B, 28, 28, 1] or [B, 784]. Returns logits [B, num_classes] (and features)."""
    del train
    code = self.encode(x)
    if self.is_initializing():
      self.decoder(code)  # create the decoder params too
    logits = self.output(code)
    if return_features:
      return logits, collections.OrderedDict(hidden_0=code)
    return logits

  @nn.nowrap
  def architecture(self) -> List[Dict[str, Any]]:
    """The classifier's layers (the decoder is not part of the classifier function)."""
    d_in = math.prod(self.image_shape)
    return [
        {"name": "flatten", "type": "flatten", "input_shape": tuple(self.image_shape), "output_shape": (d_in,)},
        {"name": "encoder", "type": "dense", "param_path": ("encoder",), "input_shape": (d_in,),
         "output_shape": (self.code_size,), "feature": "hidden_0"},
        {"name": "encoder_sigmoid", "type": "sigmoid", "input_shape": (self.code_size,),
         "output_shape": (self.code_size,)},
        {"name": "output", "type": "dense", "param_path": ("output",), "input_shape": (self.code_size,),
         "output_shape": (self.num_classes,)},
        {"name": "softmax", "type": "softmax", "input_shape": (self.num_classes,),
         "output_shape": (self.num_classes,)},
    ]


# ----------------------------------------------------------------------------------------------------
# Convolutional models.


def _conv_architecture(image_shape, conv_specs, dense_widths, num_classes, *, lrn_after=(),
                       lrn_params=None, pool_after=(), pool_window=(2, 2), pool_strides=(2, 2),
                       pool_padding="VALID", dropout_before=()) -> List[Dict[str, Any]]:
  """Descriptors for conv -> relu [-> lrn] [-> pool] ... -> flatten -> dense stacks."""
  h, w, c = image_shape
  layers = []
  for name, features, window, strides, padding in conv_specs:
    out_h = _conv_out(h, window[0], strides[0], padding)
    out_w = _conv_out(w, window[1], strides[1], padding)
    layers.append({"name": name, "type": "conv", "param_path": (name,), "input_shape": (h, w, c),
                   "output_shape": (out_h, out_w, features), "window": tuple(window), "strides": tuple(strides),
                   "padding": padding, "feature": name})
    h, w, c = out_h, out_w, features
    layers.append({"name": f"{name}_relu", "type": "relu", "input_shape": (h, w, c), "output_shape": (h, w, c)})
    if name in lrn_after:
      layers.append({"name": f"{name}_lrn", "type": "lrn", "input_shape": (h, w, c), "output_shape": (h, w, c),
                     **(lrn_params or {})})
    if name in pool_after:
      pname = pool_after[name]
      out_h = _conv_out(h, pool_window[0], pool_strides[0], pool_padding)
      out_w = _conv_out(w, pool_window[1], pool_strides[1], pool_padding)
      layers.append({"name": pname, "type": "maxpool", "input_shape": (h, w, c), "output_shape": (out_h, out_w, c),
                     "window": tuple(pool_window), "strides": tuple(pool_strides), "padding": pool_padding,
                     "feature": pname})
      h, w = out_h, out_w
  d_in = h * w * c
  layers.append({"name": "flatten", "type": "flatten", "input_shape": (h, w, c), "output_shape": (d_in,)})
  for name, width in dense_widths:
    if name in dropout_before:
      layers.append({"name": f"{name}_dropout", "type": "dropout", "input_shape": (d_in,), "output_shape": (d_in,)})
    layers.append({"name": name, "type": "dense", "param_path": (name,), "input_shape": (d_in,),
                   "output_shape": (width,), "feature": name})
    layers.append({"name": f"{name}_relu", "type": "relu", "input_shape": (width,), "output_shape": (width,)})
    d_in = width
  if "output" in dropout_before:
    layers.append({"name": "output_dropout", "type": "dropout", "input_shape": (d_in,), "output_shape": (d_in,)})
  layers.append({"name": "output", "type": "dense", "param_path": ("output",), "input_shape": (d_in,),
                 "output_shape": (num_classes,)})
  layers.append({"name": "softmax", "type": "softmax", "input_shape": (num_classes,),
                 "output_shape": (num_classes,)})
  return layers


class MnistConvNet(nn.Module):
  """Small LeNet-like ReLU ConvNet for MNIST (paper §3 unit analysis; spectral bounds).

  conv1 5x5 1->c1 VALID, ReLU, max-pool 2x2/2 -> conv2 5x5 c1->c2 VALID, ReLU, max-pool 2x2/2 ->
  fc1 (4*4*c2 -> hidden), ReLU -> output (hidden -> 10). Features: conv1, pool1, conv2, pool2, fc1.

  Attributes:
    channels: (c1, c2), default (16, 32).
    hidden: width of fc1, default 128.
    num_classes: output width.
    dropout_rate: dropout before ``output`` when training.
    image_shape: per-example input shape.
  """
  channels: Tuple[int, int] = (16, 32)
  hidden: int = 128
  num_classes: int = 10
  dropout_rate: float = 0.0
  image_shape: Tuple[int, ...] = MNIST_SHAPE

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, return_features: bool = False):
    """Args: x: [B, 28, 28, 1] or [B, 784]. Returns logits [B, num_classes] (and features)."""
    x = _to_image(x, self.image_shape, "MnistConvNet")
    feats = collections.OrderedDict()
    h = x
    for i, c in enumerate(self.channels):
      h = nn.relu(nn.Conv(c, (5, 5), padding="VALID", name=f"conv{i + 1}")(h))
      feats[f"conv{i + 1}"] = h
      h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      feats[f"pool{i + 1}"] = h
    h = _flatten(h)
    h = nn.relu(nn.Dense(self.hidden, name="fc1")(h))
    feats["fc1"] = h
    if self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, name="output")(h)
    return (logits, feats) if return_features else logits

  @nn.nowrap
  def architecture(self) -> List[Dict[str, Any]]:
    convs = [(f"conv{i + 1}", c, (5, 5), (1, 1), "VALID") for i, c in enumerate(self.channels)]
    return _conv_architecture(
        tuple(self.image_shape), convs, [("fc1", self.hidden)], self.num_classes,
        pool_after={"conv1": "pool1", "conv2": "pool2"},
        dropout_before=("output",) if self.dropout_rate > 0 else ())


class AlexNet(nn.Module):
  """Single-tower AlexNet with the paper's Table 5 sizes (Krizhevsky et al. 2012; paper.md A18).

  conv1 11x11/4 3->96 VALID, ReLU, LRN, max-pool 3x3/2 -> conv2 5x5 96->256 SAME, ReLU, LRN, pool ->
  conv3 3x3 256->384, conv4 3x3 384->384, conv5 3x3 384->256 (SAME, ReLU), pool -> fc1 9216->4096,
  fc2 4096->4096 (ReLU, dropout) -> output 4096->1000. Input 227x227x3: 55 -> 27 -> 13 -> 6, 6*6*256=9216.
  Features: conv1..conv5 (post-ReLU), pool1, pool2, pool5, fc1, fc2.

  Attributes:
    num_classes: 1000.
    dropout_rate: dropout before fc2 and output when training (0.5 in the original).
    lrn: whether to apply local response normalisation after conv1 and conv2.
    image_shape: (227, 227, 3).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  lrn: bool = True
  image_shape: Tuple[int, ...] = (227, 227, 3)

  LRN = {"depth_radius": 2, "bias": 2.0, "alpha": 1e-4, "beta": 0.75}
  CONVS = (("conv1", 96, (11, 11), (4, 4), "VALID"), ("conv2", 256, (5, 5), (1, 1), "SAME"),
           ("conv3", 384, (3, 3), (1, 1), "SAME"), ("conv4", 384, (3, 3), (1, 1), "SAME"),
           ("conv5", 256, (3, 3), (1, 1), "SAME"))
  POOLS = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False, return_features: bool = False):
    """Args: x: [B, 227, 227, 3]. Returns logits [B, num_classes] (and features)."""
    x = _to_image(x, self.image_shape, "AlexNet")
    feats = collections.OrderedDict()
    h = x
    for name, features, window, strides, padding in self.CONVS:
      h = nn.relu(nn.Conv(features, window, strides=strides, padding=padding, name=name)(h))
      feats[name] = h
      if self.lrn and name in ("conv1", "conv2"):
        h = local_response_norm(h, **self.LRN)
      if name in self.POOLS:
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="VALID")
        feats[self.POOLS[name]] = h
    h = _flatten(h)
    for name in ("fc1", "fc2"):
      if name == "fc2" and self.dropout_rate > 0:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
      h = nn.relu(nn.Dense(4096, name=name)(h))
      feats[name] = h
    if self.dropout_rate > 0:
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logits = nn.Dense(self.num_classes, name="output")(h)
    return (logits, feats) if return_features else logits

  @nn.nowrap
  def architecture(self) -> List[Dict[str, Any]]:
    lrn_params = dict(self.LRN)
    lrn_params["size"] = 2 * lrn_params["depth_radius"] + 1
    return _conv_architecture(
        tuple(self.image_shape), self.CONVS, [("fc1", 4096), ("fc2", 4096)], self.num_classes,
        lrn_after=("conv1", "conv2") if self.lrn else (), lrn_params=lrn_params, pool_after=self.POOLS,
        pool_window=(3, 3), pool_strides=(2, 2),
        dropout_before=("fc2", "output") if self.dropout_rate > 0 else ())


# ----------------------------------------------------------------------------------------------------
# Registry.

MODEL_NAMES = ("fc10", "fc100-100-10", "fc200-200-10", "fc123-456-10", "ae400-10", "mnist_conv", "alexnet")
_FC_RE = re.compile(r"^fc(\d+(?:-\d+)*)$")


def model_name_widths(name: str) -> Optional[Tuple[int, ...]]:
  """Hidden widths encoded in an "fc<w1>-...-<classes>" name (e.g. (100, 100) for "fc100-100-10"), else None."""
  m = _FC_RE.match(name.lower())
  if not m:
    return None
  sizes = tuple(int(s) for s in m.group(1).split("-"))
  return sizes[:-1]


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The model called ``name`` (see ``MODEL_NAMES``; any "fc<w1>-...-<classes>" also works).

  Args:
    name: model name, case-insensitive, e.g. "fc100-100-10", "ae400-10", "mnist_conv", "alexnet".
    **kwargs: module attributes to override (e.g. ``dropout_rate=0.5``, ``channels=(8, 16)``).

  Raises:
    ValueError: unknown name.
  """
  key = name.lower().strip()
  if key == "mnist_conv":
    return MnistConvNet(**kwargs)
  if key == "alexnet":
    return AlexNet(**kwargs)
  m = re.match(r"^ae(\d+)-(\d+)$", key)
  if m:
    return AutoencoderClassifier(code_size=int(m.group(1)), num_classes=int(m.group(2)), **kwargs)
  m = _FC_RE.match(key)
  if m:
    sizes = tuple(int(s) for s in m.group(1).split("-"))
    if any(s < 1 for s in sizes):
      raise ValueError(f"get_model: layer widths must be >= 1 in {name!r}")
    if len(sizes) == 1:
      return FC10(num_classes=sizes[0], **kwargs)
    return SigmoidMLP(widths=sizes[:-1], num_classes=sizes[-1], **kwargs)
  raise ValueError(f"get_model: unknown model name {name!r}; known: {', '.join(MODEL_NAMES)} "
                   "or any 'fc<w1>-...-<classes>'")
