"""Unit analysis (paper Section 3): natural-basis units vs random directions, measured.

Usage::

    import jax
    from intriguing_jax import models, units

    model = models.get_model("mnist_conv")                          # trained variables from train.get_or_train
    phi = units.model_feature_fn(model, variables, layers=["fc1"])  # x -> {"fc1": [B, 128]}
    dims = units.feature_dims(phi, images[:1])                      # {"fc1": 128}
    key_nat, key_rand = jax.random.split(jax.random.PRNGKey(0))
    unit_ids = units.sample_units(key_nat, dims["fc1"], 100)        # which e_i to inspect
    dirs = {"fc1": units.natural_directions(dims["fc1"], unit_ids)}  # [100, 128] rows e_i
    # or: dirs = {"fc1": units.random_directions(key_rand, 100, dims["fc1"])}  # unit-norm Gaussian
    top = units.top_k_images(phi, images, dirs, k=10)               # {"fc1": TopK(scores, indices [100, 10])}
    coh = units.coherence(labels[top["fc1"].indices], images=images[top["fc1"].indices])

    # Or the whole measured claim, natural vs random, for every layer:
    result = units.analyse(phi, images, labels, key=jax.random.PRNGKey(0), num_directions=200, k=10)
    result["fc1"].comparisons["majority_share"].verdict            # e.g. "not distinguishable"

The paper (Section 3; paper.md §2, §8, A17) ranks a held-out image set I by ``<φ(x), v>`` and shows the
top images for natural-basis directions ``v = e_i`` (Figure 1) and random directions (Figure 2); it claims
both rows are "semantically" coherent, so "the natural basis is not better than a random basis". The paper
only shows pictures. Here the claim is measured: for each direction, the coherence of its top-k images
(share of the majority label, label entropy, and a label-free mean pairwise pixel cosine similarity) is
computed for natural and random directions, plus a chance baseline of random k-subsets of I; the two
distributions are compared with a Mann-Whitney U test, a seeded permutation test on the difference of
means and the Vargha-Delaney effect size A.

Top-k search streams over I in fixed-size batches: one jitted step maps a batch to scores ``φ(x) V^T``
([B, D], all directions at once) and merges them into a running per-direction top-k with ``lax.top_k``
(the merge is ``vmap``-ed over directions). Memory is O(B * (n + D) + D * k), independent of |I|, and the
ragged last batch is padded and masked so one compiled program serves any |I|.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax.types import Array, Params, PRNGKey

__all__ = [
    "TopK", "Coherence", "Comparison", "LayerAnalysis", "MEASURES",
    "model_feature_fn", "feature_dims", "natural_directions", "sample_units", "random_directions",
    "random_subsets", "top_k_images", "top_k_from_scores", "coherence", "compare_distributions",
    "holm_adjust", "analyse", "summary_rows", "verdict_rows",
]

FeatureFn = Callable[[Array], Union[Array, Mapping[str, Array]]]

# Measure name -> True when larger values mean more coherent.
MEASURES: Dict[str, bool] = {
    "majority_share": True,      # share of the most frequent label among the top-k, in [1/C, 1]
    "label_entropy": False,      # entropy of the top-k labels in bits, in [0, log2(min(k, C))]
    "pixel_similarity": True,    # mean pairwise cosine similarity of the top-k images (label-free)
}

_SINGLE = "features"  # layer name used when a feature function returns a bare array


class TopK(NamedTuple):
  """The k images of I with the largest projections, per direction.

  Attributes:
    scores: [D, k] float32 ``<φ(x), v>``, descending along k.
    indices: [D, k] int32 indices into I (ties keep the earlier image).
  """
  scores: Array
  indices: Array


class Coherence(NamedTuple):
  """Per-direction coherence of a set of top-k images; every field is [D] (numpy).

  Attributes:
    majority_share: fraction of the k images carrying the most frequent label.
    majority_label: that label (the smallest one on ties).
    label_entropy: entropy of the label histogram of the k images, in bits.
    pixel_similarity: mean pairwise cosine similarity of the k flattened images (NaN if images not given).
  """
  majority_share: np.ndarray
  majority_label: np.ndarray
  label_entropy: np.ndarray
  pixel_similarity: np.ndarray


class Comparison(NamedTuple):
  """Two-sample comparison of a coherence measure, sample ``a`` (natural) vs sample ``b`` (random).

  Attributes:
    mean_a, mean_b: sample means.
    n_a, n_b: sample sizes.
    u_statistic: Mann-Whitney U of ``a``.
    p_mannwhitney: two-sided Mann-Whitney U p-value (scipy, tie-corrected).
    p_permutation: two-sided permutation p-value of |mean_a - mean_b|, ``(hits + 1) / (P + 1)``.
    p_value: max(p_mannwhitney, p_permutation): both tests must reject.
    p_adjusted: ``p_value`` after Holm's correction over a family of tests (``analyse``: the measures of
      one layer); equal to ``p_value`` for a single comparison.
    effect_a: Vargha-Delaney A = P(a > b) + P(a = b) / 2 = U / (n_a n_b); 0.5 means no difference.
    magnitude: "negligible" | "small" | "medium" | "large" (|A - 0.5| < .06, < .14, < .21, else;
      Vargha & Delaney 2000).
    significant: p_adjusted < alpha.
    verdict: "not distinguishable" or "distinguishable (<magnitude> effect, <which> more coherent)".
  """
  mean_a: float
  mean_b: float
  n_a: int
  n_b: int
  u_statistic: float
  p_mannwhitney: float
  p_permutation: float
  p_value: float
  p_adjusted: float
  effect_a: float
  magnitude: str
  significant: bool
  verdict: str


class LayerAnalysis(NamedTuple):
  """Everything ``analyse`` measured for one layer.

  Attributes:
    layer: features key.
    dim: number of units n of the layer (flattened).
    units: [D_nat] natural-basis unit indices analysed.
    natural, random: TopK for the natural and random directions ([D_nat, k], [D_rand, k]).
    random_dirs: [D_rand, n] the random unit-norm directions.
    natural_coherence, random_coherence, chance_coherence: Coherence of the top-k images of each natural
      direction, each random direction, and of random k-subsets of I (the chance baseline).
    natural_valid, random_valid: [D] bool, False for degenerate directions (all k top scores equal, e.g.
      a dead ReLU unit: the ranking is then arbitrary); excluded from the comparisons when asked.
    comparisons: measure -> Comparison natural vs random.
    vs_chance: measure -> {"natural": Comparison natural vs chance, "random": Comparison random vs chance}.
  """
  layer: str
  dim: int
  units: np.ndarray
  natural: TopK
  random: TopK
  random_dirs: np.ndarray
  natural_coherence: Coherence
  random_coherence: Coherence
  chance_coherence: Coherence
  natural_valid: np.ndarray
  random_valid: np.ndarray
  comparisons: Dict[str, Comparison]
  vs_chance: Dict[str, Dict[str, Comparison]]


# ----------------------------------------------------------------------------------------------------
# Feature functions φ.


def model_feature_fn(model: Any, variables: Params, layers: Optional[Sequence[str]] = None) -> Callable:
  """φ for a Flax model following the models contract (``apply(..., return_features=True)``).

  Args:
    model: a Linen module whose ``__call__(x, *, train=False, return_features=False)`` returns
      ``(logits, features)`` with ``return_features=True``.
    variables: its variables (``{"params": ...}``).
    layers: feature names to keep, in order (default: every hidden layer the model returns).

  Returns:
    ``phi(x) -> {layer: [B, n_layer]}``, activations flattened per example (post-nonlinearity, as the
    model returns them). Unknown layer names raise ValueError on the first call (naming the known ones).
  """
  wanted = None if layers is None else tuple(layers)

  def phi(x: Array) -> Dict[str, Array]:
    _, feats = model.apply(variables, x, return_features=True)
    names = list(feats) if wanted is None else list(wanted)
    missing = [n for n in names if n not in feats]
    if missing:
      raise ValueError(f"model_feature_fn: layers {missing} not among the model's features {list(feats)}")
    return {n: feats[n].reshape(feats[n].shape[0], -1) for n in names}

  return phi


def _as_dict(tree: Any) -> Tuple[Dict[str, Any], bool]:
  if isinstance(tree, Mapping):
    return dict(tree), True
  return {_SINGLE: tree}, False


def _feature_dims(feature_fn: FeatureFn, example: Array) -> Tuple[Dict[str, int], bool]:
  example = np.asarray(example)
  dims, is_dict = _feature_dims_cached(feature_fn, example.shape, str(example.dtype))
  return dict(dims), is_dict


@functools.lru_cache(maxsize=64)
def _feature_dims_cached(feature_fn: FeatureFn, shape: Tuple[int, ...], dtype: str
                         ) -> Tuple[Tuple[Tuple[str, int], ...], bool]:
  example = jax.ShapeDtypeStruct(shape, np.dtype(dtype))
  order = []

  def traced(x):  # records φ's own layer order: eval_shape returns dicts with sorted keys
    out = feature_fn(x)
    if isinstance(out, Mapping):
      order[:] = list(out)
    return out

  out = jax.eval_shape(traced, example)
  out, is_dict = _as_dict(out)
  if is_dict:
    out = {name: out[name] for name in order}
  dims = []
  for name, s in out.items():
    if len(s.shape) < 2 or s.shape[0] != shape[0]:
      raise ValueError(f"feature_fn: layer {name!r} output shape {s.shape} is not [B, ...] for B={shape[0]}")
    dims.append((name, int(math.prod(s.shape[1:]))))
  return tuple(dims), is_dict


def feature_dims(feature_fn: FeatureFn, example: Array) -> Dict[str, int]:
  """Per-layer feature sizes n of ``feature_fn`` (traced with ``jax.eval_shape``, nothing compiled).

  Args:
    feature_fn: x [B, ...] -> [B, n] or {layer: [B, n_layer]} (or any [B, ...], flattened).
    example: [B, ...] one or more inputs of the right per-example shape.

  Returns:
    {layer: n} in φ's layer order; a bare-array feature function gives {"features": n}.
  """
  return _feature_dims(feature_fn, example)[0]


# ----------------------------------------------------------------------------------------------------
# Directions.


def natural_directions(dim: int, units: Optional[Sequence[int]] = None) -> np.ndarray:
  """Natural-basis directions e_i as rows.

  Args:
    dim: number of units n.
    units: unit indices i (default: all n units).

  Returns:
    [len(units), dim] float32 numpy one-hot rows.
  """
  if dim < 1:
    raise ValueError(f"natural_directions: dim must be >= 1, got {dim}")
  units = np.arange(dim) if units is None else np.asarray(units)
  if units.ndim != 1 or units.size == 0:
    raise ValueError(f"natural_directions: units must be a non-empty 1-D list, got shape {units.shape}")
  if units.min() < 0 or units.max() >= dim:
    raise ValueError(f"natural_directions: units must lie in [0, {dim}), got [{units.min()}, {units.max()}]")
  out = np.zeros((units.size, dim), np.float32)
  out[np.arange(units.size), units] = 1.0
  return out


def _key(key_or_seed: Union[PRNGKey, int]) -> PRNGKey:
  if isinstance(key_or_seed, (int, np.integer)):
    return jax.random.PRNGKey(int(key_or_seed))
  return key_or_seed


def sample_units(key: Union[PRNGKey, int], dim: int, num: int) -> np.ndarray:
  """A seeded subset of ``num`` distinct unit indices out of ``dim`` (all of them, sorted, if num >= dim).

  Returns:
    [min(num, dim)] int32 sorted indices.
  """
  if dim < 1 or num < 1:
    raise ValueError(f"sample_units: dim and num must be >= 1, got dim={dim}, num={num}")
  if num >= dim:
    return np.arange(dim, dtype=np.int32)
  idx = jax.random.choice(_key(key), dim, (num,), replace=False)
  return np.sort(np.asarray(idx, np.int32))


def random_directions(key: Union[PRNGKey, int], num: int, dim: int) -> Array:
  """Random directions v ~ N(0, I_n) normalised to unit length (paper.md A17), reproducible by key/seed.

  Returns:
    [num, dim] float32, every row of L2 norm 1.
  """
  if dim < 1 or num < 1:
    raise ValueError(f"random_directions: num and dim must be >= 1, got num={num}, dim={dim}")
  v = jax.random.normal(_key(key), (num, dim), jnp.float32)
  return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def random_subsets(key: Union[PRNGKey, int], num_images: int, num: int, k: int) -> np.ndarray:
  """``num`` random k-subsets of range(num_images), each without replacement: the chance baseline.

  Returns:
    [num, k] int32 indices.
  """
  if k > num_images:
    raise ValueError(f"random_subsets: k={k} exceeds num_images={num_images}")
  keys = jax.random.split(_key(key), num)
  pick = jax.vmap(lambda kk: jax.random.choice(kk, num_images, (k,), replace=False))
  return np.asarray(pick(keys), np.int32)


# ----------------------------------------------------------------------------------------------------
# Streaming top-k.


def _merge_one(best_s: Array, best_i: Array, new_s: Array, new_i: Array, k: int) -> Tuple[Array, Array]:
  """Top-k of one direction over (running best ++ new batch); the running best comes first so ties keep
  the earlier image, as ``lax.top_k`` on the whole set would."""
  s = jnp.concatenate([best_s, new_s])
  i = jnp.concatenate([best_i, new_i])
  top_s, pos = jax.lax.top_k(s, k)
  return top_s, i[pos]


@functools.lru_cache(maxsize=16)
def _stream_step(feature_fn: FeatureFn, k: int) -> Callable:
  """The jitted step (state, x, num_valid, offset, directions) -> state, cached per (feature_fn, k)."""
  merge = jax.vmap(functools.partial(_merge_one, k=k), in_axes=(0, 0, 1, None))  # over directions

  def step(state, x, num_valid, offset, directions):
    feats, _ = _as_dict(feature_fn(x))
    b = x.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    valid = (rows < num_valid)[:, None]
    new_state = {}
    for name, (best_s, best_i, bad) in state.items():
      acts = feats[name].reshape(b, -1).astype(jnp.float32)
      scores = jnp.matmul(acts, directions[name].T, precision=jax.lax.Precision.HIGHEST)  # [B, D]
      bad = bad + jnp.sum(valid & ~jnp.isfinite(scores), dtype=jnp.int32)  # NaN would rank arbitrarily
      scores = jnp.where(valid, scores, -jnp.inf)
      new_state[name] = merge(best_s, best_i, scores, offset + rows) + (bad,)
    return new_state

  return jax.jit(step)


def _check_images(images: Any, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim < 2:
    raise ValueError(f"{name} must be batched [N, ...], got shape {images.shape}")
  if not np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError(f"{name} contains NaN or inf")
  return images


def top_k_images(feature_fn: FeatureFn, images: Any, directions: Union[Array, Mapping[str, Array]], *,
                 k: int = 10, batch_size: int = 1000) -> Union[TopK, Dict[str, TopK]]:
  """For every direction v, the k images of I maximising ``<φ(x), v>`` (paper Section 3), streamed.

  Args:
    feature_fn: φ, x [B, ...] -> [B, n] activations, or a dict {layer: [B, n_layer]} (see
      ``model_feature_fn``). Reuse one object across calls to reuse the compiled step.
    images: I, [N, ...] (numpy or jax; streamed from host in batches). N >= k.
    directions: [D, n] (one row per direction), or {layer: [D_layer, n_layer]} for a dict-valued φ
      (a subset of its layers).
    k: images kept per direction.
    batch_size: images per streamed batch (the compiled batch shape; the last batch is padded).

  Returns:
    TopK(scores [D, k], indices [D, k]) as numpy, or {layer: TopK} when ``directions`` is a dict.

  Raises:
    ValueError: bad shapes, k, batch size, non-finite images, or a non-finite score.
  """
  images = _check_images(images)
  n = images.shape[0]
  if k < 1 or k > n:
    raise ValueError(f"top_k_images: k must be in [1, {n}] (the number of images), got {k}")
  if batch_size < 1:
    raise ValueError(f"top_k_images: batch_size must be >= 1, got {batch_size}")
  dirs, is_dict = _as_dict(directions)
  dims = feature_dims(feature_fn, images[:1])
  for name, v in dirs.items():
    if name not in dims:
      raise ValueError(f"top_k_images: directions for layer {name!r}, but feature_fn returns {list(dims)}")
    shape = np.shape(v)
    if len(shape) != 2 or shape[1] != dims[name] or shape[0] < 1:
      raise ValueError(f"top_k_images: directions[{name!r}] must be [D, {dims[name]}] with D >= 1, got {shape}")
  dirs = {name: np.asarray(v, np.float32) for name, v in dirs.items()}
  if not all(np.all(np.isfinite(v)) for v in dirs.values()):
    raise ValueError("top_k_images: directions contain NaN or inf")

  bs = min(batch_size, n)
  step = _stream_step(feature_fn, k)
  state = {name: (jnp.full((v.shape[0], k), -jnp.inf, jnp.float32), jnp.full((v.shape[0], k), -1, jnp.int32),
                  jnp.zeros((), jnp.int32)) for name, v in dirs.items()}
  for start in range(0, n, bs):
    xb = images[start:start + bs]
    m = xb.shape[0]
    if m < bs:  # pad the ragged last batch (masked to -inf) so the compiled shape is reused
      xb = np.concatenate([xb, np.zeros((bs - m,) + xb.shape[1:], xb.dtype)], axis=0)
    state = step(state, jnp.asarray(xb), jnp.int32(m), jnp.int32(start), dirs)
  out = {}
  for name in dirs:  # the caller's order (jit returns dicts with sorted keys)
    s, i, bad = (np.asarray(a) for a in state[name])
    if bad or not np.all(np.isfinite(s)):
      raise ValueError(f"top_k_images: feature_fn produced {int(bad)} non-finite scores for layer {name!r}")
    out[name] = TopK(s, i)
  return out if is_dict else out[_SINGLE]


def top_k_from_scores(scores: Array, k: int) -> TopK:
  """One-shot top-k of precomputed scores [N, D] (all images at once), the non-streaming reference.

  Returns:
    TopK(scores [D, k], indices [D, k]) as numpy.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 2 or not 1 <= k <= scores.shape[0]:
    raise ValueError(f"top_k_from_scores: scores must be [N, D] with N >= k={k}, got {scores.shape}")
  s, i = jax.lax.top_k(scores.T, k)
  return TopK(np.asarray(s), np.asarray(i, np.int32))


# ----------------------------------------------------------------------------------------------------
# Coherence and statistics.


# Coherence is computed with numpy: D x k values (plus D x k images) are too small to be worth a compile.


def _label_stats(topk_labels: np.ndarray, num_classes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  counts = np.stack([np.bincount(row, minlength=num_classes) for row in topk_labels]).astype(np.float64)
  p = counts / topk_labels.shape[1]  # [D, C]
  share = p.max(axis=1)
  label = np.argmax(counts, axis=1).astype(np.int32)  # first maximum: the smallest label on ties
  entropy = -np.sum(p * np.log2(np.where(p > 0, p, 1.0)), axis=1)
  return share, label, entropy


def _pixel_similarity(topk_images: np.ndarray) -> np.ndarray:
  x = topk_images.reshape(topk_images.shape[0], topk_images.shape[1], -1).astype(np.float64)  # [D, k, P]
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  gram = np.einsum("dkp,dlp->dkl", x, x)
  k = x.shape[1]
  off_diag = gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)
  return off_diag / (k * (k - 1))


def coherence(topk_labels: Array, *, images: Optional[Array] = None, num_classes: int = 10) -> Coherence:
  """Coherence of each direction's top-k images: majority-label share, label entropy, pixel similarity.

  Args:
    topk_labels: [D, k] int labels of the top-k images of each direction (e.g. ``labels[top.indices]``).
    images: optional [D, k, ...] the top-k images themselves, for the label-free pixel similarity
      (mean cosine similarity over the k(k-1) ordered pairs of distinct images); needs k >= 2.
    num_classes: number of labels C.

  Returns:
    Coherence with [D] numpy fields (pixel_similarity NaN when ``images`` is None).
  """
  topk_labels = np.asarray(topk_labels)
  if topk_labels.ndim != 2 or topk_labels.shape[1] < 1:
    raise ValueError(f"coherence: topk_labels must be [D, k], got shape {topk_labels.shape}")
  if not np.issubdtype(topk_labels.dtype, np.integer):
    raise ValueError(f"coherence: topk_labels must be integers, got {topk_labels.dtype}")
  if topk_labels.size and (topk_labels.min() < 0 or topk_labels.max() >= num_classes):
    raise ValueError(f"coherence: labels must lie in [0, {num_classes}), got "
                     f"[{topk_labels.min()}, {topk_labels.max()}]")
  share, label, entropy = _label_stats(topk_labels, num_classes)
  if images is None:
    sim = np.full(topk_labels.shape[0], np.nan)
  else:
    images = np.asarray(images)
    if images.shape[:2] != topk_labels.shape:
      raise ValueError(f"coherence: images must be [D, k, ...] = {topk_labels.shape} + ..., got {images.shape}")
    if topk_labels.shape[1] < 2:
      raise ValueError("coherence: pixel similarity needs k >= 2")
    sim = _pixel_similarity(images)
  return Coherence(share, label, entropy, sim)


def _magnitude(a: float) -> str:
  d = abs(a - 0.5)
  if d < 0.06:
    return "negligible"
  if d < 0.14:
    return "small"
  if d < 0.21:
    return "medium"
  return "large"


def compare_distributions(a: Array, b: Array, *, higher_is_better: bool = True, num_permutations: int = 10000,
                          seed: int = 0, alpha: float = 0.05, names: Tuple[str, str] = ("natural", "random")
                          ) -> Comparison:
  """Are two samples of a coherence measure distinguishable? Mann-Whitney U + permutation test + effect size.

  The permutation test draws ``num_permutations`` seeded random relabelings of the pooled sample and counts
  those whose |mean difference| is at least the observed one; p = (hits + 1) / (num_permutations + 1).

  Args:
    a, b: 1-D samples (e.g. majority share of natural and of random directions); NaNs are dropped.
    higher_is_better: orientation of the measure, only used to word the verdict.
    num_permutations: random permutations (>= 1).
    seed: numpy RNG seed of the permutations.
    alpha: significance level; "distinguishable" needs both p-values below it.
    names: names of ``a`` and ``b`` used in the verdict.

  Returns:
    Comparison.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  a, b = a[np.isfinite(a)], b[np.isfinite(b)]
  if a.size < 1 or b.size < 1:
    raise ValueError(f"compare_distributions: both samples need a finite value, got sizes {a.size}, {b.size}")
  if num_permutations < 1:
    raise ValueError(f"compare_distributions: num_permutations must be >= 1, got {num_permutations}")
  if not 0 < alpha < 1:
    raise ValueError(f"compare_distributions: alpha must be in (0, 1), got {alpha}")
  n_a, n_b = a.size, b.size
  pooled = np.concatenate([a, b])
  if np.all(pooled == pooled[0]):  # identical constants: no evidence of any difference
    u, p_mw = 0.5 * n_a * n_b, 1.0
  else:
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    u, p_mw = float(res.statistic), float(res.pvalue)
  observed = abs(a.mean() - b.mean())
  rng = np.random.default_rng(seed)
  hits, done, chunk = 0, 0, max(1, min(num_permutations, 2_000_000 // pooled.size))
  while done < num_permutations:
    m = min(chunk, num_permutations - done)
    perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
    diff = np.abs(perm[:, :n_a].mean(axis=1) - perm[:, n_a:].mean(axis=1))
    hits += int(np.sum(diff >= observed - 1e-12 * max(1.0, abs(observed))))
    done += m
  p_perm = (hits + 1) / (num_permutations + 1)
  p_value = max(p_mw, p_perm)
  effect = u / (n_a * n_b)
  magnitude = _magnitude(effect)
  significant = bool(p_value < alpha)
  return Comparison(float(a.mean()), float(b.mean()), int(n_a), int(n_b), u, p_mw, float(p_perm), p_value,
                    p_value, float(effect), magnitude, significant,
                    _verdict(significant, effect, magnitude, higher_is_better, names))


def _verdict(significant: bool, effect: float, magnitude: str, higher_is_better: bool,
             names: Tuple[str, str]) -> str:
  if not significant:
    return "not distinguishable"
  a_better = (effect > 0.5) == higher_is_better
  return f"distinguishable ({magnitude} effect, {names[0] if a_better else names[1]} more coherent)"


def holm_adjust(comparisons: Mapping[str, Comparison], *, alpha: float = 0.05,
                higher_is_better: Optional[Mapping[str, bool]] = None,
                names: Tuple[str, str] = ("natural", "random")) -> Dict[str, Comparison]:
  """Holm's step-down correction of a family of comparisons (e.g. the measures of one layer).

  Holm-adjusted p of the i-th smallest of m p-values: max_{j <= i} min(1, (m - j + 1) p_(j)); the
  family-wise error rate is then at most ``alpha`` (Holm 1979).

  Args:
    comparisons: name -> Comparison (their ``p_value``s form the family).
    alpha: significance level.
    higher_is_better: name -> orientation for the verdict wording (default: ``MEASURES``, else True).
    names: names of the two samples.

  Returns:
    The comparisons with ``p_adjusted``, ``significant`` and ``verdict`` updated.
  """
  orient = dict(MEASURES) if higher_is_better is None else dict(higher_is_better)
  keys = sorted(comparisons, key=lambda n: comparisons[n].p_value)
  m = len(keys)
  out, running = {}, 0.0
  for rank, key in enumerate(keys):
    c = comparisons[key]
    running = max(running, min(1.0, (m - rank) * c.p_value))
    significant = bool(running < alpha)
    out[key] = c._replace(p_adjusted=running, significant=significant,
                          verdict=_verdict(significant, c.effect_a, c.magnitude, orient.get(key, True), names))
  return {key: out[key] for key in comparisons}


# ----------------------------------------------------------------------------------------------------
# The whole analysis.


def _degenerate(top: TopK) -> np.ndarray:
  """[D] True when all k top scores are equal: the ranking of the top-k is then arbitrary (tie order)."""
  return np.asarray(top.scores[:, 0] == top.scores[:, -1])


def analyse(feature_fn: FeatureFn, images: Any, labels: Any, *, key: Union[PRNGKey, int], layers:
            Optional[Sequence[str]] = None, num_directions: int = 200, k: int = 10, num_classes: int = 10,
            batch_size: int = 1000, num_permutations: int = 10000, alpha: float = 0.05,
            exclude_degenerate: bool = True) -> Dict[str, LayerAnalysis]:
  """Natural basis vs random directions for every layer of φ: top-k images, coherence, comparison.

  Per layer: ``num_directions`` natural units (a seeded subset when the layer is wider, else all units)
  and ``num_directions`` random unit-norm Gaussian directions; their top-k images over ``images`` (one
  streamed pass over I for all layers); per-direction coherence; and for each measure the natural vs
  random comparison plus both vs a chance baseline (``num_directions`` random k-subsets of I).

  Args:
    feature_fn: φ, x -> [B, n] or {layer: [B, n_layer]}.
    images: I, [N, ...] held-out images.
    labels: [N] int labels of I in [0, num_classes).
    key: PRNG key or int seed for units, directions and the chance baseline.
    layers: layers of φ to analyse (default: all).
    num_directions: directions of each kind per layer (>= 2).
    k: images per direction (>= 2 for the pixel similarity).
    num_classes: number of labels.
    batch_size: streamed batch size.
    num_permutations: permutations per test.
    alpha: significance level of the verdicts; each layer's measures form one Holm-corrected family (and
      so do its natural-vs-chance and random-vs-chance comparisons).
    exclude_degenerate: drop directions whose k top scores are all equal (dead units) from the statistics.

  Returns:
    {layer: LayerAnalysis}, in the order of φ's layers.
  """
  images = _check_images(images)
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"analyse: labels must be int [{images.shape[0]}], got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"analyse: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  if num_directions < 2:
    raise ValueError(f"analyse: num_directions must be >= 2, got {num_directions}")
  if not 2 <= k <= images.shape[0]:
    raise ValueError(f"analyse: k must be in [2, {images.shape[0]}], got {k}")
  dims, is_dict = _feature_dims(feature_fn, images[:1])
  names = list(dims) if layers is None else list(layers)
  unknown = [n for n in names if n not in dims]
  if unknown or not names:
    raise ValueError(f"analyse: layers {unknown or names} not among feature_fn's layers {list(dims)}")

  key = _key(key)
  key_chance, key_perm, key = jax.random.split(key, 3)
  perm_seeds = np.asarray(jax.random.randint(key_perm, (len(MEASURES),), 0, 2**31 - 3))
  units, rand_dirs, dirs_nat, dirs_rand = {}, {}, {}, {}
  for i, name in enumerate(names):
    k_units, k_dirs = jax.random.split(jax.random.fold_in(key, i))
    units[name] = sample_units(k_units, dims[name], num_directions)
    rand_dirs[name] = random_directions(k_dirs, num_directions, dims[name])
    dirs_nat[name] = natural_directions(dims[name], units[name])
  # One pass over I for natural and random directions of all layers: stack them per layer.
  stacked = {n: np.concatenate([dirs_nat[n], np.asarray(rand_dirs[n])], axis=0) for n in names}
  if is_dict:
    top_all = top_k_images(feature_fn, images, stacked, k=k, batch_size=batch_size)
  else:
    top_all = {_SINGLE: top_k_images(feature_fn, images, stacked[_SINGLE], k=k, batch_size=batch_size)}

  chance_idx = random_subsets(key_chance, images.shape[0], num_directions, k)
  chance = coherence(labels[chance_idx], images=images[chance_idx], num_classes=num_classes)
  results = {}
  for name in names:
    d_nat = len(units[name])
    t = top_all[name]
    top_nat = TopK(t.scores[:d_nat], t.indices[:d_nat])
    top_rand = TopK(t.scores[d_nat:], t.indices[d_nat:])
    coh_nat = coherence(labels[top_nat.indices], images=images[top_nat.indices], num_classes=num_classes)
    coh_rand = coherence(labels[top_rand.indices], images=images[top_rand.indices], num_classes=num_classes)
    valid_nat = ~_degenerate(top_nat) if exclude_degenerate else np.ones(d_nat, bool)
    valid_rand = ~_degenerate(top_rand) if exclude_degenerate else np.ones(len(top_rand.scores), bool)
    comps, vs_chance = {}, {}
    for j, (measure, higher) in enumerate(MEASURES.items()):
      nat_vals = getattr(coh_nat, measure)[valid_nat]
      rand_vals = getattr(coh_rand, measure)[valid_rand]
      chance_vals = getattr(chance, measure)
      seed = int(perm_seeds[j])
      if nat_vals.size == 0:
        logging.warning("units.analyse: layer %s has no non-degenerate natural unit among %d", name, d_nat)
        continue
      comps[measure] = compare_distributions(nat_vals, rand_vals, higher_is_better=higher,
                                             num_permutations=num_permutations, seed=seed, alpha=alpha)
      vs_chance[measure] = {
          "natural": compare_distributions(nat_vals, chance_vals, higher_is_better=higher,
                                           num_permutations=num_permutations, seed=seed + 1, alpha=alpha,
                                           names=("natural", "chance")),
          "random": compare_distributions(rand_vals, chance_vals, higher_is_better=higher,
                                          num_permutations=num_permutations, seed=seed + 2, alpha=alpha,
                                          names=("random", "chance")),
      }
    comps = holm_adjust(comps, alpha=alpha)
    for side in ("natural", "random"):
      adj = holm_adjust({m: d[side] for m, d in vs_chance.items()}, alpha=alpha, names=(side, "chance"))
      for m_name, c in adj.items():
        vs_chance[m_name][side] = c
    results[name] = LayerAnalysis(name, dims[name], units[name], top_nat, top_rand, np.asarray(rand_dirs[name]),
                                  coh_nat, coh_rand, chance, valid_nat, valid_rand, comps, vs_chance)
    logging.info("units: layer %s (n=%d): %d natural (%d degenerate), %d random directions; %s", name, dims[name],
                 d_nat, int((~valid_nat).sum()), len(top_rand.scores),
                 "; ".join(f"{m}: nat {c.mean_a:.3f} vs rand {c.mean_b:.3f}, p={c.p_permutation:.3g}, "
                           f"A={c.effect_a:.2f} -> {c.verdict}" for m, c in comps.items()))
  return results


def summary_rows(results: Mapping[str, LayerAnalysis], *, prefix: Optional[Mapping[str, Any]] = None
                 ) -> List[Dict[str, Any]]:
  """One table row per (layer, measure): means natural / random / chance, p-values, effect A, verdict."""
  rows = []
  for name, r in results.items():
    for measure, c in r.comparisons.items():
      ch = r.vs_chance[measure]
      rows.append({**(prefix or {}), "layer": name, "units n": r.dim, "measure": measure,
                   "natural": c.mean_a, "random": c.mean_b, "chance": ch["natural"].mean_b,
                   "#nat": c.n_a, "#rand": c.n_b, "p (MWU)": c.p_mannwhitney, "p (perm)": c.p_permutation,
                   "p (Holm)": c.p_adjusted, "A nat>rand": c.effect_a, "verdict": c.verdict,
                   "A nat>chance": ch["natural"].effect_a, "A rand>chance": ch["random"].effect_a})
  return rows


def _above_chance(r: LayerAnalysis, side: str) -> bool:
  comps = [d[side] for d in r.vs_chance.values()]
  return bool(comps) and all(c.significant and ((c.effect_a > 0.5) == MEASURES[m])
                             for m, c in zip(r.vs_chance, comps))


def verdict_rows(results: Mapping[str, LayerAnalysis], *, prefix: Optional[Mapping[str, Any]] = None
                 ) -> List[Dict[str, Any]]:
  """One row per layer: the paper's claim measured.

  Columns: majority share natural / random / chance; "above chance" (which of natural and random
  directions are more coherent than chance on every measure, Holm-corrected); "natural vs random" (the
  measures on which they differ, and which side wins, or "not distinguishable"); "claim" --
  "supported" when both beat chance and natural and random are not distinguishable (paper: "the natural
  basis is not better than a random basis"), "natural basis (or random directions) more coherent on m/3
  measures" or "mixed" when they differ, "not coherent" when neither beats chance. "degenerate units":
  sampled natural units whose k top scores are all equal (dead ReLU, saturated sigmoid), excluded.
  """
  rows = []
  for name, r in results.items():
    nat_ok, rand_ok = _above_chance(r, "natural"), _above_chance(r, "random")
    above = {(True, True): "both", (True, False): "natural only", (False, True): "random only",
             (False, False): "neither"}[(nat_ok, rand_ok)]
    winners = {}
    for measure, c in r.comparisons.items():
      if c.significant:
        winners[measure] = "natural" if (c.effect_a > 0.5) == MEASURES[measure] else "random"
    if not winners:
      differ = "not distinguishable"
    else:
      differ = "; ".join(f"{m}: {w}" for m, w in winners.items())
    if not winners:
      claim = "supported" if nat_ok and rand_ok else ("not coherent" if not (nat_ok or rand_ok) else
                                                      "not distinguishable, but only " + above + " above chance")
    elif len(set(winners.values())) == 1:
      side = "natural basis" if "natural" in winners.values() else "random directions"
      claim = f"{side} more coherent on {len(winners)}/{len(r.comparisons)} measures"
    else:
      claim = "mixed"
    maj = r.comparisons.get("majority_share")
    rows.append({**(prefix or {}), "layer": name, "units n": r.dim,
                 "majority natural": maj.mean_a if maj else float("nan"),
                 "majority random": maj.mean_b if maj else float("nan"),
                 "majority chance": r.vs_chance["majority_share"]["natural"].mean_b if maj else float("nan"),
                 "A nat>rand": maj.effect_a if maj else float("nan"),
                 "degenerate units": int((~r.natural_valid).sum()),
                 "above chance": above, "natural vs random": differ, "claim": claim})
  return rows
