"""Spectral analysis (paper §4.3, Table 5): exact layer operator norms and the network's Lipschitz bound.

Usage::

    r = spectral.conv_operator_norm(kernel, input_shape=(224, 224, 3), strides=4)  # HWIO kernel
    r.value, r.paper_formula     # exact circular norm; the printed Δ^-2 formula (= exact / 4)
    r = spectral.conv_operator_norm(kernel, input_shape=(224, 224, 3), strides=4, padding="SAME",
                                    method="lanczos")  # r.lower, r.upper: certified interval
    rows, summary = spectral.lipschitz_table(model, variables, (227, 227, 3))  # format_table(rows, summary)
    emp = spectral.empirical_lipschitz(model.apply, variables, images, x_adv=adv)

Maths (notes/spectral.md, ``../shared/spectral.md`` §2): a stride-s circular convolution is, after the
polyphase reshuffle ``x_c^{(l)}(m) = x_c(s·m + l)``, a stride-1 one on M = N/s with C·s² channels, norm
``max_ξ σ_max(P(ξ))``; the printed Δ⁻² formula is ``norm / s``. Zero padding: ``‖K_zero‖ ≤ ‖K_circ(N')‖``
(N' ≥ N+pads, s | N'), ``‖Kx‖`` of a unit x a lower bound. A chain of layers is ``Π L_i``-Lipschitz.
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
  """Operator norm of a linear layer with a certified interval. ``value``: the best estimate (exact for
  circular padding; for zero padding the Lanczos value with ``method="lanczos"``, else the upper bound);
  ``lower``: ‖K x‖ for an explicit unit x; ``upper``: exact circular value, or min over N' of the circular
  norm on N'; ``paper_formula``: eq. (1) as printed (Δ⁻²) on the N×N grid; ``circular``: the exact
  circular norm on the N×N grid (the paper's setting). The last two are NaN where s ∤ N."""
  value: float
  lower: float
  upper: float
  paper_formula: float
  circular: float


class EmpiricalLipschitz(NamedTuple):
  """``empirical_lipschitz``: jacobian_norms [B] (‖J(x)‖₂ per input), pair_ratios [P]
  (‖f(x') − f(x)‖ / ‖x' − x‖ per pair), lower_bound (the largest of them all)."""
  jacobian_norms: np.ndarray
  pair_ratios: np.ndarray
  lower_bound: float


def _pair(value: Any, name: str) -> Tuple[int, int]:
  try:
    out = (int(value),) * 2 if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
  except TypeError as e:
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from e
  if len(out) != 2 or min(out) < 1:
    raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
  return out  # type: ignore[return-value]


def _check_kernel(kernel: Any, input_shape: Any, strides: Any) -> Tuple[Any, Tuple[int, ...], Any]:
  shape = tuple(np.shape(kernel))
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f"kernel must be 4-D in Flax layout (kh, kw, C_in, C_out), non-empty; got {shape}")
  try:
    input_shape = tuple(int(v) for v in input_shape)
  except TypeError as e:
    raise ValueError(f"input_shape must be (H, W, C_in), got {input_shape!r}") from e
  if len(input_shape) != 3 or min(input_shape) < 1 or input_shape[2] != shape[2]:
    raise ValueError(f"input_shape must be (H, W, C_in), positive, with the kernel's C_in={shape[2]} "
                     f"channels (kernel layout (kh, kw, C_in, C_out): {shape}), got {input_shape}")
  if not np.all(np.isfinite(np.asarray(kernel))):
    raise ValueError("kernel contains NaN or Inf")
  return kernel, input_shape, _pair(strides, "strides")


def resolve_padding(padding: Padding, input_hw: Tuple[int, int], window: Tuple[int, int],
                    strides: Tuple[int, int]) -> Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
  """"CIRCULAR" or the explicit ((lo, hi), (lo, hi)) pads ``lax`` uses for ``padding`` ("CIRCULAR", "SAME",
  "VALID" (any case) or a pair of (lo, hi) pairs) on an ``input_hw`` input, window (kh, kw), strides."""
  p = padding.upper() if isinstance(padding, str) else None
  if p == "CIRCULAR":
    return "CIRCULAR"
  if p in ("VALID", "SAME"):  # SAME: total max((⌈n/s⌉ - 1)·s + k - n, 0), the extra one at the end
    tot = [max((-(-n // s) - 1) * s + k - n, 0) * (p == "SAME") for n, k, s in zip(input_hw, window, strides)]
    return tuple((t // 2, t - t // 2) for t in tot)  # type: ignore[return-value]
  try:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError) as e:
    raise ValueError(f"padding must be 'CIRCULAR', 'SAME', 'VALID' or ((lo, hi), (lo, hi)), "
                     f"got {padding!r}") from e
  if len(pads) != 2 or min(min(p) for p in pads) < 0:
    raise ValueError(f"padding must be two non-negative (lo, hi) pairs, got {padding!r}")
  return pads  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Convolutions: exact circular norms (polyphase symbol), the operator as the model runs it, Lanczos.


def _polyphase_symbol(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int], *, full: bool) -> Array:
  """Symbol matrices [F, C·s², D] (rfft half-plane unless ``full``); σ(P(ξ)) are the operator's.
  The kernel [kh, kw, C, D] becomes [Mh, Mw, sh*sw*C, D]: phases (lh, lw, c) as channels, taps folded
  modulo M (circular aliasing when k > N)."""
  (kh, kw, c, d), (mh, mw), (sh, sw) = kernel.shape, grid, strides
  qh, qw = -(-kh // sh), -(-kw // sw)  # taps per phase
  th, tw = -(-qh // mh) * mh, -(-qw // mw)  * mw  # rounded up to whole periods of the M grid
  k = jnp.pad(kernel, ((0, th * sh - kh), (0, tw * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(th // mh, mh, sh, tw // mw, mw, sw, c, d).sum(axis=(0, 3))
  k = k.transpose(0, 2, 1, 3, 4, 5).reshape(mh, mw, sh * sw * c, d)
  p = jnp.fft.fft2(k, axes=(0, 1)) if full else jnp.fft.rfft2(k, axes=(0, 1))  # real: P(-ξ) = conj P(ξ)
  return p.reshape((-1,) + p.shape[2:])


@functools.partial(jax.jit, static_argnames=("grid", "strides"))
def _circular_norm_and_vector(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int]):
  """Exact circular norm and a real top right singular vector in input space [s·Mh, s·Mw, C]."""
  p = _polyphase_symbol(kernel, grid, strides, full=False)  # [F, Cs², D]
  sig = jnp.linalg.svd(p, compute_uv=False)[:, 0]
  i = jnp.argmax(sig)
  (mh, mw), (sh, sw) = grid, strides
  xi_h, xi_w = i // (mw // 2 + 1), i % (mw // 2 + 1)
  # Operator symbol A(ξ) = P(ξ)^T (D × Cs²); v: top right singular vector of A(ξ).
  v = jnp.linalg.svd(p[i].T)[2][0].conj()
  phase = jnp.exp(2j * jnp.pi * (jnp.arange(mh)[:, None] * xi_h / mh + jnp.arange(mw)[None, :] * xi_w / mw))
  # x^{(l)}_c(m) = Re[conj(v_(l,c)) e^{+2πi m·ξ/M}]: a correlation maps the plane wave a·e^{iθm} to
  # e^{iθm}·conj(A(ξ))·a, whose top right singular vector is conj(v).
  z = (phase[:, :, None] * v.conj()[None, None, :]).reshape(mh, mw, sh, sw, -1).transpose(0, 2, 1, 3, 4)
  z = z.reshape(mh * sh, mw * sw, -1)
  x, alt = jnp.real(z).astype(kernel.dtype), jnp.imag(z).astype(kernel.dtype)
  # Re z and Im z are both top singular vectors unless one vanishes (ξ = -ξ); keep the larger.
  x = jnp.where(jnp.sum(x * x) >= jnp.sum(alt * alt), x, alt)
  return jnp.max(sig), x / jnp.linalg.norm(x)


def _check_divisible(hw: Tuple[int, int], strides: Tuple[int, int]) -> None:
  if hw[0] % strides[0] or hw[1] % strides[1]:
    raise ValueError(f"circular convolution needs the stride to divide the input size: input {hw}, strides "
                     f"{strides} (the operator on a non-divisible grid is not block-circulant)")


def top_singular_value(m: Array) -> Array:
  """σ_max of each matrix of ``m`` [..., a, b] (real or complex) -> [...] real, exact and differentiable.

  Computed on the smaller Gram matrix ``G`` (``mᴴm`` or ``m mᴴ``, n = min(a, b)): ``v`` = top eigenvector of
  ``G`` (``eigh``, held constant), ``σ = √(vᴴ G v)``. Its value is σ_max and, by Hellmann-Feynman, its
  gradient the exact ``Re(u vᴴ)`` (the terms in dv vanish at an eigenvector; a subgradient when σ_max is
  repeated). Cheaper to differentiate than ``jnp.linalg.svd`` (``scripts/bench/lipschitz_penalty.py``
  times both; notes/lipschitz.md)."""
  mh = jnp.conj(jnp.swapaxes(m, -1, -2))
  g = mh @ m if m.shape[-2] >= m.shape[-1] else m @ mh
  v = jnp.linalg.eigh(lax.stop_gradient(g))[1][..., -1]
  quad = jnp.real(jnp.einsum("...i,...ij,...j->...", jnp.conj(v), g, v))
  return jnp.sqrt(jnp.maximum(quad, jnp.finfo(quad.dtype).tiny))


def circular_conv_norm(kernel: Array, grid: Tuple[int, int], strides: Tuple[int, int] = (1, 1)) -> Array:
  """Exact norm ``max_ξ σ_max(P(ξ))`` of the circular stride-``strides`` convolution with ``kernel`` [kh, kw,
  C, D] on an input of (s_h·M_h, s_w·M_w) pixels, ``grid`` = (M_h, M_w): a traced float scalar, so jit-,
  vmap- and grad-able (a training penalty; :func:`top_singular_value` per frequency, a subgradient where
  the max over ξ is tied). For a zero-padded layer pass ``grid = ⌈(N + pad_lo + pad_hi)/s⌉``: then it is
  the certified upper bound ``‖K_circ(N')‖`` of §2.3 (for VALID with s | N, N' = N)."""
  p = _polyphase_symbol(kernel, tuple(grid), tuple(strides), full=False)  # [F, C·s², D]
  return jnp.max(top_singular_value(p))


def conv_singular_values(kernel: Array, input_hw: Tuple[int, int], strides: Any = (1, 1)) -> np.ndarray:
  """All singular values of the circular strided convolution, sorted descending: the union of σ(P(ξ))
  over all frequencies, [(H/sh)·(W/sw)·min(D, C·sh·sw)] numpy."""
  h, w = _pair(input_hw, "input_hw")
  kernel, _, strides = _check_kernel(kernel, (h, w, np.shape(kernel)[2]), strides)
  _check_divisible((h, w), strides)
  p = _polyphase_symbol(jnp.asarray(kernel), (h // strides[0], w // strides[1]), strides, full=True)
  return np.sort(np.asarray(jnp.linalg.svd(p, compute_uv=False)).ravel())[::-1]


def conv_apply(kernel: Array, x: Array, strides: Tuple[int, int], padding: Any) -> Array:
  """The bias-free layer ``x [H, W, C] -> y [H', W', D]`` exactly as lax/Flax run it; ``padding`` from
  ``resolve_padding`` ("CIRCULAR" wraps by ((k-1)//2, k//2) per axis, as ``nn.Conv(padding="CIRCULAR")``)."""
  if padding == "CIRCULAR":
    x = jnp.pad(x, tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2]) + ((0, 0),), mode="wrap")
    padding = ((0, 0), (0, 0))
  return lax.conv_general_dilated(x[None], kernel, strides, padding, dimension_numbers=_DIMS)[0]


def _lanczos_top(matvec: Callable[[Array], Array], v0: Array, num_steps: int) -> Tuple[Array, Array]:
  """Top Ritz pair (unit vector shaped like v0, value ≤ λ_max) of a symmetric PSD operator on the Krylov
  space of ``v0``: full re-orthogonalisation and Rayleigh-Ritz on ``Vᵀ A V`` (not the tridiagonal), so it
  stays correct after a breakdown (Krylov space exhausted, e.g. a low-rank VALID convolution)."""
  shape, dtype, n = v0.shape, v0.dtype, v0.size
  basis = jnp.zeros((num_steps, n), dtype).at[0].set(v0.ravel() / jnp.linalg.norm(v0))
  images, eps = jnp.zeros((num_steps, n), dtype), jnp.sqrt(jnp.finfo(dtype).eps)

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
  # Noise keeps the warm start out of invariant subspaces (a cropped plane wave can be orthogonal to the top
  # singular vector by symmetry, and Lanczos would break down there).
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape, x0.dtype)
  x0 = x0 / jnp.linalg.norm(x0) + 1e-2 * noise / jnp.linalg.norm(noise)
  op = functools.partial(conv_apply, kernel, strides=strides, padding=padding)
  op_t = jax.linear_transpose(op, x0)
  x, _ = _lanczos_top(lambda v: op_t(op(v))[0], x0, num_steps)
  return jnp.linalg.norm(op(x)) / jnp.linalg.norm(x)  # Rayleigh: a certified lower bound


def _zero_padded_norm(kernel: Array, hw: Tuple[int, int], strides: Tuple[int, int], pads, method: str,
                      num_steps: int, num_grids: int) -> Tuple[float, float, float]:
  """(value, lower, upper) of a zero-padded layer: upper = min over the first ``num_grids`` admissible
  circular grids N' ≥ N + lo + hi with s | N' (spectral.md §2.3); lower from the first grid's top vector
  cropped to the input (or Lanczos warm-started from it)."""
  upper, start = float("inf"), None
  for extra in range(num_grids):
    grid = tuple(-(-(n + lo + hi) // s) + extra for n, (lo, hi), s in zip(hw, pads, strides))
    val, v = _circular_norm_and_vector(kernel, grid, strides)
    upper = min(upper, float(val))
    if start is None:  # E places x at offset (lo_h, lo_w) in the N' grid
      start = v[pads[0][0]:pads[0][0] + hw[0], pads[1][0]:pads[1][0] + hw[1]]
  if method == "fft":
    lower = float(jnp.linalg.norm(conv_apply(kernel, start / jnp.linalg.norm(start), strides, pads)))
    return upper, lower, upper
  lower = float(_matrix_free_norm(kernel, start.astype(kernel.dtype), strides, pads, num_steps))
  return lower, lower, upper


def conv_operator_norm(kernel: Array, *, input_shape: Sequence[int], strides: Any = (1, 1),
                       padding: Padding = "CIRCULAR", method: str = "fft", num_steps: int = 100,
                       num_grids: int = 1) -> OperatorNorm:
  """Operator norm (largest singular value) of a multi-channel strided 2-D convolution layer.

  ``kernel`` [kh, kw, C_in, C_out] (Flax layout; the bias never changes a Lipschitz constant) on inputs of
  ``input_shape`` (H, W, C_in); ``strides``: int or (sh, sw); ``padding``: "CIRCULAR" (periodic, the
  paper's setting), "SAME", "VALID", or ((lo, hi), (lo, hi)). ``method`` "fft": exact polyphase FFT norm
  for circular padding, for zero padding the certified upper bound min over ``num_grids`` grids N';
  "lanczos": also ``num_steps`` Lanczos steps on the exact operator, warm-started from the circular top
  singular vector (exact value; its Rayleigh quotient a certified lower bound). Returns ``OperatorNorm``
  (Python floats); ValueError for bad arguments or circular padding with a stride not dividing H or W."""
  kernel, input_shape, strides = _check_kernel(kernel, input_shape, strides)
  if method not in ("fft", "lanczos") or int(num_steps) < 1 or int(num_grids) < 1:
    raise ValueError(f"method must be 'fft' or 'lanczos', num_steps and num_grids >= 1; got {method!r}, "
                     f"{num_steps}, {num_grids}")
  kernel, hw = jnp.asarray(kernel), input_shape[:2]
  kh, kw = kernel.shape[:2]
  pads = resolve_padding(padding, hw, (kh, kw), strides)
  if pads != "CIRCULAR" and any(n + lo + hi < k for n, (lo, hi), k in zip(hw, pads, (kh, kw))):
    raise ValueError(f"the {kh}x{kw} kernel is larger than the padded {hw[0]}x{hw[1]} input "
                     f"(padding {padding!r}): the convolution has no output")
  circ = paper = float("nan")
  if hw[0] % strides[0] == 0 and hw[1] % strides[1] == 0:
    circ, vec = _circular_norm_and_vector(kernel, (hw[0] // strides[0], hw[1] // strides[1]), strides)
    circ = float(circ)
    paper = circ / math.sqrt(strides[0] * strides[1])  # the printed Δ⁻²: norm / Δ (spectral.md §2.2)
  if pads != "CIRCULAR":
    return OperatorNorm(*_zero_padded_norm(kernel, hw, strides, pads, method, int(num_steps), int(num_grids)),
                        paper, circ)
  _check_divisible(hw, strides)
  if method == "fft":
    return OperatorNorm(circ, circ, circ, paper, circ)
  # conv_apply wraps by ((k-1)//2, k//2), i.e. shifts the input by (k-1)//2: the top vector shifts too.
  x0 = jnp.roll(vec, (-((kh - 1) // 2), -((kw - 1) // 2)), axis=(0, 1)).astype(kernel.dtype)
  lower = float(_matrix_free_norm(kernel, x0, strides, "CIRCULAR", int(num_steps)))
  if lower > circ * (1 + 1e-4):
    logging.warning("conv_operator_norm: Rayleigh value %.8g exceeds the circular norm %.8g", lower, circ)
  return OperatorNorm(circ, min(lower, circ), circ, paper, circ)


def reshaped_kernel_norm(kernel: Array) -> float:
  """σ_max of the kernel reshaped to (kh·kw·C_in) × C_out: what Flax/Haiku ``SpectralNorm`` normalise by.
  It is NOT the convolution's norm but a lower bound on it: for circular padding with N ≥ k,
  ``‖W_r‖ ≤ ‖K‖ ≤ √(⌈kh/s⌉⌈kw/s⌉)·‖W_r‖`` (spectral.md §2.4). Reported beside the exact value."""
  if len(np.shape(kernel)) != 4:
    raise ValueError(f"kernel must be 4-D (kh, kw, C_in, C_out), got shape {np.shape(kernel)}")
  return dense_operator_norm(jnp.reshape(jnp.asarray(kernel), (-1, np.shape(kernel)[3])))


@functools.partial(jax.jit, static_argnames=("num_blocks", "check_every"))
def _dense_block_krylov(w, v0, num_blocks, tol, check_every=2):
  """Block Lanczos on wᵀw (notes/spectral.md): ``H = Vᵀ(wᵀw)V`` filled one block column per step; every
  ``check_every`` blocks, stops once the top Ritz residual ``‖(wᵀw V)s − θ Vs‖ ≤ tol·θ``. Returns (‖w x‖/‖x‖,
  a certified lower bound on σ_max; blocks used; relative residual of θ)."""
  n, b = v0.shape
  k = num_blocks * b
  basis = jnp.zeros((num_blocks, n, b), w.dtype).at[0].set(jnp.linalg.qr(v0)[0])
  images, h = jnp.zeros((num_blocks, n, b), w.dtype), jnp.zeros((k, k), w.dtype)
  thresh = jnp.sqrt(jnp.finfo(w.dtype).eps)

  def ritz(basis, images, h):
    y = jnp.linalg.eigh(h)[1][:, -1]
    x, ax = (a.transpose(1, 0, 2).reshape(n, -1) @ y for a in (basis, images))
    theta = jnp.vdot(x, ax) / jnp.vdot(x, x)
    scale = jnp.maximum(theta * jnp.linalg.norm(x), jnp.finfo(w.dtype).tiny)
    return x, jnp.linalg.norm(ax - theta * x) / scale

  cond = lambda carry: (carry[0] < num_blocks) & (carry[4] > tol)  # carry: (j, basis, images, h, rel)

  def body(carry):
    j, basis, images, h, rel = carry
    img = w.T @ (w @ basis[j])
    images = images.at[j].set(img)
    flat = basis.transpose(1, 0, 2).reshape(n, -1)
    col = flat.T @ img  # H[:, block j]; rows of unbuilt blocks are zero
    h = lax.dynamic_update_slice(lax.dynamic_update_slice(h, col, (0, j * b)), col.T, (j * b, 0))
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
  ``method``: "svd" (exact, LAPACK), "lanczos" (block Lanczos on wᵀw, ``block_size`` vectors per block,
  Krylov dimension ≤ ``num_steps``, start block from ``seed``; its value is a certified lower bound
  ‖w x‖/‖x‖ converging to σ_max; it stops once the relative Ritz residual is ≤ ``tol``, checked every 2
  blocks, 0 runs all), or "auto" (svd when min(in, out) ≤ 1024, else lanczos). Returns a Python float."""
  shape = np.shape(w)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"w must be a non-empty 2-D [in, out] matrix, got shape {shape}")
  if method not in ("auto", "svd", "lanczos") or int(num_steps) < 1 or not 0 <= float(tol) < 1:
    raise ValueError(f"need method 'auto', 'svd' or 'lanczos', num_steps >= 1 and tol in [0, 1); got "
                     f"{method!r}, {num_steps}, {tol}")
  w = jnp.asarray(w)
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("w contains NaN or Inf")
  if method == "svd" or method == "auto" and min(shape) <= 1024:
    return float(jnp.linalg.svd(w, compute_uv=False)[0])
  w = w.T if w.shape[0] < w.shape[1] else w  # iterate on the smaller Gram side
  block = int(min(block_size, w.shape[1]))
  num_blocks = int(max(1, min(-(-int(num_steps) // block), w.shape[1] // block)))
  v0 = jax.random.normal(jax.random.PRNGKey(seed), (w.shape[1], block), w.dtype)
  value, used, rel = _dense_block_krylov(w, v0, num_blocks, jnp.asarray(tol, w.dtype))
  logging.info("dense_operator_norm: %s, block Lanczos %d/%d blocks of %d, relative residual %.2e", w.shape,
               int(used), num_blocks, block, float(rel))
  return float(value)


def _max_windows(n: int, k: int, s: int, lo: int, hi: int) -> int:
  """Largest number of pooling windows covering one of the n input positions (padding never counts)."""
  out = (n + lo + hi - k) // s + 1
  if out < 1:
    raise ValueError(f"pooling window {k} larger than the padded input {n}+{lo}+{hi}")
  starts, pos = np.arange(out) * s - lo, np.arange(n)[:, None]
  return int(((pos >= starts) & (pos < starts + k)).sum(axis=1).max())


def _pool_args(window: Any, strides: Any, input_shape: Optional[Sequence[int]]):
  window = _pair(window, "window")
  if input_shape is not None and (len(input_shape) not in (2, 3) or min(input_shape) < 1):
    raise ValueError(f"input_shape must be (H, W) or (H, W, C), got {tuple(input_shape)}")
  return window, _pair(strides if strides is not None else window, "strides")


def maxpool_lipschitz(window: Any, strides: Any = None, *, input_shape: Optional[Sequence[int]] = None,
                      padding: Padding = "VALID") -> float:
  """Exact L2 Lipschitz constant of max pooling: √(max number m of windows covering one input pixel)
  (spectral.md §2.6; the paper's "≤ 1" holds only when k ≤ s). ``strides`` default to ``window``; without
  ``input_shape`` (H, W[, C]) it is √(⌈kh/sh⌉·⌈kw/sw⌉) (a large map); padded cells never win."""
  (kh, kw), (sh, sw) = window, strides = _pool_args(window, strides, input_shape)
  if input_shape is None:
    return math.sqrt(-(-kh // sh) * -(-kw // sw))
  pads = resolve_padding(padding, tuple(input_shape[:2]), window, strides)
  if pads == "CIRCULAR":
    raise ValueError("maxpool_lipschitz: circular padding is not a pooling mode")
  return math.sqrt(_max_windows(int(input_shape[0]), kh, sh, *pads[0]) *
                   _max_windows(int(input_shape[1]), kw, sw, *pads[1]))


def avgpool_norm(window: Any, strides: Any = None, *, input_shape: Sequence[int],
                 padding: Padding = "VALID") -> float:
  """A certified upper bound of the operator norm of (linear) average pooling, count_include_pad: a depthwise
  conv with kernel 1/(kh·kw), bounded as ``conv_operator_norm(method="fft").upper`` (exact for circular
  padding; e.g. 0.556 against the exact 0.490 for 3x3 / 2 VALID on 7x7); ``input_shape`` (H, W) or (H, W, C)
  (the norm does not depend on C)."""
  (kh, kw), strides = _pool_args(window, strides, input_shape)
  kernel = jnp.full((kh, kw, 1, 1), 1.0 / (kh * kw), jnp.float32)
  return conv_operator_norm(kernel, input_shape=(int(input_shape[0]), int(input_shape[1]), 1),
                            strides=strides, padding=padding, method="fft").upper


def contrast_norm_lipschitz(epsilon: float, gamma: float) -> float:
  """L = ε^{-γ} for φ(x) = x / (ε + ‖x‖²)^γ, exact for every γ ≥ 0 (attained at x = 0; spectral.md §2.7)."""
  if not epsilon > 0 or not gamma >= 0 or not math.isfinite(epsilon) or not math.isfinite(gamma):
    raise ValueError(f"contrast_norm_lipschitz needs epsilon > 0 and gamma >= 0, got {epsilon}, {gamma}")
  return float(epsilon ** (-gamma))


def lrn_lipschitz(k: float = 2.0, n: int = 5, beta: float = 0.75) -> Tuple[float, float]:
  """Certified interval (lower, upper) = [k^{-β}, k^{-β} + β g* √((1+√n)(n+1))] for AlexNet's LRN
  ``b_i = a_i (k + α' Σ_{j∈N(i)} a_j²)^{-β}``, any α; g* = (β/(k(1+β)))^β / (1+β) (spectral.md §2.7)."""
  if not k > 0 or not beta >= 0 or int(n) < 1:
    raise ValueError(f"lrn_lipschitz needs k > 0, beta >= 0, n >= 1, got k={k}, n={n}, beta={beta}")
  lower, g_star = k ** (-beta), (beta / (k * (1 + beta))) ** beta / (1 + beta)
  return float(lower), float(lower + beta * g_star * math.sqrt((1 + math.sqrt(n)) * (n + 1)))


# ----------------------------------------------------------------------------------------------------
# Whole networks: one row per layer the Flax module calls.


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
  return dict(type="conv", size=f"{c} x {kh} x {kw} x {d}", stride=strides, upper=r.upper,
              lower=r.lower, circular=r.circular, paper=paper, reshaped=reshaped_kernel_norm(kernel),
              note=note)


def _dense_row(call: models.LayerCall, variables: Params, *_) -> Dict[str, Any]:
  kernel = jnp.asarray(models.get_param(variables, call.path)["kernel"])
  sig = dense_operator_norm(kernel)
  return dict(type="dense", size=f"{kernel.shape[0]} x {kernel.shape[1]}", stride="N/A", upper=sig, lower=sig,
              paper=sig, note="exact (svd)" if min(kernel.shape) <= 1024 else "Lanczos")


def _maxpool_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  window, strides = _pair(call.module.window, "window"), _pair(call.module.strides, "strides")
  lip = maxpool_lipschitz(window, strides, input_shape=call.input_shape[:2], padding=call.module.padding)
  return dict(type="maxpool", size=f"{window[0]} x {window[1]}", stride=strides, upper=lip,
              lower=lip, paper=1.0, note="overlapping windows" if lip > 1 else "non-overlapping windows")


def _lrn_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  m, n = call.module, 2 * call.module.depth_radius + 1
  lo, hi = lrn_lipschitz(m.bias, n, m.beta)
  return dict(type="lrn", upper=hi, lower=lo, paper=float("nan"),
              note=f"certified interval, k={m.bias:g} n={n} beta={m.beta:g}")


def _activation_row(call: models.LayerCall, *_) -> Dict[str, Any]:
  lip, note = {"relu": (1.0, "contractive"), "sigmoid": (0.25, "sup sigma' = 1/4")}[call.module.kind]
  return dict(type=call.module.kind, upper=lip, lower=lip, paper=lip, note=note)

# Module type -> row of its layer (the Lipschitz constant and how it was found).
_ROWS: Tuple[Tuple[type, Callable[..., Dict[str, Any]]], ...] = (
    (nn.Conv, _conv_row), (nn.Dense, _dense_row), (models.MaxPool, _maxpool_row),
    (models.LocalResponseNorm, _lrn_row), (models.Activation, _activation_row),
    (models.Flatten, lambda *_: dict(type="flatten", note="isometry")),
    (nn.Dropout, lambda *_: dict(type="dropout", note="identity at test time")))


def _check_chain(model: nn.Module, variables: Params, calls: Sequence[models.LayerCall],
                 input_shape: Tuple[int, ...]) -> None:
  """Raises unless applying the traced layers one after the other reproduces ``model.apply`` (so that the
  product of their constants bounds the network: nothing runs between them that the table misses)."""
  x = h = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + input_shape), jnp.float32)
  reason = ""
  try:
    for call in calls:
      layer = call.module.clone(parent=None, name=None)
      h = layer.apply({"params": models.get_param(variables, call.path)}
                      if isinstance(layer, (nn.Dense, nn.Conv)) else {}, h)
  except (ValueError, TypeError, flax.errors.FlaxError) as e:   # e.g. a reshape the layers do not see
    reason = f" (applied one after the other they fail: {type(e).__name__}: {str(e).splitlines()[0]})"
  want = model.apply(variables, x)
  if reason or h.shape != want.shape or not np.allclose(
      h, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want)))):
    raise ValueError(f"lipschitz_table: {type(model).__name__} is not the chain of its layers "
                     f"{['/'.join(c.path) for c in calls]}{reason}: something else runs between or around "
                     "them (e.g. nn.relu or nn.max_pool instead of models.Activation / models.MaxPool, "
                     "x.reshape instead of models.Flatten, a skip connection, an unsupported layer); "
                     f"supported layers: {[t.__name__ for t, _ in _ROWS]}")


def lipschitz_table(model: nn.Module, variables: Params, input_shape: Sequence[int], *, method: str = "fft",
                    num_steps: int = 100) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
  """Per-layer Lipschitz bounds of ``model`` on inputs of ``input_shape`` and their product (Table 5).
  The layers (types of ``_ROWS``) are those ``model.apply`` calls on an input of ``input_shape`` (e.g.
  (784,)), with the shapes they see there; the model must be their chain (checked), else ValueError.
  ``method``, ``num_steps``: conv norms. Returns (rows, summary). A row: layer, type, size, stride,
  input, upper (certified, used in the product), lower (certified lower bound), circular (exact circular
  norm on the layer's N×N input), paper (the paper's formula: Δ⁻² for conv, σ_max for dense, 1 for
  max-pool and ReLU, 1/4 for sigmoid), note; conv rows add reshaped (``reshaped_kernel_norm``). The
  summary: product_upper (all layers), product_paper_style (conv + dense, the paper's formula),
  product_linear (conv + dense upper bounds), num_layers."""
  shape = tuple(int(v) for v in input_shape)
  variables = variables if "params" in variables else {"params": variables}
  calls = models.trace_layers(model, variables, shape)
  _check_chain(model, variables, calls, shape)
  rows = []
  for call in calls:
    row = dict(layer="/".join(call.path), type="", size="", stride="", upper=1.0, lower=1.0,
               input="x".join(map(str, call.input_shape)), circular=float("nan"), paper=1.0, note="")
    row_fn = next(fn for kind, fn in _ROWS if isinstance(call.module, kind))
    row.update(row_fn(call, variables, method, num_steps))
    if isinstance(row["stride"], tuple) and row["stride"][0] == row["stride"][1]:  # (s, s) shown as s
      row["stride"] = row["stride"][0]
    logging.info("spectral: %s %s upper=%.6g lower=%.6g", *(row[c] for c in ("layer", "type", "upper",
                                                                              "lower")))
    rows.append(row)
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
                      "paper_table5", "note") if any(c in r for r in rows)]
  text = plotting.markdown_table(list(rows), cols, floatfmt=floatfmt)
  if summary:
    text += "\n" + "\n".join(f"- {k}: {v:{floatfmt}}" if isinstance(v, float) else f"- {k}: {v}"
                             for k, v in summary.items()) + "\n"
  return text


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
  ``‖J(x)‖₂`` at each input x [B, ...] by ``num_steps`` steps of power iteration (jvp + vjp) from a start
  drawn with ``seed``, ``batch_size`` inputs per compiled call (the last batch padded); and
  ``‖f(x') − f(x)‖ / ‖x' − x‖`` for the pairs (x, x_adv) with x' != x. ``fn(params, x [B, ...]) -> [B, ...]``
  (e.g. ``model.apply``) is a jit static argument (hashable); ``params`` is traced."""
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[0] < 1 or int(num_steps) < 1 or int(batch_size) < 1:
    raise ValueError(f"need x a non-empty batch [B, ...], num_steps and batch_size >= 1; got shape "
                     f"{x.shape}, {num_steps}, {batch_size}")
  if x_adv is not None and tuple(np.shape(x_adv)) != tuple(x.shape):
    raise ValueError(f"x_adv shape {np.shape(x_adv)} differs from x shape {x.shape}")
  b, bs = x.shape[0], min(int(batch_size), x.shape[0])
  v0 = jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
  # Whole batches, padded and cut on the host: eager device ops would each compile on first use.
  xp, vp = (np.concatenate([a, np.repeat(a[:1], -b % bs, axis=0)]) for a in (np.asarray(x), np.asarray(v0)))
  jac = np.concatenate([np.asarray(_jacobian_norms(fn, params, xp[i:i + bs], vp[i:i + bs], int(num_steps)))
                        for i in range(0, b, bs)])[:b]
  ratios = np.zeros((0,), np.float64)
  if x_adv is not None:
    ratios, moved = map(np.asarray, _pair_ratios(fn, params, x, jnp.asarray(x_adv)))
    ratios = ratios[moved]
  return EmpiricalLipschitz(jac, ratios, float(max(jac.max(initial=0.0), ratios.max(initial=0.0))))


@functools.partial(jax.jit, static_argnames=("fn",))
def _pair_ratios(fn, params, x, x_adv):
  """||f(x') - f(x)|| / ||x' - x|| for each pair [B] (0 where x' == x), and [B] bool: x' != x."""
  b = x.shape[0]
  num = jnp.linalg.norm((fn(params, x_adv) - fn(params, x)).reshape(b, -1), axis=1)
  den = jnp.linalg.norm((x_adv - x).reshape(b, -1), axis=1)
  return num / jnp.where(den > 0, den, 1.0), den > 0


# ----------------------------------------------------------------------------------------------------
# The experiment of scripts/spectral.py.


def _check_config(config) -> None:
  from intriguing_jax import train  # pylint: disable=g-import-not-at-top
  c = config
  if (not c.models or c.method not in ("fft", "lanczos")
      or c.weights not in ("random", "trained") and not os.path.exists(c.weights)):
    raise ValueError(f"spectral: need config.models non-empty, config.method 'fft' or 'lanczos', "
                     f"config.weights 'random', 'trained' or an existing .npz file or checkpoint directory; "
                     f"got {c.models}, {c.method!r}, {c.weights!r}")
  if (min(c.num_steps, c.empirical_steps, c.num_empirical + 1) < 1
      or c.adv_file and not os.path.isfile(c.adv_file)):
    raise ValueError(f"spectral: need config.adv_file an existing file or '' (got {c.adv_file!r}), num_steps "
                     "and empirical_steps >= 1 and num_empirical >= 0")
  for name in c.models:  # raises for unknown names
    train.recipe(name) if c.weights == "trained" else models.get_model(name)
  for name, run_dir in c.run_dirs.items():
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
  arrays, flat = np.load(path), flax.traverse_util.flatten_dict(variables["params"], sep="/")
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
  run_dir = os.path.join(config.models_dir,
                         train.default_run_name(name, seed=config.train_seed, epochs=epochs))
  if not config.train_missing and not os.path.isdir(run_dir):
    logging.warning("spectral: skipping %s: no run %s (set config.train_missing to train it)", name, run_dir)
    return None
  images, labels = data.load_mnist("train", data_dir)
  model, variables = train.get_or_train(name, images, labels, workdir=config.models_dir,
                                        seed=config.train_seed, epochs=epochs)
  return model, variables, images.shape[1:], test_x


def run_experiment(config, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
  """Table 5 (``lipschitz_table``) and the empirical lower bound for each of ``config.models``
  (``intriguing_jax/configs/spectral.py``): writes ``<workdir>/<model>.md`` (table and products) and
  ``<workdir>/<model>.json`` (rows, summary); returns {model: summary} (products, empirical bounds, seconds).
  """
  from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _check_config(config)
  table5 = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "output"),
                    (spec["paper"] for spec in TABLE5)))
  out = {}
  for name in config.models:
    start, loaded = time.time(), _model_and_inputs(name, config, data_dir)
    if loaded is None:
      continue
    (model, variables, shape, x), x_adv = loaded, None
    rows, summary = lipschitz_table(model, variables, shape, method=config.method, num_steps=config.num_steps)
    for row in rows if name == "alexnet" else ():
      if row["layer"] in table5:
        row["paper_table5"] = table5[row["layer"]]
    if config.adv_file:
      x, x_adv = (jnp.asarray(np.load(config.adv_file)[k]) for k in ("x", "x_adv"))
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
    logging.info("spectral: %s: product_upper %.4g, paper-style %.4g (%.1f s)", name,
                 summary["product_upper"], summary["product_paper_style"], summary["seconds"])
    out[name] = summary
  return out
