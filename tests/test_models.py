"""Tests of intriguing_jax.models: shapes, exact parameter counts, features, heads, traced layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from intriguing_jax import models

# name -> (exact parameter count, per-example input shape, output width)
_EXPECTED = {
    "fc10": (784 * 10 + 10, (28, 28, 1), 10),
    "fc100-100-10": (784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10, (28, 28, 1), 10),
    "fc200-200-10": (784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10, (28, 28, 1), 10),
    "fc123-456-10": (784 * 123 + 123 + 123 * 456 + 456 + 456 * 10 + 10, (28, 28, 1), 10),
    # encoder 784->400, decoder 400->784, softmax 400->10
    "ae400-10": (784 * 400 + 400 + 400 * 784 + 784 + 400 * 10 + 10, (28, 28, 1), 10),
    # conv1 5x5x1x16, conv2 5x5x16x32, fc1 512->128, output 128->10
    "mnist_conv": (25 * 16 + 16 + 25 * 16 * 32 + 32 + 512 * 128 + 128 + 128 * 10 + 10, (28, 28, 1), 10),
}

# Paper Table 5 (single tower): kernel sizes of the eight AlexNet layers, in the paper's notation.
_ALEXNET_TABLE5 = [
    ("conv1", (11, 11, 3, 96)),     # 3x11x11x96, stride 4
    ("conv2", (5, 5, 96, 256)),     # 96x5x5x256
    ("conv3", (3, 3, 256, 384)),    # 256x3x3x384
    ("conv4", (3, 3, 384, 384)),    # 384x3x3x384
    ("conv5", (3, 3, 384, 256)),    # 384x3x3x256
    ("fc1", (9216, 4096)),          # 9216x4096
    ("fc2", (4096, 4096)),          # 4096x4096
    ("output", (4096, 1000)),       # 4096x1000
]


@functools.lru_cache(maxsize=None)
def _variables(name, **kwargs):
  """Random variables of get_model(name) on the init shapes (numpy: no Flax init to compile)."""
  return random_variables(models.get_model(name, **kwargs), _EXPECTED.get(name, _EXPECTED["fc10"])[1],
                          scale=0.1)


def _feature_order(model, variables, shape):
  """The features dict's own order (jit and eval_shape return dicts with sorted keys)."""
  order = []
  jax.eval_shape(lambda v, x: order.extend(model.apply(v, x, method="features")), variables, jnp.zeros((1,) + shape))
  return order


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_param_counts_features_and_weight_layers_from_the_trace(name):
  count, shape, width = _EXPECTED[name]
  model = models.get_model(name)
  variables = _variables(name)
  assert models.count_params(variables) == count
  out = jax.eval_shape(model.apply, variables, jnp.zeros((3,) + shape))
  assert out.shape == (3, width)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables, jnp.zeros((3,) + shape))
  calls = models.trace_layers(model, variables, shape)
  # Every feature is the output of a traced layer of the same per-example shape, in forward order.
  outputs = {c.path[0]: c.output_shape for c in calls}
  order = [c.path[0] for c in calls]
  producer = {f: f if f.startswith("pool") else
              next(p for p in (f"{f}_relu", f"{f}_sigmoid", "encoder_sigmoid") if p in outputs) for f in feats}
  names = _feature_order(model, variables, shape)
  assert [order.index(producer[f]) for f in names] == sorted(order.index(producer[f]) for f in names)
  for f, a in feats.items():
    assert a.shape == (3,) + outputs[producer[f]], f
  assert bool(feats) == (name != "fc10")
  # Dense/Conv paths: every classifier layer once, in forward order (the AE decoder is not part of it).
  paths = models.weight_layer_paths(model, variables, shape)
  assert set(paths) == {(k,) for k in variables["params"]} - {("decoder",)} and len(paths) == len(set(paths))
  assert paths[-1] == ("output",)
  by_path = {c.path: c for c in calls}
  for path in paths:
    kernel = models.get_param(variables, path)["kernel"]
    assert kernel.shape[-2] == by_path[path].input_shape[-1] and kernel.shape[-1] == by_path[path].output_shape[-1]


@pytest.mark.parametrize("name", ["mnist_conv", pytest.param("ae400-10", marks=pytest.mark.slow),
                                  pytest.param("fc100-100-10", marks=pytest.mark.slow)])
def test_flat_and_image_inputs_give_the_same_logits(name):
  model, variables = models.get_model(name), _variables(name)
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1))
  np.testing.assert_allclose(model.apply(variables, x.reshape(3, -1)), model.apply(variables, x), rtol=1e-6,
                             atol=1e-6)


def test_trace_rejects_an_input_shape_the_model_cannot_take():
  for name in ("mnist_conv", "fc100-100-10"):
    with pytest.raises(ValueError, match=r"cannot take an input of shape \(27, 27, 1\)"):
      models.trace_layers(models.get_model(name), _variables(name), (27, 27, 1))


def test_traced_conv_layer_reproduces_layer_output():
  """The traced conv module (window, strides, padding, input shape) recomputes the layer with lax.conv."""
  model = models.get_model("mnist_conv")
  variables = _variables("mnist_conv")
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 28, 28, 1))
  feats = model.apply(variables, x, method="features")
  conv = [c for c in models.trace_layers(model, variables, (28, 28, 1)) if c.path == ("conv1",)][0]
  assert conv.input_shape == (28, 28, 1) and conv.output_shape == (24, 24, 16)
  assert conv.module.strides in (1, (1, 1)) and conv.module.kernel_size == (5, 5)
  p = models.get_param(variables, conv.path)
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), conv.module.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"][None, None, None]
  np.testing.assert_allclose(jax.nn.relu(y), feats["conv1"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fc8-6-10", "fc10", "ae16-10"])
def test_head_continues_the_forward_pass(name):
  model = models.get_model(name)
  variables = _variables(name)
  x = jax.random.uniform(jax.random.PRNGKey(6), (4, 784))
  logits = model.apply(variables, x)
  feats = model.apply(variables, x, method="features")
  for layer in ["input"] + list(feats):
    h = x if layer == "input" else feats[layer]
    np.testing.assert_allclose(model.apply(variables, h, layer, method="head"), logits, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="unknown layer 'hidden_7'"):
    model.apply(variables, x, "hidden_7", method="head")


def test_dropout_only_when_training_and_head_draws_as_the_whole_network():
  model = models.get_model("fc8-6-10", dropout_rate=0.5, input_dropout_rate=0.2)
  variables = _variables("fc8-6-10")
  x = jax.random.uniform(jax.random.PRNGKey(6), (4, 784))
  rngs = {"dropout": jax.random.PRNGKey(3)}
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  full = model.apply(variables, x, train=True, rngs=rngs)
  assert not np.allclose(full, model.apply(variables, x))
  assert not np.allclose(full, model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(4)}))
  # Named as Flax auto-names them on the whole pass (so training draws the same masks as before heads existed).
  no_input_dropout = models.get_model("fc8-6-10", dropout_rate=0.5)
  assert [c.path for c in models.trace_layers(no_input_dropout, variables, (784,))
          if isinstance(c.module, nn.Dropout)] == [("Dropout_0",), ("Dropout_1",)]
  feats = model.apply(variables, x, train=True, rngs=rngs, method="features")
  for layer in ("input", "hidden_0", "hidden_1"):
    h = x if layer == "input" else feats[layer]
    np.testing.assert_allclose(model.apply(variables, h, layer, train=True, rngs=rngs, method="head"), full,
                               rtol=1e-6)


def test_feature_fn_is_hashable_by_value():
  fn = models.feature_fn(models.get_model("fc8-6-10"))
  assert fn == models.feature_fn(models.get_model("fc8-6-10")) and hash(fn) == hash(
      models.feature_fn(models.get_model("fc8-6-10")))
  assert fn != models.feature_fn(models.get_model("fc8-7-10"))
  variables = _variables("fc8-6-10")
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 784))
  feats = fn(variables, x)
  assert list(feats) == ["hidden_0", "hidden_1"] and feats["hidden_1"].shape == (4, 6)
  p = variables["params"]["hidden_0"]  # post-activation values
  np.testing.assert_allclose(feats["hidden_0"], jax.nn.sigmoid(x @ p["kernel"] + p["bias"][None]), rtol=1e-5,
                             atol=1e-6)


def test_autoencoder_reconstruct():
  model = models.get_model("ae16-10")
  variables = _variables("ae16-10")
  x = jax.random.uniform(jax.random.PRNGKey(4), (5, 28, 28, 1))
  code, recon = model.apply(variables, x, method="reconstruct")
  assert code.shape == (5, 16) and recon.shape == (5, 784)
  assert float(code.min()) >= 0 and float(code.max()) <= 1


def test_alexnet_matches_table5():
  """AlexNet's per-layer kernel sizes are the paper's Table 5; conv5 pools to 6x6x256 = 9216."""
  model = models.get_model("alexnet")
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 227, 227, 3)))
  calls = models.trace_layers(model, variables, (227, 227, 3))
  layers = [c for c in calls if c.path in models.weight_layer_paths(model, variables, (227, 227, 3))]
  assert [c.path for c in layers] == [(n,) for n, _ in _ALEXNET_TABLE5]
  for c, (name, shape) in zip(layers, _ALEXNET_TABLE5):
    assert models.get_param(variables, c.path)["kernel"].shape == shape, name
  assert layers[0].module.strides == (4, 4) and layers[0].input_shape == (227, 227, 3)
  assert [c.input_shape[:2] for c in layers[1:5]] == [(27, 27)] + [(13, 13)] * 3
  pools = [c for c in calls if isinstance(c.module, models.MaxPool)]
  assert [(c.module.window, c.module.strides) for c in pools] == [((3, 3), (2, 2))] * 3
  assert pools[-1].output_shape == (6, 6, 256)
  assert sum(isinstance(c.module, models.LocalResponseNorm) for c in calls) == 2
  total = sum(int(np.prod(s)) + s[-1] for _, s in _ALEXNET_TABLE5)
  assert models.count_params(variables) == total == 62_378_344
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 227, 227, 3))), variables)
  assert out.shape == (2, 1000)


def test_local_response_norm_matches_direct_sum():
  xn = np.random.default_rng(5).standard_normal((2, 3, 3, 7)).astype(np.float32)
  y = models.LocalResponseNorm(depth_radius=2, bias=2.0, alpha=1e-1, beta=0.75).apply({}, jnp.asarray(xn))
  expect = np.empty_like(xn)
  for c in range(7):
    lo, hi = max(0, c - 2), min(7, c + 3)
    denom = 2.0 + 0.1 / 5 * np.sum(xn[..., lo:hi] ** 2, axis=-1)
    expect[..., c] = xn[..., c] / denom ** 0.75
  np.testing.assert_allclose(y, expect, rtol=1e-5)


def test_get_model_names_and_errors():
  assert models.get_model("FC123-456-10").widths == (123, 456)
  assert isinstance(models.get_model("fc10"), models.FC10)
  with pytest.raises(ValueError, match="unknown model name"):
    models.get_model("resnet50")
  with pytest.raises(ValueError, match="code size"):   # was ZeroDivisionError at init
    models.get_model("ae0-10")
  with pytest.raises(ValueError, match="set by its name"):   # was TypeError "multiple values"
    models.get_model("fc10", num_classes=5)
  listed = models.SigmoidMLP(widths=[16])   # a list field made the module unhashable for the trainers
  assert listed == models.SigmoidMLP(widths=(16,)) and hash(listed) == hash(models.SigmoidMLP(widths=(16,)))
  with pytest.raises(ValueError, match="neither"):
    models.get_model("mnist_conv").apply(_variables("mnist_conv"), jnp.zeros((2, 27, 27, 1)))
  with pytest.raises(ValueError, match="batched"):
    models.get_model("fc10").apply(_variables("fc10"), jnp.zeros((784,)))
