"""Spectral analysis (paper §4.3, Table 5): exact layer operator norms and the network's Lipschitz bound.

Usage::

    kernel = 0.03 * jax.random.normal(jax.random.PRNGKey(0), (11, 11, 3, 96))      # Flax HWIO layout
    r = spectral.conv_operator_norm(kernel, input_shape=(224, 224, 3), strides=(4, 4),
                                    padding="CIRCULAR")
    r.value, r.paper_formula     # exact circular norm; the printed Δ^-2 formula (= exact / 4)
    r = spectral.conv_operator_norm(kernel, input_shape=(224, 224, 3), strides=(4, 4),
                                    padding=((2, 2), (2, 2)), method="lanczos")
    r.lower, r.upper             # certified interval for the zero-padded layer as the model runs it
    spectral.dense_operator_norm(w)                       # largest singular value of a [in, out] kernel
    spectral.maxpool_lipschitz((3, 3), (2, 2), input_shape=(27, 27, 96))   # 2.0: overlapping windows
    rows, summary = spectral.lipschitz_table(model, variables, (227, 227, 3))
    print(spectral.format_table(rows, summary))
    emp = spectral.empirical_lipschitz(model.apply, variables, images, x_adv=adv)

Mathematics (``../shared/spectral.md`` §2, paper.md §5 and §9 A19-A20):

* A strided circular convolution on an N×N grid with stride s | N is, after the orthogonal polyphase
  (space-to-depth) reshuffle ``x_c^{(l)}(m) = x_c(s·m + l)``, a stride-1 circular correlation on the
  M×M grid (M = N/s) with C·s² input channels. Its operator norm is therefore
  ``max_ξ σ_max(P(ξ))`` over the M×M frequencies of the D×(C·s²) polyphase symbol P(ξ). The paper's
  aliasing form, eq. (1), is the same matrix up to a unitary factor when its coefficient is s⁻¹; the
  printed Δ⁻² gives exactly ``norm / s`` (§9 A19; tests/test_spectral.py evaluates eq. (1) literally).
* Zero padding ('SAME', 'VALID', explicit pads) embeds the layer in a circular one on N' ≥ N+pads with
  s | N', so ``‖K_zero‖ ≤ ‖K_circ(N')‖`` (certified). The exact zero-padded norm is found matrix-free
  by Lanczos on the operator as ``lax.conv_general_dilated`` applies it, warm-started
  from the circular top singular vector; any unit vector's ``‖Kx‖`` is a certified lower bound.
* Max pooling with overlapping windows is ``√(max #windows covering a pixel)``-Lipschitz, which is
  attained (⌈k/s⌉ = 2 for AlexNet's 3×3/2 pools); the paper's 1 holds only when k ≤ s.
* Contrast normalisation ``x/(ε+‖x‖²)^γ``: ε^{-γ} exactly, for every γ ≥ 0.
* AlexNet LRN: certified ``k^{-β} ≤ L ≤ k^{-β} + β g* √((1+√n)(n+1))``.
* A network that is a chain of layers f = f_L ∘ … ∘ f_1 is ``Π L_i``-Lipschitz (``lipschitz_table``).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from intriguing_jax import models
from intriguing_jax.types import Array, Params

Padding = Union[str, Sequence[Tuple[int, int]]]

_DIMS = ("NHWC", "HWIO", "NHWC")
# Table 5 of the paper (paper.md §7): layer, C_in, kernel side, C_out, stride, printed upper bound, and the
# input side N we use (the paper does not state N; paper.md §9 A19: 224 (pad 2), 27, 13, 13, 13).
TABLE5 = (
    dict(layer="Conv. 1", type="conv", c_in=3, k=11, c_out=96, stride=4, n=224, pad=2, paper=2.75),
    dict(layer="Conv. 2", type="conv", c_in=96, k=5, c_out=256, stride=1, n=27, pad=2, paper=10.0),
    dict(layer="Conv. 3", type="conv", c_in=256, k=3, c_out=384, stride=1, n=13, pad=1, paper=7.0),
    dict(layer="Conv. 4", type="conv", c_in=384, k=3, c_out=384, stride=1, n=13, pad=1, paper=7.5),
    dict(layer="Conv. 5", type="conv", c_in=384, k=3, c_out=256, stride=1, n=13, pad=1, paper=11.0),
    dict(layer="FC. 1", type="dense", c_in=9216, c_out=4096, stride=None, paper=3.12),
    dict(layer="FC. 2", type="dense", c_in=4096, c_out=4096, stride=None, paper=4.0),
    dict(layer="FC. 3", type="dense", c_in=4096, c_out=1000, stride=None, paper=4.0),
)


class OperatorNorm(NamedTuple):
  """Operator norm of a linear layer, with a certified interval.

  Attributes:
    value: the best estimate of the norm of the layer as specified (exact for circular padding and for
      dense layers up to the eigen-solver's accuracy; for zero padding the matrix-free estimate when
      ``method`` is "lanczos", else the certified upper bound).
    lower: certified lower bound (‖K x‖ for an explicit unit vector x); equals ``value`` when exact.
    upper: certified upper bound (exact circular value, or min over N' of the circular norm on N').
    paper_formula: the paper's eq. (1) as printed (coefficient Δ⁻²) on the circular N×N grid; for
      dense layers σ_max itself. NaN where it is undefined (s ∤ N).
    circular: the exact circular norm on the layer's own N×N grid (the paper's setting); NaN if s ∤ N.
  """
  value: float
  lower: float
  upper: float
  paper_formula: float
  circular: float


class EmpiricalLipschitz(NamedTuple):
  """Empirical lower bounds on a network's Lipschitz constant (``empirical_lipschitz``).

  Attributes:
    jacobian_norms: [B] spectral norm of the Jacobian at each input (power iteration, jvp + vjp).
    pair_ratios: [P] ``‖f(x') − f(x)‖ / ‖x' − x‖`` for each adversarial pair (empty if none given).
    lower_bound: the largest of all the above (a valid lower bound on the global Lipschitz constant).
  """
  jacobian_norms: np.ndarray
  pair_ratios: np.ndarray
  lower_bound: float


# ----------------------------------------------------------------------------------------------------
# Input checking and padding arithmetic (pure Python, before any compile).


def _pair(value: Any, name: str) -> Tuple[int, int]:
  if isinstance(value, (int, np.integer)):
    value = (int(value), int(value))
  try:
    out = tuple(int(v) for v in value)
  except TypeError as e:
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from e
  if len(out) != 2 or min(out) < 1:
    raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
  return out  # type: ignore[return-value]


def _check_kernel(kernel: Any, input_shape: Any, strides: Any) -> Tuple[np.ndarray, Tuple[int, int, int],
                                                                         Tuple[int, int]]:
  shape = tuple(np.shape(kernel))
  if len(shape) != 4:
    raise ValueError(f"kernel must be 4-D in Flax layout (kh, kw, C_in, C_out), got shape {shape}")
  if min(shape) < 1:
    raise ValueError(f"kernel has an empty dimension: shape {shape}")
  try:
    input_shape = tuple(int(v) for v in input_shape)
  except TypeError as e:
    raise ValueError(f"input_shape must be (H, W, C_in), got {input_shape!r}") from e
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"input_shape must be (H, W, C_in) with positive entries, got {input_shape}")
  if input_shape[2] != shape[2]:
    raise ValueError(f"input_shape has {input_shape[2]} channels but kernel {shape} expects C_in={shape[2]} "
                     "(kernel layout is (kh, kw, C_in, C_out))")
  strides = _pair(strides, "strides")
  if not np.all(np.isfinite(np.asarray(kernel))):
    raise ValueError("kernel contains NaN or Inf")
  return kernel, input_shape, strides  # type: ignore[return-value]


def _same_pads(n: int, k: int, s: int) -> Tuple[int, int]:
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def resolve_padding(padding: Padding, input_hw: Tuple[int, int], window: Tuple[int, int],
                    strides: Tuple[int, int]) -> Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
  """Returns "CIRCULAR" or explicit ((lo, hi), (lo, hi)) pads, as ``lax`` would use them.

  Args:
    padding: "CIRCULAR", "SAME", "VALID" (any case) or a pair of (lo, hi) pairs.
    input_hw: (H, W) input size; window: (kh, kw); strides: (sh, sw).

  Raises:
    ValueError: unknown string, malformed or negative pads.
  """
  if isinstance(padding, str):
    p = padding.upper()
    if p == "CIRCULAR":
      return "CIRCULAR"
    if p == "VALID":
      return ((0, 0), (0, 0))
    if p == "SAME":
      return tuple(_same_pads(n, k, s) for n, k, s in zip(input_hw, window, strides))  # type: ignore
    raise ValueError(f"padding must be 'CIRCULAR', 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got {padding!r}")
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError) as e:
    raise ValueError(f"padding must be 'CIRCULAR', 'SAME', 'VALID' or ((lo, hi), (lo, hi)), "
                     f"got {padding!r}") from e
  if len(pads) != 2 or min(min(p) for p in pads) < 0:
    raise ValueError(f"padding must be two non-negative (lo, hi) pairs, got {padding!r}")
  return pads  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Exact circular norms through the polyphase symbol.


def _polyphase_kernel(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int]) -> Array:
  """[kh, kw, C, D] -> [Mh, Mw, sh*sw*C, D]: phases (lh, lw, c) as channels, taps folded modulo M."""
  kh, kw, c, d = kernel.shape
  (mh, mw), (sh, sw) = grid, strides
  qh, qw = -(-kh // sh), -(-kw // sw)  # taps per phase
  th, tw = -(-qh // mh) * mh, -(-qw // mw)  * mw  # rounded up to whole periods of the M grid
  k = jnp.pad(kernel, ((0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(th // mh, mh, sh, tw // mw, mw, sw, c, d).sum(axis=(0, 3))  # circular aliasing of taps
  return k.transpose(0, 2, 1, 3, 4, 5).reshape(mh, mw, sh * sw * c, d)


def _polyphase_symbol(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int], *, full: bool) -> Array:
  """Symbol matrices [F, C·s², D] (rfft half-plane unless ``full``); σ(P(ξ)) are the operator's."""
  k = _polyphase_kernel(kernel, grid, strides)
  if full or not jnp.isrealobj(kernel):
    p = jnp.fft.fft2(k, axes=(0, 1))
  else:
    p = jnp.fft.rfft2(k, axes=(0, 1))  # real kernel: P(-ξ) = conj P(ξ)
  return p.reshape((-1,) + p.shape[2:])


def _top_sigma(p: Array) -> Array:
  """Per-frequency σ_max of [F, a, b] complex matrices."""
  return jnp.linalg.svd(p, compute_uv=False)[:, 0]


@functools.partial(jax.jit, static_argnames=("grid", "strides"))
def _circular_norm_and_vector(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int]):
  """Exact circular norm and a real top right singular vector in input space [s·Mh, s·Mw, C]."""
  p = _polyphase_symbol(kernel, grid, strides, full=False)  # [F, Cs², D]
  sig = _top_sigma(p)
  i = jnp.argmax(sig)
  mh, mw = grid
  fw = mw // 2 + 1
  xi_h, xi_w = i // fw, i % fw
  # Operator symbol A(ξ) = P(ξ)^T (D × Cs²); top right singular vector of conj(A) drives the plane wave.
  _, _, vh = jnp.linalg.svd(p[i].T)
  v = vh[0].conj()  # top right singular vector of A(ξ)
  sh, sw = strides
  c = kernel.shape[2]
  m_h = jnp.arange(mh)[:, None]
  m_w = jnp.arange(mw)[None, :]
  phase = jnp.exp(2j * jnp.pi * (m_h * xi_h / mh + m_w * xi_w / mw))  # [Mh, Mw]
  # x^{(l)}_c(m) = Re[conj(v_(l,c)) e^{+2πi m·ξ/M}]: a correlation maps the plane wave a·e^{iθm} to
  # e^{iθm}·conj(A(ξ))·a, whose top right singular vector is conj(v).
  z = jnp.real(phase[:, :, None] * v.conj()[None, None, :]).reshape(mh, mw, sh, sw, c)
  if z.dtype != kernel.dtype and not jnp.iscomplexobj(kernel):
    z = z.astype(kernel.dtype)
  x = z.transpose(0, 2, 1, 3, 4).reshape(mh * sh, mw * sw, c)
  alt = jnp.imag(phase[:, :, None] * v.conj()[None, None, :]).reshape(mh, mw, sh, sw, c)
  alt = alt.transpose(0, 2, 1, 3, 4).reshape(mh * sh, mw * sw, c).astype(x.dtype)
  # Re z and Im z are both top singular vectors unless one vanishes (ξ = -ξ); keep the larger.
  x = jnp.where(jnp.sum(x * x) >= jnp.sum(alt * alt), x, alt)
  return jnp.max(sig), x / jnp.linalg.norm(x)


def _check_divisible(hw: Tuple[int, int], strides: Tuple[int, int]) -> None:
  if hw[0] % strides[0] or hw[1] % strides[1]:
    raise ValueError(f"circular convolution needs the stride to divide the input size: input {hw}, strides "
                     f"{strides} (the operator on a non-divisible grid is not block-circulant)")


def conv_singular_values(kernel: Array, input_hw: Tuple[int, int], strides: Any = (1, 1)) -> np.ndarray:
  """All singular values of the circular strided convolution (sorted descending), for tests and spectra.

  Returns:
    [(H/sh)·(W/sw)·min(D, C·sh·sw)] numpy array: the union of σ(P(ξ)) over all frequencies.
  """
  h, w = _pair(input_hw, "input_hw")
  kernel, _, strides = _check_kernel(kernel, (h, w, np.shape(kernel)[2]), strides)
  _check_divisible((h, w), strides)
  p = _polyphase_symbol(jnp.asarray(kernel), (h // strides[0], w // strides[1]), strides, full=True)
  sv = np.asarray(jnp.linalg.svd(p, compute_uv=False)).ravel()
  return np.sort(sv)[::-1]


# ----------------------------------------------------------------------------------------------------
# The exact operator as the model applies it, and matrix-free solvers.


def conv_apply(kernel: Array, x: Array, strides: Tuple[int, int], padding: Any) -> Array:
  """The bias-free layer ``x [H, W, C] -> y [H', W', D]`` exactly as lax/Flax run it.

  ``padding`` is the output of ``resolve_padding``: "CIRCULAR" wraps the input by ((k-1)//2, k//2) per
  axis, as Flax ``nn.Conv(padding="CIRCULAR")`` does, then runs a VALID convolution.
  """
  if isinstance(padding, str) and padding == "CIRCULAR":
    pads = tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2])
    x = jnp.pad(x, pads + ((0, 0),), mode="wrap")
    padding = ((0, 0), (0, 0))
  return lax.conv_general_dilated(x[None], kernel, strides, padding, dimension_numbers=_DIMS)[0]


def _lanczos_top(matvec: Callable[[Array], Array], v0: Array, num_steps: int) -> Tuple[Array, Array]:
  """Top Ritz pair of a symmetric PSD operator on the Krylov space of ``v0`` (Lanczos basis).

  The basis is fully re-orthogonalised and the Ritz pair comes from the explicit projection
  ``Vᵀ A V`` (Rayleigh-Ritz) rather than the three-term tridiagonal, so it stays correct after a
  breakdown (Krylov space exhausted, e.g. a low-rank VALID convolution).

  Returns:
    (ritz_vector, unit, same shape as v0; ritz_value ≤ λ_max).
  """
  shape, dtype = v0.shape, v0.dtype
  n = v0.size
  basis = jnp.zeros((num_steps, n), dtype).at[0].set(v0.ravel() / jnp.linalg.norm(v0))
  images = jnp.zeros((num_steps, n), dtype)
  eps = jnp.sqrt(jnp.finfo(dtype).eps)

  def body(j, carry):
    basis, images, scale = carry
    wv = matvec(basis[j].reshape(shape)).ravel()
    images = images.at[j].set(wv)
    scale = jnp.maximum(scale, jnp.linalg.norm(wv))
    for _ in range(2):  # full re-orthogonalisation, twice (rows beyond j are still zero)
      wv = wv - basis.T @ (basis @ wv)
    b = jnp.linalg.norm(wv)
    ok = b > eps * scale  # otherwise the Krylov space is exhausted: add nothing
    nxt = jnp.where(ok, wv / jnp.where(ok, b, 1.0), jnp.zeros_like(wv))
    basis = jnp.where(j + 1 < num_steps, basis.at[jnp.minimum(j + 1, num_steps - 1)].set(nxt), basis)
    return basis, images, scale

  basis, images, _ = lax.fori_loop(0, num_steps, body, (basis, images, jnp.zeros((), dtype)))
  h = basis @ images.T
  evals, evecs = jnp.linalg.eigh(0.5 * (h + h.T))
  y = basis.T @ evecs[:, -1]
  return (y / jnp.linalg.norm(y)).reshape(shape), evals[-1]


@functools.partial(jax.jit, static_argnames=("strides", "padding", "num_steps"))
def _matrix_free_norm(kernel, x0, strides, padding, num_steps):
  # A little noise keeps the warm start out of any invariant subspace (a cropped plane wave can be
  # orthogonal to the top singular vector by symmetry, and Lanczos would then break down there).
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape, x0.dtype)
  x0 = x0 / jnp.linalg.norm(x0) + 1e-2 * noise / jnp.linalg.norm(noise)
  op = functools.partial(conv_apply, kernel, strides=strides, padding=padding)
  op_t = jax.linear_transpose(op, x0)
  gram = lambda v: op_t(op(v))[0]
  x, _ = _lanczos_top(gram, x0, num_steps)
  return jnp.linalg.norm(op(x)) / jnp.linalg.norm(x)  # Rayleigh: a certified lower bound


def _embedding_grids(hw, pads, strides, num_grids):
  """Admissible circular grids N' ≥ N + lo + hi with s | N' (spectral.md §2.3)."""
  out = []
  for extra in range(num_grids):
    out.append(tuple((-(-(n + lo + hi) // s) + extra) * s for n, (lo, hi), s in zip(hw, pads, strides)))
  return out


def conv_operator_norm(kernel: Array, *, input_shape: Sequence[int], strides: Any = (1, 1),
                       padding: Padding = "CIRCULAR", method: str = "fft", num_steps: int = 100,
                       num_grids: int = 1) -> OperatorNorm:
  """Operator norm (largest singular value) of a multi-channel strided 2-D convolution layer.

  Args:
    kernel: [kh, kw, C_in, C_out] in Flax layout (the bias never changes a Lipschitz constant).
    input_shape: (H, W, C_in), the layer's per-example input size.
    strides: int or (sh, sw).
    padding: "CIRCULAR" (periodic, the paper's setting), "SAME", "VALID", or ((lo, hi), (lo, hi)).
    method: "fft": exact polyphase FFT norm for circular padding; for zero padding the certified
      circular upper bound min over N' (no iterations). "lanczos": additionally ``num_steps`` Lanczos
      steps (full re-orthogonalisation) on the exact operator (``jax.linear_transpose``), warm-started
      from the circular top singular vector: the exact value, its Rayleigh quotient a certified lower
      bound.
    num_steps: Lanczos steps.
    num_grids: how many admissible N' the zero-padded upper bound minimises over.

  Returns:
    ``OperatorNorm(value, lower, upper, paper_formula, circular)`` (Python floats).

  Raises:
    ValueError: bad shapes/strides/padding/method; circular padding with a stride not dividing H or W.
  """
  kernel, input_shape, strides = _check_kernel(kernel, input_shape, strides)
  if method not in ("fft", "lanczos"):
    raise ValueError(f"method must be 'fft' or 'lanczos', got {method!r}")
  if int(num_steps) < 1 or int(num_grids) < 1:
    raise ValueError(f"num_steps and num_grids must be >= 1, got {num_steps}, {num_grids}")
  kernel = jnp.asarray(kernel)
  hw = input_shape[:2]
  kh, kw = kernel.shape[:2]
  pads = resolve_padding(padding, hw, (kh, kw), strides)
  divisible = hw[0] % strides[0] == 0 and hw[1] % strides[1] == 0

  circ = float("nan")
  paper = float("nan")
  vec = None
  if divisible:
    circ, vec = _circular_norm_and_vector(kernel, (hw[0] // strides[0], hw[1] // strides[1]), strides)
    circ = float(circ)
    # The printed Δ⁻² coefficient gives exactly norm / Δ (norm / √(Δh·Δw) for rectangular strides),
    # spectral.md §2.2 (the test evaluates the printed formula literally and finds it equal).
    paper = circ / math.sqrt(strides[0] * strides[1])
  if pads == "CIRCULAR":
    _check_divisible(hw, strides)
    if method == "fft":
      return OperatorNorm(circ, circ, circ, paper, circ)
    # conv_apply wraps by ((k-1)//2, k//2), i.e. shifts the input by (k-1)//2: the top vector shifts too.
    lo_h, lo_w = (kh - 1) // 2, (kw - 1) // 2
    x0 = jnp.roll(vec, (-lo_h, -lo_w), axis=(0, 1)).astype(kernel.dtype)
    lower = float(_matrix_free_norm(kernel, x0, strides, "CIRCULAR", int(num_steps)))
    if lower > circ * (1 + 1e-4):
      logging.warning("conv_operator_norm: Rayleigh value %.8g exceeds the exact circular norm %.8g", lower,
                      circ)
    return OperatorNorm(circ, min(lower, circ), circ, paper, circ)

  # Zero padding: certified upper bound from circular embeddings, warm start from the first grid.
  upper = float("inf")
  start = None
  for grid_hw in _embedding_grids(hw, pads, strides, int(num_grids)):
    val, v = _circular_norm_and_vector(kernel, (grid_hw[0] // strides[0], grid_hw[1] // strides[1]), strides)
    if float(val) < upper:
      upper = float(val)
    if start is None:
      (lo_h, _), (lo_w, _) = pads
      start = v[lo_h:lo_h + hw[0], lo_w:lo_w + hw[1]]  # E places x at offset (lo_h, lo_w) in the N' grid
  if method == "fft":
    lower = float(jnp.linalg.norm(conv_apply(kernel, start / jnp.linalg.norm(start), strides, pads)))
    return OperatorNorm(upper, lower, upper, paper, circ)
  lower = float(_matrix_free_norm(kernel, start.astype(kernel.dtype), strides, pads, int(num_steps)))
  return OperatorNorm(lower, lower, upper, paper, circ)


def reshaped_kernel_norm(kernel: Array) -> float:
  """σ_max of the kernel reshaped to (kh·kw·C_in) × C_out: what Flax/Haiku ``SpectralNorm`` normalise by.

  It is NOT the convolution's norm but a lower bound on it: for circular padding with N ≥ k,
  ``‖W_r‖ ≤ ‖K‖ ≤ √(⌈kh/s⌉⌈kw/s⌉)·‖W_r‖`` (spectral.md §2.4). Reported beside the exact value.
  """
  shape = np.shape(kernel)
  if len(shape) != 4:
    raise ValueError(f"kernel must be 4-D (kh, kw, C_in, C_out), got shape {shape}")
  return dense_operator_norm(jnp.reshape(jnp.asarray(kernel), (-1, shape[3])))


# ----------------------------------------------------------------------------------------------------
# Dense layers.


@functools.partial(jax.jit, static_argnames=("num_blocks", "check_every"))
def _dense_block_krylov(w, v0, num_blocks, tol, check_every=2):
  """Block Lanczos (block Krylov + Rayleigh-Ritz) on wᵀw: each step reads w twice for a whole block
  of vectors (GEMM, not GEMV), which is what makes FC1 (9216×4096) fast on a CPU.

  The projection ``H = Vᵀ(wᵀw)V`` is filled one block column per step, so every ``check_every`` blocks
  the top Ritz pair (θ, y = Vs) and its residual ``‖wᵀw y − θ y‖ = ‖(wᵀw V)s − θ Vs‖`` cost one small
  eigh and two thin mat-vecs (no access to w). The loop stops once the residual is ≤ ``tol``·θ: then an
  eigenvalue of wᵀw lies within tol·θ of θ (residual bound for symmetric matrices).

  Returns:
    (rayleigh ‖w x‖/‖x‖ (a certified lower bound on σ_max), blocks used, relative residual of θ).
  """
  n, b = v0.shape
  k = num_blocks * b
  basis = jnp.zeros((num_blocks, n, b), w.dtype).at[0].set(jnp.linalg.qr(v0)[0])
  images = jnp.zeros((num_blocks, n, b), w.dtype)
  h = jnp.zeros((k, k), w.dtype)
  thresh = jnp.sqrt(jnp.finfo(w.dtype).eps)

  def ritz(basis, images, h):
    _, evecs = jnp.linalg.eigh(h)
    y = evecs[:, -1]
    flat_v = basis.transpose(1, 0, 2).reshape(n, -1)
    flat_a = images.transpose(1, 0, 2).reshape(n, -1)
    x, ax = flat_v @ y, flat_a @ y
    theta = jnp.vdot(x, ax) / jnp.vdot(x, x)
    scale = jnp.maximum(theta * jnp.linalg.norm(x), jnp.finfo(w.dtype).tiny)
    return x, jnp.linalg.norm(ax - theta * x) / scale

  def cond(carry):
    j, _, _, _, rel = carry
    return (j < num_blocks) & (rel > tol)

  def body(carry):
    j, basis, images, h, rel = carry
    img = w.T @ (w @ basis[j])
    images = images.at[j].set(img)
    flat = basis.transpose(1, 0, 2).reshape(n, -1)
    col = flat.T @ img  # H[:, block j]; rows of unbuilt blocks are zero
    h = lax.dynamic_update_slice(h, col, (0, j * b))
    h = lax.dynamic_update_slice(h, col.T, (j * b, 0))
    nxt = img
    for _ in range(2):  # full re-orthogonalisation against every earlier block, twice
      nxt = nxt - flat @ (flat.T @ nxt)
    q, r = jnp.linalg.qr(nxt)
    q = q * (jnp.abs(jnp.diagonal(r)) > thresh * jnp.linalg.norm(img))[None, :]
    basis = jnp.where(j + 1 < num_blocks, basis.at[jnp.minimum(j + 1, num_blocks - 1)].set(q), basis)
    check = ((j + 1) % check_every == 0) | (j + 1 == num_blocks)
    rel = lax.cond(check, lambda: ritz(basis, images, h)[1], lambda: rel)
    return j + 1, basis, images, h, rel

  init = (jnp.zeros((), jnp.int32), basis, images, h, jnp.asarray(jnp.inf, w.dtype))
  used, basis, images, h, rel = lax.while_loop(cond, body, init)
  x, _ = ritz(basis, images, h)
  return jnp.linalg.norm(w @ x) / jnp.linalg.norm(x), used, rel


def dense_operator_norm(w: Array, *, method: str = "auto", num_steps: int = 384, block_size: int = 16,
                        tol: float = 1e-3, seed: int = 0) -> float:
  """Largest singular value of a dense kernel ``w`` [in, out] (Flax layout; the bias is irrelevant).

  Args:
    w: 2-D array.
    method: "svd" (exact, LAPACK), "lanczos" (jitted block Lanczos on wᵀw with full
      re-orthogonalisation and Rayleigh-Ritz; its value is a certified lower bound ‖w x‖/‖x‖ that
      converges to σ_max), or "auto" (svd when min(in, out) ≤ 1024, else lanczos).
    num_steps: maximum Krylov dimension (block_size × number of blocks).
    block_size: vectors per block.
    tol: "lanczos" stops early once the top Ritz pair's relative residual ‖wᵀw y − θy‖/θ ≤ tol (checked
      every 2 blocks; 0 runs all blocks).
    seed: seed of the start block.

  Returns:
    σ_max as a Python float.
  """
  shape = np.shape(w)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"w must be a non-empty 2-D [in, out] matrix, got shape {shape}")
  if method not in ("auto", "svd", "lanczos"):
    raise ValueError(f"method must be 'auto', 'svd' or 'lanczos', got {method!r}")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not 0 <= float(tol) < 1:
    raise ValueError(f"tol must be in [0, 1), got {tol}")
  w = jnp.asarray(w)
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("w contains NaN or Inf")
  if method == "auto":
    method = "svd" if min(shape) <= 1024 else "lanczos"
  if method == "svd":
    return float(jnp.linalg.svd(w, compute_uv=False)[0])
  if w.shape[0] < w.shape[1]:
    w = w.T  # iterate on the smaller Gram side
  block = int(min(block_size, w.shape[1]))
  num_blocks = int(max(1, min(-(-int(num_steps) // block), w.shape[1] // block)))
  v0 = jax.random.normal(jax.random.PRNGKey(seed), (w.shape[1], block), w.dtype)
  value, used, rel = _dense_block_krylov(w, v0, num_blocks, jnp.asarray(tol, w.dtype))
  logging.info("dense_operator_norm: %s, block Lanczos %d/%d blocks of %d, relative residual %.2e", w.shape,
               int(used), num_blocks, block, float(rel))
  return float(value)


# ----------------------------------------------------------------------------------------------------
# Non-linear layers.


def _window_counts(n: int, k: int, s: int, lo: int, hi: int) -> np.ndarray:
  """Number of pooling windows covering each of the n input positions (padding never counts)."""
  out = (n + lo + hi - k) // s + 1
  if out < 1:
    raise ValueError(f"pooling window {k} larger than the padded input {n}+{lo}+{hi}")
  counts = np.zeros(n, np.int64)
  for j in range(out):
    a, b = max(j * s - lo, 0), min(j * s - lo + k, n)
    counts[a:b] += 1
  return counts


def maxpool_lipschitz(window: Any, strides: Any = None, *, input_shape: Optional[Sequence[int]] = None,
                      padding: Padding = "VALID") -> float:
  """Exact L2 Lipschitz constant of max pooling: √(max number of windows covering one input pixel).

  ``|max(x_W) − max(y_W)| ≤ ‖(x−y)_W‖`` summed over windows gives ‖P(x) − P(y)‖² ≤ Σ_i m_i (x_i−y_i)²;
  a bump at a pixel in m_max windows attains it (spectral.md §2.6). The paper's "≤ 1" holds only when
  windows do not overlap (k ≤ s).

  Args:
    window: int or (kh, kw); strides: int or pair (default: the window, i.e. non-overlapping).
    input_shape: (H, W[, C]); without it the count for a large map, ⌈kh/sh⌉·⌈kw/sw⌉, is used.
    padding: "SAME", "VALID" or explicit pairs (padded cells hold -inf and never win).

  Returns:
    The constant as a Python float.
  """
  kh, kw = _pair(window, "window")
  sh, sw = _pair(strides if strides is not None else (kh, kw), "strides")
  if input_shape is None:
    return math.sqrt(-(-kh // sh) * -(-kw // sw))
  if len(input_shape) not in (2, 3) or min(input_shape) < 1:
    raise ValueError(f"input_shape must be (H, W) or (H, W, C), got {input_shape}")
  pads = resolve_padding(padding, tuple(input_shape[:2]), (kh, kw), (sh, sw))
  if pads == "CIRCULAR":
    raise ValueError("maxpool_lipschitz: circular padding is not a pooling mode")
  ch = _window_counts(int(input_shape[0]), kh, sh, *pads[0])
  cw = _window_counts(int(input_shape[1]), kw, sw, *pads[1])
  return math.sqrt(int(ch.max()) * int(cw.max()))


def avgpool_norm(window: Any, strides: Any = None, *, input_shape: Sequence[int],
                 padding: Padding = "VALID") -> float:
  """Operator norm of (linear) average pooling, count_include_pad: a depthwise conv with kernel 1/(kh·kw).

  input_shape: (H, W) or (H, W, C); the norm does not depend on C.
  """
  kh, kw = _pair(window, "window")
  strides = _pair(strides if strides is not None else (kh, kw), "strides")
  if len(input_shape) not in (2, 3):
    raise ValueError(f"avgpool_norm: input_shape must be (H, W) or (H, W, C), got {tuple(input_shape)}")
  kernel = jnp.full((kh, kw, 1, 1), 1.0 / (kh * kw), jnp.float32)
  return conv_operator_norm(kernel, input_shape=(int(input_shape[0]), int(input_shape[1]), 1),
                            strides=strides, padding=padding, method="fft").upper


def contrast_norm_lipschitz(epsilon: float, gamma: float) -> float:
  """L = ε^{-γ} for φ(x) = x / (ε + ‖x‖²)^γ, exact for every γ ≥ 0 (attained at x = 0; spectral.md §2.7)."""
  if not epsilon > 0 or not gamma >= 0 or not math.isfinite(epsilon) or not math.isfinite(gamma):
    raise ValueError(f"contrast_norm_lipschitz needs epsilon > 0 and gamma >= 0, got {epsilon}, {gamma}")
  return float(epsilon ** (-gamma))


def lrn_lipschitz(k: float = 2.0, n: int = 5, beta: float = 0.75) -> Tuple[float, float]:
  """Certified interval [k^{-β}, k^{-β} + β g* √((1+√n)(n+1))] for AlexNet's across-channel LRN.

  ``b_i = a_i (k + α' Σ_{j∈N(i)} a_j²)^{-β}``; the bound is independent of α (and of whether it is divided
  by n). g* = (β/(k(1+β)))^β / (1+β). See spectral.md §2.7. For k=2, n=5, β=0.75: [0.5946, 1.1895].

  Returns:
    (lower, upper) Python floats.
  """
  if not k > 0 or not beta >= 0 or int(n) < 1:
    raise ValueError(f"lrn_lipschitz needs k > 0, beta >= 0, n >= 1, got k={k}, n={n}, beta={beta}")
  lower = k ** (-beta)
  g_star = (beta / (k * (1 + beta))) ** beta / (1 + beta)
  return float(lower), float(lower + beta * g_star * math.sqrt((1 + math.sqrt(n)) * (n + 1)))


# ----------------------------------------------------------------------------------------------------
# Whole networks: one row per layer the Flax module calls.


def _stride(strides: Tuple[int, int]) -> Any:
  return strides[0] if strides[0] == strides[1] else strides


def _conv_row(call: models.LayerCall, variables: Params, method: str, num_steps: int) -> Dict[str, Any]:
  m, name = call.module, "/".join(call.path)
  if m.feature_group_count != 1 or any(d not in (None, 1) and tuple(np.ravel(d)) != (1, 1)
                                       for d in (m.input_dilation, m.kernel_dilation)):
    raise ValueError(f"lipschitz_table: {name}: grouped or dilated convolutions are not supported")
  kernel = jnp.asarray(models.get_param(variables, call.path)["kernel"])
  strides = _pair(m.strides or 1, f"{name}.strides")
  padding = ((m.padding, m.padding),) * 2 if isinstance(m.padding, int) else m.padding
  r = conv_operator_norm(kernel, input_shape=call.input_shape, strides=strides, padding=padding,
                         method=method, num_steps=num_steps)
  paper, note = r.paper_formula, f"padding {padding}"
  if math.isnan(paper):  # s ∤ N: the paper's formula on the embedding grid N' (s | N')
    paper = r.upper / math.sqrt(strides[0] * strides[1])
    note += "; stride does not divide N: paper formula on the embedding grid N'"
  kh, kw, c, d = kernel.shape
  return dict(type="conv", size=f"{c} x {kh} x {kw} x {d}", stride=_stride(strides), upper=r.upper,
              lower=r.lower, circular=r.circular, paper=paper, reshaped=reshaped_kernel_norm(kernel),
              note=note)


def _dense_row(call: models.LayerCall, variables: Params, method: str, num_steps: int) -> Dict[str, Any]:
  del method, num_steps
  kernel = jnp.asarray(models.get_param(variables, call.path)["kernel"])
  sig = dense_operator_norm(kernel)
  return dict(type="dense", size=f"{kernel.shape[0]} x {kernel.shape[1]}", stride="N/A", upper=sig, lower=sig,
              paper=sig, note="exact (svd)" if min(kernel.shape) <= 1024 else "Lanczos")


def _maxpool_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  m = call.module
  window, strides = _pair(m.window, "window"), _pair(m.strides, "strides")
  lip = maxpool_lipschitz(window, strides, input_shape=call.input_shape[:2], padding=m.padding)
  return dict(type="maxpool", size=f"{window[0]} x {window[1]}", stride=_stride(strides), upper=lip,
              lower=lip, paper=1.0, note="overlapping windows" if lip > 1 else "non-overlapping windows")


def _lrn_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  m = call.module
  n = 2 * m.depth_radius + 1
  lo, hi = lrn_lipschitz(m.bias, n, m.beta)
  return dict(type="lrn", upper=hi, lower=lo, paper=float("nan"),
              note=f"certified interval, k={m.bias:g} n={n} beta={m.beta:g}")


_ACTIVATIONS = {"relu": (1.0, "contractive"), "sigmoid": (0.25, "sup sigma' = 1/4")}


def _activation_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  lip, note = _ACTIVATIONS[call.module.kind]
  return dict(type=call.module.kind, upper=lip, lower=lip, paper=lip, note=note)

# Module type -> row of its layer (the Lipschitz constant and how it was found).
_ROWS: Tuple[Tuple[type, Callable[..., Dict[str, Any]]], ...] = (
    (nn.Conv, _conv_row),
    (nn.Dense, _dense_row),
    (models.MaxPool, _maxpool_row),
    (models.LocalResponseNorm, _lrn_row),
    (models.Activation, _activation_row),
    (models.Flatten, lambda *_: dict(type="flatten", note="isometry")),
    (nn.Dropout, lambda *_: dict(type="dropout", note="identity at test time")),
)


def _check_chain(model: nn.Module, variables: Params, calls: Sequence[models.LayerCall],
                 input_shape: Tuple[int, ...]) -> None:
  """Raises unless applying the traced layers one after the other reproduces ``model.apply`` (so that the
  product of their constants bounds the network: nothing runs between them that the table misses)."""
  x = h = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + input_shape), jnp.float32)
  for call in calls:
    layer = call.module.clone(parent=None, name=None)
    has_params = isinstance(layer, (nn.Dense, nn.Conv))
    h = layer.apply({"params": models.get_param(variables, call.path)} if has_params else {}, h)
  want = model.apply(variables, x)
  if h.shape != want.shape or not np.allclose(h, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want)))):
    raise ValueError(
        f"lipschitz_table: {type(model).__name__} is not the chain of its layers "
        f"{['/'.join(c.path) for c in calls]}: it computes something else between or around them (a plain "
        "function such as nn.relu or nn.max_pool instead of models.Activation / models.MaxPool, a skip "
        f"connection, an unsupported layer); supported layers: {[t.__name__ for t, _ in _ROWS]}")


def lipschitz_table(model: nn.Module, variables: Params, input_shape: Sequence[int], *, method: str = "fft",
                    num_steps: int = 100) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Per-layer Lipschitz bounds of ``model`` on inputs of ``input_shape`` and their product (Table 5).

  The layers are those ``model.apply`` calls (``models.trace_layers``) on an input of ``input_shape``,
  with the shapes they see there; the model must be the chain of them (checked on a random input).

  Args:
    model: a Flax module built from ``nn.Conv``, ``nn.Dense``, ``nn.Dropout`` and ``models.Activation``,
      ``Flatten``, ``MaxPool``, ``LocalResponseNorm`` (the models of ``intriguing_jax.models``).
    variables: its variables ``{"params": ...}``.
    input_shape: per-example input shape, e.g. (227, 227, 3) or (784,).
    method: conv norm method (``conv_operator_norm``); "fft" is fast and certified.
    num_steps: Lanczos steps.

  Returns:
    (rows, summary). Each row: layer, type, size, stride, input, upper (certified upper bound used in the
    product), lower (certified lower bound of the layer's own constant), circular (exact circular norm on
    the layer's N×N input, the paper's setting), paper (the paper's formula: Δ⁻² for conv, σ_max for
    dense, 1 for max-pool and ReLU, 1/4 for sigmoid), note; conv rows also have reshaped (σ_max of the
    reshaped kernel, Flax ``SpectralNorm``'s value, a lower bound on the conv norm). summary:
    product_upper (all layers, certified), product_paper_style (conv + dense rows with the paper's
    formula), product_linear (conv + dense upper bounds), num_layers.

  Raises:
    ValueError: a shape the model cannot take, a layer without a known bound, a model that is not a chain.
  """
  shape = tuple(int(v) for v in input_shape)
  variables = variables if "params" in variables else {"params": variables}
  calls = models.trace_layers(model, variables, shape)
  _check_chain(model, variables, calls, shape)
  rows: List[Dict[str, Any]] = []
  for call in calls:
    row_fn = next(fn for kind, fn in _ROWS if isinstance(call.module, kind))
    row = dict(layer="/".join(call.path), type="", size="", stride="", upper=1.0, lower=1.0,
               input="x".join(map(str, call.input_shape)), circular=float("nan"), paper=1.0, note="")
    rows.append({**row, **row_fn(call, variables, method, num_steps)})
    logging.info("spectral: %s %s upper=%.6g lower=%.6g", row["layer"], rows[-1]["type"], rows[-1]["upper"],
                 rows[-1]["lower"])
  linear = [r for r in rows if r["type"] in ("conv", "dense")]
  summary = dict(product_upper=float(np.prod([r["upper"] for r in rows])),
                 product_linear=float(np.prod([r["upper"] for r in linear])),
                 product_paper_style=float(np.prod([r["paper"] for r in linear])), num_layers=len(rows))
  return rows, summary


def format_table(rows: Sequence[Mapping[str, Any]], summary: Optional[Mapping[str, Any]] = None,
                 *, floatfmt: str = ".4g") -> str:
  """Markdown rendering of ``lipschitz_table`` output (plus the products when ``summary`` is given)."""
  from intriguing_jax import plotting  # pylint: disable=g-import-not-at-top
  cols = [c for c in ("layer", "size", "stride", "input", "upper", "lower", "circular", "paper", "reshaped",
                      "paper_table5", "empirical", "note") if any(c in r for r in rows)]
  text = plotting.markdown_table(list(rows), cols, floatfmt=floatfmt)
  if summary:
    text += "\n" + "\n".join(f"- {k}: {v:{floatfmt}}" if isinstance(v, float) else f"- {k}: {v}"
                             for k, v in summary.items()) + "\n"
  return text


# ----------------------------------------------------------------------------------------------------
# Empirical lower bounds.


@functools.partial(jax.jit, static_argnames=("fn", "num_steps"))
def _jacobian_norms(fn, params, x, v0, num_steps):
  def one(xi, vi):
    f1 = lambda z: fn(params, z[None])[0]
    _, vjp = jax.vjp(f1, xi)

    def body(_, v):
      w = vjp(jax.jvp(f1, (xi,), (v,))[1])[0]
      return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

    v = lax.fori_loop(0, num_steps, body, vi / jnp.linalg.norm(vi))
    return jnp.linalg.norm(jax.jvp(f1, (xi,), (v,))[1])  # ‖J v‖, v unit: a lower bound on ‖J‖
  return jax.vmap(one)(x, v0)


def empirical_lipschitz(fn: Callable[[Any, Array], Array], params: Any, x: Array, *,
                        x_adv: Optional[Array] = None, num_steps: int = 20, seed: int = 0,
                        batch_size: int = 256) -> EmpiricalLipschitz:
  """Empirical lower bounds on the Lipschitz constant of ``x -> fn(params, x)`` (beside the upper bounds).

  ``‖J(x)‖₂`` by ``num_steps`` steps of power iteration (jvp + vjp) from a seeded random start at each
  input, and ``‖f(x') − f(x)‖ / ‖x' − x‖`` for the pairs (x, x_adv).

  Args:
    fn: ``fn(params, x [B, ...]) -> [B, ...]`` (e.g. ``model.apply``); hashable (a jit static argument).
    params: pytree, traced.
    x: [B, ...] inputs; x_adv: optional [B, ...] perturbed inputs paired with ``x``.
    num_steps: power-iteration steps per example; seed: seed of the start vectors.
    batch_size: examples per compiled call (the last batch is padded).

  Returns:
    ``EmpiricalLipschitz(jacobian_norms [B], pair_ratios [#pairs with x' != x], lower_bound)``.
  """
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[0] < 1:
    raise ValueError(f"x must be a non-empty batch [B, ...], got shape {x.shape}")
  if x_adv is not None and tuple(np.shape(x_adv)) != tuple(x.shape):
    raise ValueError(f"x_adv shape {np.shape(x_adv)} differs from x shape {x.shape}")
  if int(num_steps) < 1 or int(batch_size) < 1:
    raise ValueError(f"num_steps and batch_size must be >= 1, got {num_steps}, {batch_size}")
  b, bs = x.shape[0], min(int(batch_size), x.shape[0])
  v0 = jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
  norms = []
  for start in range(0, b, bs):
    xb, vb = x[start:start + bs], v0[start:start + bs]
    k = xb.shape[0]
    xb, vb = (jnp.concatenate([a, jnp.repeat(a[:1], bs - k, axis=0)]) for a in (xb, vb))
    norms.append(np.asarray(_jacobian_norms(fn, params, xb, vb, int(num_steps)))[:k])
  jac = np.concatenate(norms)
  ratios = np.zeros((0,), np.float64)
  if x_adv is not None:
    x_adv = jnp.asarray(x_adv)
    num = jnp.linalg.norm((fn(params, x_adv) - fn(params, x)).reshape(b, -1), axis=1)
    den = jnp.linalg.norm((x_adv - x).reshape(b, -1), axis=1)
    ratios = np.asarray(num / jnp.where(den > 0, den, 1.0))[np.asarray(den > 0)]
  return EmpiricalLipschitz(jac, ratios, float(max(jac.max(initial=0.0), ratios.max(initial=0.0))))


# ----------------------------------------------------------------------------------------------------
# The experiment of scripts/spectral.py.


def _check_config(config) -> None:
  if not config.models:
    raise ValueError("spectral: config.models is empty")
  if config.method not in ("fft", "lanczos"):
    raise ValueError(f"spectral: config.method must be 'fft' or 'lanczos', got {config.method!r}")
  if config.weights not in ("random", "trained") and not os.path.exists(config.weights):
    raise ValueError(f"spectral: config.weights must be 'random', 'trained' or an existing .npz file or "
                     f"checkpoint directory, got {config.weights!r}")
  if config.adv_file and not os.path.isfile(config.adv_file):
    raise ValueError(f"spectral: config.adv_file {config.adv_file!r} does not exist")
  if config.num_steps < 1 or config.empirical_steps < 1 or config.num_empirical < 0:
    raise ValueError("spectral: num_steps and empirical_steps must be >= 1 and num_empirical >= 0")
  from intriguing_jax import train  # pylint: disable=g-import-not-at-top
  for name in config.models:
    train.recipe(name) if config.weights == "trained" else models.get_model(name)  # raises for unknown names
  for name, run_dir in config.run_dirs.items():
    if run_dir and not os.path.isfile(os.path.join(run_dir, "result.json")):
      raise ValueError(f"spectral: config.run_dirs.{name}={run_dir!r} is not a finished run (no result.json)")


def load_weights(path: str, variables: Params) -> Params:
  """Variables of ``path``: a checkpoint directory (``checkpoint.save_checkpoint``) of variables shaped like
  ``variables``, or a .npz with keys "<layer>/kernel", "<layer>/bias" in Flax layout (conv (kh, kw, C_in,
  C_out), dense (in, out); from PyTorch ``w.permute(2, 3, 1, 0)`` for convs, ``w.T`` for linears)."""
  from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    return checkpoint.restore_checkpoint(path, target=variables)[0]
  if not path.endswith(".npz"):
    raise ValueError(f"weights must be a .npz file or a checkpoint directory, got {path!r}")
  arrays = np.load(path)
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for key, ref in flat.items():
    if key not in arrays or arrays[key].shape != ref.shape:
      raise ValueError(f"weights {path}: {key!r} missing or not of shape {ref.shape} (keys <layer>/kernel, "
                       "<layer>/bias; Flax layout: conv (kh, kw, C_in, C_out), dense (in, out))")
    flat[key] = jnp.asarray(arrays[key], ref.dtype)
  return {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}


def _model_and_inputs(name: str, config, data_dir: Optional[str]):
  """(model, variables, input_shape, inputs of the empirical bound), or None for a missing trained run."""
  num = config.num_empirical
  if config.weights != "trained":
    model = models.get_model(name)
    shape = tuple(getattr(model, "image_shape", models.MNIST_SHAPE))
    variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1,) + shape))
    if config.weights != "random":
      variables = load_weights(config.weights, variables)
    return model, variables, shape, jax.random.uniform(jax.random.PRNGKey(config.seed + 1), (num,) + shape)
  from intriguing_jax import data, train  # pylint: disable=g-import-not-at-top
  test_x = jnp.asarray(data.load_mnist("test", data_dir)[0][:num])
  if config.run_dirs.get(name):  # a finished run, loaded as is
    rec = train.recipe(name)
    model = models.get_model(rec["model"], **rec.get("model_kwargs", {}))
    return model, train.load_run(config.run_dirs[name], model)[0], models.MNIST_SHAPE, test_x
  epochs = config.epochs.get(name) or None
  run_name = train.default_run_name(name, seed=config.train_seed, epochs=epochs)
  run_dir = os.path.join(config.models_dir, run_name)
  if not config.train_missing and not os.path.isdir(run_dir):
    logging.warning("spectral: skipping %s: no run %s (set config.train_missing to train it)", name, run_dir)
    return None
  images, labels = data.load_mnist("train", data_dir)
  model, variables = train.get_or_train(name, images, labels, workdir=config.models_dir,
                                        seed=config.train_seed, epochs=epochs)
  return model, variables, images.shape[1:], test_x


def run_experiment(config, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
  """Table 5 (``lipschitz_table``) and the empirical lower bound for each of ``config.models``.

  Writes ``<workdir>/<model>.md`` (table and products) and ``<workdir>/<model>.json`` (rows, summary).
  Config fields: see ``intriguing_jax/configs/spectral.py``.

  Returns:
    {model: summary} (products, empirical bounds, seconds).
  """
  from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _check_config(config)
  table5 = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "output"),
                    (spec["paper"] for spec in TABLE5)))
  out = {}
  for name in config.models:
    start = time.time()
    loaded = _model_and_inputs(name, config, data_dir)
    if loaded is None:
      continue
    model, variables, shape, x = loaded
    rows, summary = lipschitz_table(model, variables, shape, method=config.method, num_steps=config.num_steps)
    for row in rows if name == "alexnet" else ():
      if row["layer"] in table5:
        row["paper_table5"] = table5[row["layer"]]
    if config.adv_file:
      pairs = np.load(config.adv_file)
      x, x_adv = jnp.asarray(pairs["x"]), jnp.asarray(pairs["x_adv"])
    else:
      x_adv = None
    if x.shape[0]:
      emp = empirical_lipschitz(model.apply, variables, x, x_adv=x_adv, num_steps=config.empirical_steps,
                                batch_size=min(64, x.shape[0]))
      summary.update(empirical_lower_bound=emp.lower_bound,
                     empirical_max_jacobian_norm=float(emp.jacobian_norms.max()),
                     gap_upper_over_empirical=summary["product_upper"] / max(emp.lower_bound, 1e-30))
      if emp.pair_ratios.size:
        summary["empirical_max_pair_ratio"] = float(emp.pair_ratios.max())
    summary["seconds"] = time.time() - start
    text = f"# Lipschitz bounds: {name} (method {config.method})\n\n" + format_table(rows, summary)
    checkpoint.atomic_write_bytes(os.path.join(workdir, f"{name}.md"), text.encode())
    checkpoint.atomic_write_json(os.path.join(workdir, f"{name}.json"), dict(rows=rows, summary=summary))
    logging.info("spectral: %s: product_upper %.4g, paper-style %.4g (%.1f s)", name, summary["product_upper"],
                 summary["product_paper_style"], summary["seconds"])
    out[name] = summary
  return out
