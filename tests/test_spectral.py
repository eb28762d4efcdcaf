"""Tests for intriguing_jax.spectral: exact norms against dense operator matrices, bounds attained and sound."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from conftest import random_variables
from intriguing_jax import models
from intriguing_jax import spectral

_DIMS = ("NHWC", "HWIO", "NHWC")


def _dense_matrix(kernel, hw, strides, padding):
  """The layer's matrix [in, out], built independently of the library: lax conv applied to basis vectors."""
  kernel = jnp.asarray(kernel)
  c = kernel.shape[2]

  def op(x):
    if padding == "CIRCULAR":
      pads = tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2])  # as Flax padding="CIRCULAR"
      x = jnp.pad(x, pads + ((0, 0),), mode="wrap")
      pad = "VALID"
    else:
      pad = padding
    return lax.conv_general_dilated(x[None], kernel, strides, pad, dimension_numbers=_DIMS)[0]

  eye = jnp.eye(hw[0] * hw[1] * c, dtype=kernel.dtype).reshape(-1, hw[0], hw[1], c)
  return np.asarray(jax.vmap(op)(eye).reshape(hw[0] * hw[1] * c, -1))


# (H, W, kh, kw, C_in, C_out, sh, sw): strides 1, 2, 4, odd/even kernels, C_in != C_out, k < s, k = s,
# k > N (folded taps), rectangular kernels/inputs/strides.
_CIRC_CASES = [
    pytest.param(8, 8, 3, 3, 2, 3, 1, 1, marks=pytest.mark.slow),
    pytest.param(8, 8, 4, 4, 3, 2, 2, 2, marks=pytest.mark.slow),
    pytest.param(16, 16, 5, 5, 2, 3, 4, 4, marks=pytest.mark.slow),
    pytest.param(16, 16, 11, 11, 3, 4, 4, 4, marks=pytest.mark.slow),
    pytest.param(8, 8, 2, 2, 3, 2, 4, 4, marks=pytest.mark.slow),
    pytest.param(8, 8, 11, 11, 2, 2, 2, 2, marks=pytest.mark.slow),
    (8, 12, 3, 2, 2, 3, 2, 3),
]


@pytest.mark.parametrize("h,w,kh,kw,c,d,sh,sw", _CIRC_CASES)
def test_fft_norm_and_full_spectrum_match_dense_circular(h, w, kh, kw, c, d, sh, sw):
  with jax.enable_x64(True):
    kernel = np.random.default_rng(h + kh + c + sh).normal(size=(kh, kw, c, d))
    sv = np.linalg.svd(_dense_matrix(kernel, (h, w), (sh, sw), "CIRCULAR"), compute_uv=False)
    r = spectral.conv_operator_norm(kernel, input_shape=(h, w, c), strides=(sh, sw), padding="CIRCULAR")
    assert r.value == pytest.approx(sv[0], rel=1e-10)  # float64: exact up to rounding
    assert r.lower == r.upper == r.value == r.circular
    spectrum = spectral.conv_singular_values(kernel, (h, w), (sh, sw))
    assert spectrum.shape == sv.shape
    np.testing.assert_allclose(spectrum, sv, rtol=0, atol=1e-9 * sv[0])
    # The paper's printed Δ⁻² formula is exactly norm / √(sh·sw) (= norm/Δ); see paper.md §9 A19.
    assert r.paper_formula == pytest.approx(sv[0] / math.sqrt(sh * sw), rel=1e-10)


def _paper_formula(kernel, n, s, coefficient):
  """The paper's eq. (1) evaluated literally: sup_ξ ‖A(ξ)‖, A(ξ)_{d,(c,l)} = coef · ŵ_{c,d}(ξ + l·N/Δ), with
  ŵ the N-point DFT (paper.md §9 A19.2 reads the printed /N² as /N) and ξ on the (N/Δ)² grid."""
  m = n // s
  what = np.fft.fft2(kernel, s=(n, n), axes=(0, 1))  # [N, N, C, D]
  a = what.reshape(s, m, s, m, kernel.shape[2], kernel.shape[3])  # frequency index l·M + ξ
  a = a.transpose(1, 3, 5, 0, 2, 4).reshape(m * m, kernel.shape[3], s * s * kernel.shape[2])
  return np.linalg.svd(a, compute_uv=False)[:, 0].max() * coefficient


@pytest.mark.parametrize("n,k,c,d,s", [(8, 3, 2, 3, 2), pytest.param(16, 5, 3, 2, 4, marks=pytest.mark.slow),
                                       pytest.param(12, 3, 2, 2, 3, marks=pytest.mark.slow)])
def test_paper_formula_literal_and_exact_coefficient(n, k, c, d, s):
  """Eq. (1): coefficient Δ⁻¹ gives the norm; the printed Δ⁻² gives norm/Δ, the table's "paper" value."""
  with jax.enable_x64(True):
    kernel = np.random.default_rng(n * k + s).normal(size=(k, k, c, d))
    exact = np.linalg.svd(_dense_matrix(kernel, (n, n), (s, s), "CIRCULAR"), compute_uv=False)[0]
    r = spectral.conv_operator_norm(kernel, input_shape=(n, n, c), strides=s, padding="CIRCULAR")
  assert _paper_formula(kernel, n, s, 1 / s) == pytest.approx(exact, rel=1e-10)
  assert _paper_formula(kernel, n, s, 1 / s**2) == pytest.approx(exact / s, rel=1e-10)
  assert r.paper_formula == pytest.approx(exact / s, rel=1e-10)


@pytest.mark.slow
def test_float32_fft_norm_within_1e4_of_float64_dense():
  kernel = np.random.default_rng(3).normal(size=(5, 5, 3, 4))
  with jax.enable_x64(True):
    exact = np.linalg.svd(_dense_matrix(kernel, (16, 16), (2, 2), "CIRCULAR"), compute_uv=False)[0]
  r = spectral.conv_operator_norm(jnp.asarray(kernel, jnp.float32), input_shape=(16, 16, 3), strides=2)
  assert abs(r.value / exact - 1) < 1e-4


def test_conv_apply_matches_flax_circular_and_same_conv():
  """The operator whose norm we compute is the one Flax runs (same padding convention)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 12, 12, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((4, 3, 3, 5)), jnp.float32)
  for padding in ("CIRCULAR", "SAME", "VALID"):
    conv = nn.Conv(5, (4, 3), strides=(2, 3), padding=padding, use_bias=False)
    pads = spectral.resolve_padding(padding, (12, 12), (4, 3), (2, 3))
    np.testing.assert_allclose(spectral.conv_apply(kernel, x[0], (2, 3), pads),
                               conv.apply({"params": {"kernel": kernel}}, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,c,d,s,padding", [
    pytest.param(12, 5, 2, 3, 2, "SAME", marks=pytest.mark.slow),
    pytest.param(12, 5, 2, 3, 2, ((2, 1), (0, 3)), marks=pytest.mark.slow),
    pytest.param(8, 3, 2, 3, 1, "SAME", marks=pytest.mark.slow), pytest.param(9, 4, 3, 2, 2, "SAME", marks=pytest.mark.slow),
    pytest.param(16, 3, 2, 2, 4, "VALID", marks=pytest.mark.slow)])
def test_zero_padding_matrix_free_matches_dense_and_bounds_are_certified(n, k, c, d, s, padding):
  with jax.enable_x64(True):
    kernel = np.random.default_rng(n + k + d).normal(size=(k, k, c, d))
    exact = np.linalg.svd(_dense_matrix(kernel, (n, n), (s, s), padding), compute_uv=False)[0]
    kw = dict(input_shape=(n, n, c), strides=s, padding=padding)
    fft = spectral.conv_operator_norm(kernel, method="fft", **kw)
    lanczos = spectral.conv_operator_norm(kernel, method="lanczos", num_steps=60, num_grids=3, **kw)
    for r in (fft, lanczos):
      assert r.lower <= exact * (1 + 1e-12) and exact <= r.upper * (1 + 1e-12)  # certified sandwich
    assert lanczos.value == pytest.approx(exact, rel=1e-8)
    assert lanczos.upper <= fft.upper  # min over more embedding grids
    assert fft.upper / exact - 1 < 0.5  # the circular embedding bound is reasonably tight


@pytest.mark.slow
def test_circular_norm_is_not_ordered_against_same_padding():
  """spectral.md §2.3: kernel [1, -2, 1]; circ < SAME at N=5 and circ > SAME at N=6, so circ(N) is no bound."""
  with jax.enable_x64(True):
    kernel = np.array([1.0, -2.0, 1.0]).reshape(1, 3, 1, 1)
    got = {}
    for n in (5, 6):
      kw = dict(input_shape=(1, n, 1), strides=1)
      got[n] = (spectral.conv_operator_norm(kernel, padding="CIRCULAR", **kw).value,
                spectral.conv_operator_norm(kernel, padding="SAME", method="lanczos", num_steps=n, **kw))
  assert got[5][0] < got[5][1].value and got[6][0] > got[6][1].value
  assert got[5][0] == pytest.approx(3.618034, abs=1e-6) and got[5][1].value == pytest.approx(3.732051, abs=1e-6)
  assert got[5][1].upper >= got[5][1].value and got[6][1].upper >= got[6][1].value


@pytest.mark.slow
def test_adjoint_identity_of_the_transposed_operator():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
  x = jax.random.normal(jax.random.PRNGKey(1), (10, 10, 2))
  op = lambda v: spectral.conv_apply(kernel, v, (2, 2), ((1, 1), (1, 1)))
  y = jax.random.normal(jax.random.PRNGKey(2), op(x).shape)
  op_t = jax.linear_transpose(op, x)
  assert float(jnp.vdot(op(x), y)) == pytest.approx(float(jnp.vdot(x, op_t(y)[0])), rel=1e-4)


@pytest.mark.slow
def test_degenerate_cases_delta_kernel_and_1x1_conv():
  delta = np.zeros((3, 3, 2, 2), np.float32)
  delta[1, 1] = np.eye(2)
  for padding in ("CIRCULAR", "SAME"):
    r = spectral.conv_operator_norm(delta, input_shape=(8, 8, 2), padding=padding)
    assert r.value == pytest.approx(1.0, rel=1e-6) and r.upper == pytest.approx(1.0, rel=1e-6)
  w = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  sigma = np.linalg.svd(w, compute_uv=False)[0]
  r = spectral.conv_operator_norm(w.reshape(1, 1, 5, 7), input_shape=(6, 6, 5), padding="VALID")
  assert r.value == pytest.approx(sigma, rel=1e-5) and r.lower == pytest.approx(sigma, rel=1e-5)
  assert spectral.dense_operator_norm(w) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("k,s", [(5, 2), (3, 1), (4, 4), (11, 4)])
def test_reshaped_kernel_norm_sandwich(k, s):
  """Flax SpectralNorm's reshaped-kernel value under-reports: ‖W_r‖ ≤ ‖K‖ ≤ √(⌈k/s⌉²)‖W_r‖ (= when k ≤ s)."""
  kernel = np.random.default_rng(k + s).normal(size=(k, k, 3, 5)).astype(np.float32)
  exact = spectral.conv_operator_norm(kernel, input_shape=(16, 16, 3), strides=s).value
  reshaped = spectral.reshaped_kernel_norm(kernel)
  assert reshaped <= exact * (1 + 1e-5) and exact <= -(-k // s) * reshaped * (1 + 1e-5)
  if k <= s:
    assert exact == pytest.approx(reshaped, rel=1e-5)


@pytest.mark.slow
def test_dense_lanczos_matches_svd():
  w = jax.random.normal(jax.random.PRNGKey(0), (300, 200)) / 10
  exact = float(np.linalg.svd(np.asarray(w), compute_uv=False)[0])
  assert spectral.dense_operator_norm(w, method="lanczos", num_steps=120) == pytest.approx(exact, rel=1e-5)
  assert spectral.dense_operator_norm(w.T, method="lanczos", num_steps=120) == pytest.approx(exact, rel=1e-5)
  assert spectral.dense_operator_norm(w, method="svd") == pytest.approx(exact, rel=1e-6)


@pytest.mark.slow
def test_dense_lanczos_early_stop_is_certified_by_its_residual():
  """The block Lanczos stops early only with a top Ritz residual <= tol·θ; tol=0 runs every block."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  u, v = jax.random.normal(k2, (400,)), jax.random.normal(k3, (240,))
  w = jax.random.normal(k1, (400, 240)) / 20 + 3 * jnp.outer(u / jnp.linalg.norm(u), v / jnp.linalg.norm(v))
  exact = float(np.linalg.svd(np.asarray(w), compute_uv=False)[0])
  v0 = jax.random.normal(jax.random.PRNGKey(0), (240, 8))
  value, used, rel = spectral._dense_block_krylov(w, v0, 12, jnp.asarray(1e-3, w.dtype))
  assert int(used) < 12 and float(rel) <= 1e-3
  assert float(value) <= exact * (1 + 1e-6) and float(value) == pytest.approx(exact, rel=1e-5)
  value0, used0, rel0 = spectral._dense_block_krylov(w, v0, 12, jnp.asarray(0.0, w.dtype))
  assert int(used0) == 12 and float(rel0) < float(rel)
  assert float(value0) == pytest.approx(exact, rel=1e-5)
  with pytest.raises(ValueError, match="tol"):
    spectral.dense_operator_norm(w, method="lanczos", tol=1.5)


@pytest.mark.parametrize("window,strides,expected", [
    ((3, 3), (2, 2), 2.0), pytest.param((2, 2), (2, 2), 1.0, marks=pytest.mark.slow), pytest.param((3, 3), (1, 1), 3.0, marks=pytest.mark.slow),
    pytest.param((3, 2), (2, 2), math.sqrt(2), marks=pytest.mark.slow)])
def test_maxpool_bound_is_attained_and_never_exceeded(window, strides, expected):
  shape = (9, 9, 2)
  bound = spectral.maxpool_lipschitz(window, strides, input_shape=shape)
  assert bound == pytest.approx(expected)
  assert spectral.maxpool_lipschitz(window, strides) == pytest.approx(expected)  # large-map formula
  pool = lambda x: nn.max_pool(x[None], window, strides, "VALID")[0]
  # Worst case: constant x, bump at a pixel covered by the most windows (interior, on the stride grid).
  x = jnp.zeros(shape)
  y = x.at[strides[0] * 2, strides[1] * 2, 0].set(0.1)
  ratio = float(jnp.linalg.norm(pool(y) - pool(x)) / jnp.linalg.norm(y - x))
  assert ratio == pytest.approx(expected, rel=1e-6)
  rng = np.random.default_rng(0)
  a = rng.standard_normal((64,) + shape).astype(np.float32)
  b = a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
  num = jnp.linalg.norm((jax.vmap(pool)(a) - jax.vmap(pool)(b)).reshape(64, -1), axis=1)
  assert float(jnp.max(num / jnp.linalg.norm((a - b).reshape(64, -1), axis=1))) <= bound + 1e-6


def test_maxpool_counts_with_same_padding_on_small_maps():
  # 3x3/2 SAME on a 4x4 map: pads (0, 1); windows start at 0 and 2, so pixel 2 is covered twice per axis.
  assert spectral.maxpool_lipschitz(3, 2, input_shape=(4, 4), padding="SAME") == pytest.approx(2.0)
  # 3x3/2 on a 3x3 map (one window): no overlap can happen.
  assert spectral.maxpool_lipschitz(3, 2, input_shape=(3, 3)) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_contrast_norm_bound_attained_at_zero_and_sound(gamma):
  eps = 0.3
  bound = spectral.contrast_norm_lipschitz(eps, gamma)
  phi = lambda x: x / (eps + jnp.sum(x * x)) ** gamma
  jac0 = jax.jacfwd(phi)(jnp.zeros(6))
  assert float(jnp.linalg.norm(jac0, 2)) == pytest.approx(bound, rel=1e-6)
  xs = jnp.asarray(np.random.default_rng(0).standard_normal((300, 6)) * np.logspace(-2, 1, 300)[:, None], jnp.float32)
  norms = jax.vmap(lambda x: jnp.linalg.norm(jax.jacfwd(phi)(x), 2))(xs)
  assert float(norms.max()) <= bound * (1 + 1e-6)


@pytest.mark.slow
def test_lrn_interval_contains_the_jacobian_norms():
  k, n, alpha, beta = 2.0, 5, 1e-1, 0.75
  lower, upper = spectral.lrn_lipschitz(k, n, beta)
  assert (lower, upper) == pytest.approx((0.5946, 1.1894), abs=1e-4)  # spectral.md rounds to 1.1895

  def lrn(a):  # across-channel LRN at one pixel, window n centred on each channel
    sq = jnp.pad(a * a, (n // 2, n // 2))
    s = jnp.convolve(sq, jnp.ones(n), mode="valid")
    return a * (k + alpha / n * s) ** (-beta)

  assert float(jnp.linalg.norm(jax.jacfwd(lrn)(jnp.zeros(8)), 2)) == pytest.approx(lower, rel=1e-6)
  xs = jax.random.normal(jax.random.PRNGKey(0), (300, 8)) * jnp.logspace(-1, 1.5, 300)[:, None]
  norms = jax.vmap(lambda a: jnp.linalg.norm(jax.jacfwd(lrn)(a), 2))(xs)
  assert float(norms.max()) <= upper


class _SmallConvNet(nn.Module):
  """A tiny chain of the supported layers (stands in for the models of intriguing_jax.models)."""
  sigmoid_as_function: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", name="conv1")(x)
    x = models.Activation("relu", name="relu1")(x)
    x = models.MaxPool((3, 3), (2, 2), name="pool1")(x)
    x = nn.Dense(6, name="fc1")(models.Flatten(name="flatten")(x))
    x = nn.sigmoid(x) if self.sigmoid_as_function else models.Activation("sigmoid", name="sig1")(x)
    return nn.Dense(3, name="fc2")(x)


def _small_conv_net(**kwargs):
  """The model and random variables (numpy on the init shapes: no init to compile)."""
  model = _SmallConvNet(**kwargs)
  return model, random_variables(model, (12, 12, 2), seed=1)


def test_lipschitz_table_is_sound_against_empirical_lower_bounds():
  model, variables = _small_conv_net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 12, 12, 2)), jnp.float32)
  rows, summary = spectral.lipschitz_table(model, variables, (12, 12, 2))
  assert [r["layer"] for r in rows] == ["conv1", "relu1", "pool1", "flatten", "fc1", "sig1", "fc2"]
  assert [r["input"] for r in rows] == ["12x12x2", "6x6x4", "6x6x4", "2x2x4", "16", "6", "6"]
  pool = rows[2]
  # 6x6 input, 3x3/2 VALID: windows [0, 2] and [2, 4] share index 2 on each axis -> sqrt(2 * 2) = 2.
  assert pool["upper"] == pytest.approx(2.0) and pool["paper"] == 1.0
  assert rows[5]["upper"] == 0.25
  conv = rows[0]
  assert conv["lower"] <= conv["upper"] and conv["size"] == "2 x 3 x 3 x 4"
  expected = np.prod([r["upper"] for r in rows])
  assert summary["product_upper"] == pytest.approx(expected)
  x_adv = x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  emp = spectral.empirical_lipschitz(model.apply, variables, x, x_adv=x_adv, num_steps=10, batch_size=10)
  assert emp.jacobian_norms.shape == (16,) and emp.pair_ratios.shape == (16,)
  assert 0 < emp.lower_bound <= summary["product_upper"]
  text = spectral.format_table(rows, summary)
  assert "conv1" in text and "product_upper" in text


def test_lipschitz_table_honours_input_shape():
  """The layers see the given shape (another table), and a shape the model cannot take is refused."""
  model, variables = _small_conv_net()
  rows, _ = spectral.lipschitz_table(model, variables, (10, 10, 2))  # conv 5x5, pool 2x2: fc1 still 16 wide
  assert [r["input"] for r in rows[:4]] == ["10x10x2", "5x5x4", "5x5x4", "2x2x4"]
  with pytest.raises(ValueError, match=r"cannot take an input of shape \(13, 13, 2\)"):  # pool 3x3: 36 != 16
    spectral.lipschitz_table(model, variables, (13, 13, 2))
  with pytest.raises(ValueError, match=r"cannot take an input of shape \(28, 28, 2\)"):
    spectral.lipschitz_table(model, variables, (28, 28, 2))
  mnist = models.get_model("mnist_conv")
  with pytest.raises(ValueError, match=r"cannot take an input of shape \(27, 27, 1\)"):
    spectral.lipschitz_table(mnist, jax.eval_shape(mnist.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))),
                             (27, 27, 1))


def test_lipschitz_table_refuses_a_model_that_is_not_the_chain_of_its_layers():
  model, variables = _small_conv_net(sigmoid_as_function=True)  # nn.sigmoid is invisible to the trace
  with pytest.raises(ValueError, match="not the chain of its layers"):
    spectral.lipschitz_table(model, variables, (12, 12, 2))
  # The MNIST ConvNet takes flat [B, 784] inputs (it reshapes them itself), but its first layer does not.
  mnist = models.get_model("mnist_conv")
  with pytest.raises(ValueError, match="not the chain of its layers.*fail"):
    spectral.lipschitz_table(mnist, random_variables(mnist, (28, 28, 1)), (784,))


def test_single_dense_layer_bound_is_exact():
  """Degenerate oracle: for one linear layer the upper bound equals the empirical Jacobian norm."""
  dense = nn.Dense(5)
  rng = np.random.default_rng(0)
  variables = {"params": {"kernel": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32), "bias": jnp.zeros(5)}}
  rows, summary = spectral.lipschitz_table(dense, variables, (7,))
  emp = spectral.empirical_lipschitz(dense.apply, variables, jnp.ones((2, 7)), num_steps=100)
  assert summary["product_upper"] == pytest.approx(emp.lower_bound, rel=1e-4)
  assert rows[0]["paper"] == rows[0]["upper"]


def test_empirical_lipschitz_of_a_plain_jax_function_with_a_params_pytree():
  """No Flax: f(params, x) = tanh(x W1) W2 with params a dict; at x = 0 the Jacobian is W1 W2."""
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.standard_normal((5, 8)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}
  f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  x = jnp.zeros((3, 5))
  emp = spectral.empirical_lipschitz(f, params, x, x_adv=x + 1e-3, num_steps=50)
  sigma = float(np.linalg.svd(np.asarray(params["w1"] @ params["w2"]), compute_uv=False)[0])
  np.testing.assert_allclose(emp.jacobian_norms, sigma, rtol=1e-4)
  assert emp.pair_ratios.shape == (3,) and emp.lower_bound == pytest.approx(sigma, rel=1e-4)


def test_bad_inputs_raise_clear_errors():
  k = np.ones((3, 3, 2, 4), np.float32)
  with pytest.raises(ValueError, match="4-D"):
    spectral.conv_operator_norm(np.ones((3, 3, 2)), input_shape=(8, 8, 2))
  with pytest.raises(ValueError, match="channels"):
    spectral.conv_operator_norm(k, input_shape=(8, 8, 3))
  with pytest.raises(ValueError, match="divide"):
    spectral.conv_operator_norm(k, input_shape=(9, 9, 2), strides=2, padding="CIRCULAR")
  with pytest.raises(ValueError, match="padding"):
    spectral.conv_operator_norm(k, input_shape=(8, 8, 2), padding="REFLECT")
  with pytest.raises(ValueError, match="non-negative"):
    spectral.conv_operator_norm(k, input_shape=(8, 8, 2), padding=((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="method"):
    spectral.conv_operator_norm(k, input_shape=(8, 8, 2), method="power")
  with pytest.raises(ValueError, match="strides"):
    spectral.conv_operator_norm(k, input_shape=(8, 8, 2), strides=(0, 1))
  with pytest.raises(ValueError, match="NaN"):
    spectral.conv_operator_norm(k * np.nan, input_shape=(8, 8, 2))
  for method in ("fft", "lanczos"):   # no output: the FFT bound (16.0) or NaN (Lanczos) before
    with pytest.raises(ValueError, match="no output"):
      spectral.conv_operator_norm(np.ones((11, 11, 2, 4), np.float32), input_shape=(8, 8, 2), strides=4,
                                  padding="VALID", method=method)
  with pytest.raises(ValueError, match="2-D"):
    spectral.dense_operator_norm(np.ones(5))
  with pytest.raises(ValueError, match="epsilon"):
    spectral.contrast_norm_lipschitz(0.0, 0.5)
  with pytest.raises(ValueError, match="x_adv"):
    spectral.empirical_lipschitz(lambda p, z: z, {}, jnp.ones((2, 3)), x_adv=jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"input_shape must be \(H, W\) or \(H, W, C\)"):
    spectral.avgpool_norm(3, 2, input_shape=(8,))


@pytest.mark.slow
def test_strided_zero_padding_with_non_divisible_input_uses_an_embedding():
  """s ∤ N: no circular value at N, but the zero-padded layer still gets a certified interval."""
  with jax.enable_x64(True):
    kernel = np.random.default_rng(1).normal(size=(3, 3, 2, 2))
    exact = np.linalg.svd(_dense_matrix(kernel, (9, 9), (2, 2), "SAME"), compute_uv=False)[0]
    r = spectral.conv_operator_norm(kernel, input_shape=(9, 9, 2), strides=2, padding="SAME")
  assert math.isnan(r.circular) and math.isnan(r.paper_formula)
  assert r.lower <= exact <= r.upper


@pytest.mark.slow
def test_run_experiment_writes_the_table(tmp_path):
  from intriguing_jax.configs import spectral as spectral_config
  config = spectral_config.get_config("smoke")
  config.num_empirical = 2
  out = spectral.run_experiment(config, str(tmp_path))
  summary = out["mnist_conv"]
  assert 0 < summary["empirical_lower_bound"] <= summary["product_upper"]
  assert "| conv1 |" in (tmp_path / "mnist_conv.md").read_text() and (tmp_path / "mnist_conv.json").exists()
  config.method = "svd"
  with pytest.raises(ValueError, match="config.method"):
    spectral.run_experiment(config, str(tmp_path))
