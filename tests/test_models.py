"""Tests of intriguing_jax.models: shapes, exact parameter counts, features, architecture descriptors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _init(model, shape, batch=2):
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((batch,) + tuple(shape)))


@functools.lru_cache(maxsize=None)
def _init_named(name):
  """Variables of get_model(name), initialised once per test session (shared by several tests)."""
  model = models.get_model(name)
  return _init(model, _EXPECTED[name][1])


def _apply(model):
  """Jitted model.apply (one compile per shape instead of op-by-op dispatch: keeps the tests fast)."""
  return jax.jit(model.apply, static_argnames=("return_features", "train", "method"))


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_shapes_param_counts_and_features(name):
  count, shape, width = _EXPECTED[name]
  model = models.get_model(name)
  variables = _init_named(name)
  assert models.count_params(variables) == count
  x = jax.random.uniform(jax.random.PRNGKey(1), (3,) + shape)
  apply = _apply(model)
  logits2, feats = apply(variables, x, return_features=True)
  logits = apply(variables, x)
  assert logits.shape == (3, width)
  np.testing.assert_allclose(logits2, logits, rtol=1e-6, atol=1e-6)
  # Flat [B, 784] input gives the same logits.
  np.testing.assert_allclose(apply(variables, x.reshape(3, -1)), logits, rtol=1e-6, atol=1e-6)
  arch = model.architecture()
  # Features: one per descriptor carrying "feature", same order and per-example shape.
  feature_layers = [d for d in arch if "feature" in d]
  assert list(feats) == [d["feature"] for d in feature_layers]
  for d in feature_layers:
    assert feats[d["feature"]].shape == (3,) + tuple(d["output_shape"]), d["name"]
  if name != "fc10":
    assert feats, "hidden models must expose hidden layers"


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_architecture_descriptors_point_at_real_params(name):
  model = models.get_model(name)
  variables = _init_named(name)
  arch = model.architecture()
  assert arch[-1]["type"] == "softmax"
  prev_out = None
  seen = set()
  for d in arch:
    assert d["type"] in {"dense", "conv", "maxpool", "avgpool", "relu", "sigmoid", "lrn", "contrast_norm",
                         "flatten", "dropout", "softmax"}
    if prev_out is not None:
      assert tuple(d["input_shape"]) == tuple(prev_out), d["name"]   # descriptors chain
    prev_out = d["output_shape"]
    if d["type"] in ("dense", "conv"):
      p = models.get_param(variables, d["param_path"])
      seen.add(d["param_path"])
      k = p["kernel"]
      assert k.shape[-1] == d["output_shape"][-1] and p["bias"].shape == (k.shape[-1],)
      if d["type"] == "dense":
        assert k.shape == (d["input_shape"][0], d["output_shape"][0])
      else:
        assert k.shape == tuple(d["window"]) + (d["input_shape"][-1], d["output_shape"][-1])
  # Every classifier layer is described (the AE decoder is not part of the classifier).
  expected = {(k,) for k in variables["params"]} - {("decoder",)}
  assert seen == expected


def test_conv_descriptor_reproduces_layer_output():
  """The conv descriptor (window, strides, padding, input shape) recomputes the layer with lax.conv."""
  model = models.get_model("mnist_conv")
  variables = _init_named("mnist_conv")
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 28, 28, 1))
  _, feats = _apply(model)(variables, x, return_features=True)
  d = [d for d in model.architecture() if d["name"] == "conv1"][0]
  p = models.get_param(variables, d["param_path"])
  y = jax.lax.conv_general_dilated(x, p["kernel"], d["strides"], d["padding"],
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"][None, None, None]
  np.testing.assert_allclose(jax.nn.relu(y), feats["conv1"], rtol=1e-5, atol=1e-5)


def test_sigmoid_features_are_post_activation():
  model = models.get_model("fc100-100-10")
  variables = _init_named("fc100-100-10")
  x = jax.random.uniform(jax.random.PRNGKey(3), (4, 784))
  _, feats = model.apply(variables, x, return_features=True)
  p = variables["params"]["hidden_0"]
  np.testing.assert_allclose(feats["hidden_0"], jax.nn.sigmoid(x @ p["kernel"] + p["bias"][None]), rtol=1e-5, atol=1e-6)


def test_autoencoder_reconstruct():
  model = models.get_model("ae400-10")
  variables = _init_named("ae400-10")
  x = jax.random.uniform(jax.random.PRNGKey(4), (5, 28, 28, 1))
  code, recon = _apply(model)(variables, x, method="reconstruct")
  assert code.shape == (5, 400) and recon.shape == (5, 784)
  assert float(code.min()) >= 0 and float(code.max()) <= 1


def test_alexnet_matches_table5():
  """AlexNet's per-layer kernel sizes are the paper's Table 5; conv5 pools to 6x6x256 = 9216."""
  model = models.get_model("alexnet")
  variables = jax.eval_shape(lambda: _init(model, (227, 227, 3), batch=1))
  layers = models.weight_layers(model)
  assert [d["name"] for d in layers] == [n for n, _ in _ALEXNET_TABLE5]
  for d, (name, shape) in zip(layers, _ALEXNET_TABLE5):
    assert models.get_param(variables, d["param_path"])["kernel"].shape == shape, name
  assert layers[0]["strides"] == (4, 4) and layers[0]["input_shape"] == (227, 227, 3)
  assert [d["input_shape"][:2] for d in layers[1:5]] == [(27, 27)] + [(13, 13)] * 3
  pools = [d for d in model.architecture() if d["type"] == "maxpool"]
  assert [(d["window"], d["strides"]) for d in pools] == [((3, 3), (2, 2))] * 3
  assert pools[-1]["output_shape"] == (6, 6, 256)
  assert sum(d["type"] == "lrn" for d in model.architecture()) == 2
  total = sum(int(np.prod(s)) + s[-1] for _, s in _ALEXNET_TABLE5)
  assert models.count_params(variables) == total == 62_378_344
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 227, 227, 3))), variables)
  assert out.shape == (2, 1000)


def test_local_response_norm_matches_direct_sum():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 3, 7))
  y = models.local_response_norm(x, depth_radius=2, bias=2.0, alpha=1e-1, beta=0.75)
  xn = np.asarray(x)
  expect = np.empty_like(xn)
  for c in range(7):
    lo, hi = max(0, c - 2), min(7, c + 3)
    denom = 2.0 + 0.1 / 5 * np.sum(xn[..., lo:hi] ** 2, axis=-1)
    expect[..., c] = xn[..., c] / denom ** 0.75
  np.testing.assert_allclose(y, expect, rtol=1e-5)


def test_dropout_only_when_training():
  model = models.get_model("fc100-100-10", dropout_rate=0.5)
  variables = _init(model, (28, 28, 1))
  x = jnp.ones((2, 784))
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(a, b)


def test_get_model_names_and_errors():
  assert models.get_model("FC123-456-10").widths == (123, 456)
  assert isinstance(models.get_model("fc10"), models.FC10)
  with pytest.raises(ValueError, match="unknown model name"):
    models.get_model("resnet50")
  model = models.get_model("mnist_conv")
  variables = _init_named("mnist_conv")
  with pytest.raises(ValueError, match="neither"):
    model.apply(variables, jnp.zeros((2, 27, 27, 1)))
  with pytest.raises(ValueError, match="batched"):
    models.get_model("fc10").apply(_init_named("fc10"), jnp.zeros((784,)))
