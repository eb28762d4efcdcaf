"""Unit analysis (paper Section 3): natural-basis units vs random directions, measured.

Usage::

    phi = models.feature_fn(model)                         # phi(variables, x) -> {"fc1": [B, 128], ...}
    dims = units.feature_dims(phi, variables, images[:1])           # {"conv1": 9216, ..., "fc1": 128}
    dirs = {"fc1": units.natural_directions(dims["fc1"], units.sample_units(0, dims["fc1"], 100))}
    # or: dirs = {"fc1": units.random_directions(1, 100, dims["fc1"])}  # unit-norm Gaussian
    top = units.top_k_images(phi, variables, images, dirs, k=10)    # {"fc1": TopK(scores, indices [100, 10])}
    coh = units.coherence(labels[top["fc1"].indices], images=images[top["fc1"].indices])
    result = units.analyse(phi, variables, images, labels, key=0, num_directions=200, k=10)  # all layers
    result["fc1"].comparisons["majority_share"].verdict            # e.g. "not distinguishable"

The coherence of each direction's top-k images (ranked by ``<φ(x), v>``, Figures 1-2) is measured and
compared, natural vs random and against chance (notes/units.md). A feature function ``phi(params, x) ->
[B, ...]`` or ``{layer: [B, ...]}`` is a static jit argument: reuse one hashable object.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax.types import Array, PRNGKey

FeatureFn = Callable[[Any, Array], Union[Array, Mapping[str, Array]]]

# Measure name -> True when larger values mean more coherent.
MEASURES: Dict[str, bool] = {
    "majority_share": True,      # share of the most frequent label among the top-k, in [1/C, 1]
    "label_entropy": False,      # entropy of the top-k labels in bits, in [0, log2(min(k, C))]
    "pixel_similarity": True,    # mean pairwise cosine similarity of the top-k images (label-free)
}

_SINGLE = "features"  # layer name used when a feature function returns a bare array


class TopK(NamedTuple):
  """Per direction, the k images of I with the largest ``<φ(x), v>``: scores [D, k] float32 (descending),
  indices [D, k] int32 into I (ties keep the earlier image)."""
  scores: Array
  indices: Array


class Coherence(NamedTuple):
  """Per-direction coherence of top-k images, fields [D] numpy: share of the most frequent label, that label
  (the smallest on ties), label entropy in bits, mean pairwise cosine similarity of the flattened images
  (NaN without images)."""
  majority_share: np.ndarray
  majority_label: np.ndarray
  label_entropy: np.ndarray
  pixel_similarity: np.ndarray


class Comparison(NamedTuple):
  """Two-sample comparison of a coherence measure, sample ``a`` (natural) vs ``b`` (random): means, sizes,
  Mann-Whitney U of ``a`` and its two-sided p-value (scipy), the two-sided permutation p-value of
  |mean_a - mean_b|; ``p_value`` = the larger; ``p_adjusted`` after Holm's correction over a family;
  ``effect_a``: Vargha-Delaney A = U / (n_a n_b) (0.5: none) and its ``magnitude`` (|A - 0.5| < .06
  negligible, < .14 small, < .21 medium, else large); ``significant``: p_adjusted < alpha; ``verdict``."""
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
  """Everything ``analyse`` measured for one layer: its name and width n; the natural units [D_nat];
  TopK of the natural and random directions; the random directions [D_rand, n]; Coherence of the natural,
  random and chance (random k-subsets of I) top-k sets; ``*_valid`` [D] bool, False for degenerate
  directions (all k top scores equal, e.g. a dead ReLU unit); ``comparisons``: measure -> Comparison
  natural vs random; ``vs_chance``: measure -> {"natural": ..., "random": ...} Comparisons vs chance."""
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


def _as_dict(tree: Any) -> Tuple[Dict[str, Any], bool]:
  return (dict(tree), True) if isinstance(tree, Mapping) else ({_SINGLE: tree}, False)


def feature_dims(feature_fn: FeatureFn, params: Any, example: Array) -> Dict[str, int]:
  """Per-layer feature sizes n of ``feature_fn(params, ·)`` on ``example`` [B, ...] (``jax.eval_shape``):
  {layer: n} in φ's layer order; a bare-array feature function gives {"features": n}."""
  order = []

  def traced(x):  # records φ's own layer order: eval_shape returns dicts with sorted keys
    out = feature_fn(params, x)
    order[:] = list(out) if isinstance(out, Mapping) else [_SINGLE]
    return out

  b, out = np.shape(example)[0], _as_dict(jax.eval_shape(traced, jnp.asarray(example)))[0]
  for name, s in out.items():
    if len(s.shape) < 2 or s.shape[0] != b:
      raise ValueError(f"feature_fn: layer {name!r} output shape {s.shape} is not [B, ...] for B={b}")
  return {name: int(math.prod(out[name].shape[1:])) for name in order}


def natural_directions(dim: int, units: Optional[Sequence[int]] = None) -> np.ndarray:
  """Natural-basis directions e_i as rows, [len(units), dim] float32 one-hot (default: all ``dim`` units)."""
  units = np.arange(dim) if units is None else np.asarray(units)
  if units.size and not np.issubdtype(units.dtype, np.integer):
    raise ValueError(f"natural_directions: units must be integer indices, got dtype {units.dtype}")
  if dim < 1 or units.ndim != 1 or units.size == 0 or units.min() < 0 or units.max() >= dim:
    raise ValueError(f"natural_directions: dim must be >= 1 and units must lie in [0, {dim}), a non-empty "
                     f"1-D list; got dim={dim}, units={units}")
  out = np.zeros((units.size, dim), np.float32)
  out[np.arange(units.size), units] = 1.0
  return out


def _key(key: Union[PRNGKey, int]) -> PRNGKey:
  return jax.random.PRNGKey(int(key)) if isinstance(key, (int, np.integer)) else key


def sample_units(key: Union[PRNGKey, int], dim: int, num: int) -> np.ndarray:
  """A seeded subset of ``num`` distinct unit indices out of ``dim``, [min(num, dim)] int32 sorted."""
  if dim < 1 or num < 1:
    raise ValueError(f"sample_units: dim and num must be >= 1, got dim={dim}, num={num}")
  if num >= dim:
    return np.arange(dim, dtype=np.int32)
  return np.sort(np.asarray(jax.random.choice(_key(key), dim, (num,), replace=False), np.int32))


def random_directions(key: Union[PRNGKey, int], num: int, dim: int) -> Array:
  """[num, dim] float32 random directions v ~ N(0, I_n), normalised to unit length (paper.md A17)."""
  if dim < 1 or num < 1:
    raise ValueError(f"random_directions: num and dim must be >= 1, got num={num}, dim={dim}")
  v = jax.random.normal(_key(key), (num, dim), jnp.float32)
  return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def random_subsets(key: Union[PRNGKey, int], num_images: int, num: int, k: int) -> np.ndarray:
  """[num, k] int32: ``num`` random k-subsets of range(num_images) (the chance baseline)."""
  if k > num_images:
    raise ValueError(f"random_subsets: k={k} exceeds num_images={num_images}")
  pick = jax.vmap(lambda kk: jax.random.choice(kk, num_images, (k,), replace=False))
  return np.asarray(pick(jax.random.split(_key(key), num)), np.int32)


@functools.partial(jax.jit, static_argnames=("feature_fn", "k"))
def _stream_step(feature_fn: FeatureFn, k: int, params, state, x, num_valid, offset, directions):
  """Merges the scores of batch ``x`` (its first ``num_valid`` rows) into ``state`` {layer: (s, i, #bad)}."""
  def merge_one(best_s, best_i, new_s, new_i):  # running best first: ties keep the earlier image
    top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, new_s]), k)
    return top_s, jnp.concatenate([best_i, new_i])[pos]

  merge = jax.vmap(merge_one, in_axes=(0, 0, 1, None))  # over directions
  feats, _ = _as_dict(feature_fn(params, x))
  b, rows = x.shape[0], jnp.arange(x.shape[0], dtype=jnp.int32)
  valid = (rows < num_valid)[:, None]
  new_state = {}
  for name, (best_s, best_i, bad) in state.items():
    acts = feats[name].reshape(b, -1).astype(jnp.float32)
    scores = jnp.matmul(acts, directions[name].T, precision=jax.lax.Precision.HIGHEST)  # [B, D]
    bad = bad + jnp.sum(valid & ~jnp.isfinite(scores), dtype=jnp.int32)  # NaN would rank arbitrarily
    new_state[name] = merge(best_s, best_i, jnp.where(valid, scores, -jnp.inf), offset + rows) + (bad,)
  return new_state


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim < 2:
    raise ValueError(f"images must be batched [N, ...], got shape {images.shape}")
  images = images if np.issubdtype(images.dtype, np.floating) else images.astype(np.float32)
  if not np.all(np.isfinite(images)):
    raise ValueError("images contains NaN or inf")
  return images


def top_k_images(feature_fn: FeatureFn, params: Any, images: Any,
                 directions: Union[Array, Mapping[str, Array]], *, k: int = 10,
                 batch_size: int = 1000) -> Union[TopK, Dict[str, TopK]]:
  """For every direction v, the k images of I maximising ``<φ(params, x), v>`` (paper Section 3), streamed.
  ``feature_fn``: φ(params, x [B, ...]) -> [B, n] or {layer: [B, n_layer]} (flattened), params traced;
  ``images``: I [N, ...], N >= k, streamed in batches of ``batch_size`` into a running ``lax.top_k``
  (memory O(B * (n + D) + D * k)); ``directions``: [D, n], or {layer: [D_layer, n_layer]} for some layers.
  Returns numpy TopK(scores [D, k], indices [D, k]), or {layer: TopK} for dict ``directions``."""
  images = _check_images(images)
  n = images.shape[0]
  if not 1 <= k <= n or batch_size < 1:
    raise ValueError(f"top_k_images: k must be in [1, {n}] (the number of images) and batch_size >= 1, got "
                     f"{k}, {batch_size}")
  dirs, is_dict = _as_dict(directions)
  dims = feature_dims(feature_fn, params, images[:1])
  for name, v in dirs.items():
    if name not in dims or np.ndim(v) != 2 or np.shape(v)[1] != dims[name] or np.shape(v)[0] < 1:
      raise ValueError(f"top_k_images: directions for layer {name!r} must be [D, {dims.get(name)}] with "
                       f"D >= 1, got {np.shape(v)} (feature_fn's layers: {list(dims)})")
  dirs = {name: np.asarray(v, np.float32) for name, v in dirs.items()}
  if not all(np.all(np.isfinite(v)) for v in dirs.values()):
    raise ValueError("top_k_images: directions contain NaN or inf")
  bs = min(batch_size, n)
  state = {name: (jnp.full((v.shape[0], k), -jnp.inf, jnp.float32), jnp.full((v.shape[0], k), -1, jnp.int32),
                  jnp.zeros((), jnp.int32)) for name, v in dirs.items()}
  for start in range(0, n, bs):
    xb, m = images[start:start + bs], min(bs, n - start)
    if m < bs:  # pad the ragged last batch (masked to -inf) so the compiled shape is reused
      xb = np.concatenate([xb, np.zeros((bs - m,) + xb.shape[1:], xb.dtype)], axis=0)
    state = _stream_step(feature_fn, k, params, state, jnp.asarray(xb), jnp.int32(m), jnp.int32(start), dirs)
  out = {}
  for name in dirs:  # the caller's order (jit returns dicts with sorted keys)
    s, i, bad = (np.asarray(a) for a in state[name])
    if bad or not np.all(np.isfinite(s)):
      raise ValueError(f"top_k_images: feature_fn produced {int(bad)} non-finite scores for layer {name!r}")
    out[name] = TopK(s, i)
  return out if is_dict else out[_SINGLE]


# ----------------------------------------------------------------------------------------------------
# Coherence (numpy: D x k values are too small to be worth a compile) and statistics.


def coherence(topk_labels: Array, *, images: Optional[Array] = None, num_classes: int = 10) -> Coherence:
  """Coherence of each direction's top-k images from their labels ``topk_labels`` [D, k] in [0, num_classes)
  (e.g. ``labels[top.indices]``) and optionally the images [D, k, ...] (pixel similarity: mean cosine
  over the k(k-1) ordered pairs of distinct images, k >= 2; NaN without them). Fields [D] numpy."""
  topk_labels = np.asarray(topk_labels)
  if topk_labels.ndim != 2 or topk_labels.shape[1] < 1 or not np.issubdtype(topk_labels.dtype, np.integer):
    raise ValueError(f"coherence: topk_labels must be int [D, k], got {topk_labels.dtype}{topk_labels.shape}")
  if topk_labels.size and (topk_labels.min() < 0 or topk_labels.max() >= num_classes):
    raise ValueError(f"coherence: labels must lie in [0, {num_classes}), got "
                     f"[{topk_labels.min()}, {topk_labels.max()}]")
  counts = np.stack([np.bincount(row, minlength=num_classes) for row in topk_labels]).astype(np.float64)
  p = counts / topk_labels.shape[1]  # [D, C]
  label = np.argmax(counts, axis=1).astype(np.int32)  # first maximum: the smallest label on ties
  entropy = -np.sum(p * np.log2(np.where(p > 0, p, 1.0)), axis=1)
  sim = np.full(topk_labels.shape[0], np.nan)
  if images is not None:
    images = np.asarray(images)
    if images.shape[:2] != topk_labels.shape or topk_labels.shape[1] < 2:
      raise ValueError(f"coherence: images must be [D, k, ...] = {topk_labels.shape} + ... with k >= 2 "
                       f"(pixel similarity), got {images.shape}")
    x = images.reshape(images.shape[0], images.shape[1], -1).astype(np.float64)  # [D, k, P]
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    gram, k = np.einsum("dkp,dlp->dkl", x, x), x.shape[1]
    sim = (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (k * (k - 1))
  return Coherence(p.max(axis=1), label, entropy, sim)


def _permutation_p(a: np.ndarray, b: np.ndarray, num_permutations: int, seed: int) -> float:
  """(hits + 1) / (P + 1): seeded random relabelings of the pooled sample whose |mean difference| is at
  least the observed one."""
  pooled, observed = np.concatenate([a, b]), abs(a.mean() - b.mean())
  rng = np.random.default_rng(seed)
  hits, done, chunk = 0, 0, max(1, min(num_permutations, 2_000_000 // pooled.size))
  while done < num_permutations:
    m = min(chunk, num_permutations - done)
    perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
    diff = np.abs(perm[:, :a.size].mean(axis=1) - perm[:, a.size:].mean(axis=1))
    hits += int(np.sum(diff >= observed - 1e-12 * max(1.0, abs(observed))))
    done += m
  return (hits + 1) / (num_permutations + 1)


def compare_distributions(a: Array, b: Array, *, higher_is_better: bool = True, num_permutations: int = 10000,
                          seed: int = 0, alpha: float = 0.05, names: Tuple[str, str] = ("natural", "random")
                          ) -> Comparison:
  """Are two samples of a coherence measure distinguishable? Mann-Whitney U + permutation test + effect size.
  ``a``, ``b``: 1-D samples (NaNs dropped); ``higher_is_better`` and ``names`` (of a and b) only word the
  verdict; ``num_permutations`` (>= 1) seeded by ``seed``; "distinguishable" needs both p-values below
  ``alpha``."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  a, b = (np.asarray(v, np.float64).ravel() for v in (a, b))
  a, b = a[np.isfinite(a)], b[np.isfinite(b)]
  if a.size < 1 or b.size < 1 or num_permutations < 1 or not 0 < alpha < 1:
    raise ValueError(f"compare_distributions: need a finite value in both samples, num_permutations >= 1 and "
                     f"alpha in (0, 1); got sizes {a.size}, {b.size}, {num_permutations}, {alpha}")
  if np.all(np.concatenate([a, b]) == a[0]):  # identical constants: no evidence of any difference
    u, p_mw = 0.5 * a.size * b.size, 1.0
  else:
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    u, p_mw = float(res.statistic), float(res.pvalue)
  p_perm = _permutation_p(a, b, num_permutations, seed)
  p_value, effect = max(p_mw, p_perm), u / (a.size * b.size)
  sizes = ("negligible", "small", "medium", "large")  # Vargha & Delaney 2000
  magnitude = sizes[int(np.searchsorted([0.06, 0.14, 0.21], abs(effect - 0.5), side="right"))]
  significant = bool(p_value < alpha)
  return Comparison(float(a.mean()), float(b.mean()), int(a.size), int(b.size), u, p_mw, float(p_perm),
                    p_value, p_value, float(effect), magnitude, significant,
                    _verdict(significant, effect, magnitude, higher_is_better, names))


def _verdict(significant: bool, effect: float, magnitude: str, higher_is_better: bool,
             names: Tuple[str, str]) -> str:
  winner = names[0] if (effect > 0.5) == higher_is_better else names[1]
  return (f"distinguishable ({magnitude} effect, {winner} more coherent)" if significant
          else "not distinguishable")


def holm_adjust(comparisons: Mapping[str, Comparison], *, alpha: float = 0.05,
                names: Tuple[str, str] = ("natural", "random")) -> Dict[str, Comparison]:
  """Holm's step-down correction of a family of comparisons (measure name -> Comparison; Holm 1979).
  The i-th smallest of m p-values gets max_{j <= i} min(1, (m - j + 1) p_(j)); ``p_adjusted``,
  ``significant`` and ``verdict`` (orientation from ``MEASURES``, ``names`` of the two samples) updated."""
  keys = sorted(comparisons, key=lambda n: comparisons[n].p_value)
  out, running = {}, 0.0
  for rank, key in enumerate(keys):
    c = comparisons[key]
    running = max(running, min(1.0, (len(keys) - rank) * c.p_value))
    significant = bool(running < alpha)
    verdict = _verdict(significant, c.effect_a, c.magnitude, MEASURES.get(key, True), names)
    out[key] = c._replace(p_adjusted=running, significant=significant, verdict=verdict)
  return {key: out[key] for key in comparisons}


# ----------------------------------------------------------------------------------------------------
# The whole analysis.


def _compare_layer(name: str, coh_nat: Coherence, coh_rand: Coherence, chance: Coherence,
                   valid_nat: np.ndarray, valid_rand: np.ndarray, perm_seeds: np.ndarray,
                   num_permutations: int, alpha: float):
  """(comparisons, vs_chance) of one layer, each family Holm-corrected (see ``LayerAnalysis``)."""
  comps, vs_chance = {}, {}
  for j, (measure, higher) in enumerate(MEASURES.items()):
    nat, rand = getattr(coh_nat, measure)[valid_nat], getattr(coh_rand, measure)[valid_rand]
    if nat.size == 0:
      logging.warning("units.analyse: layer %s has no non-degenerate natural unit", name)
      continue
    kw = dict(higher_is_better=higher, num_permutations=num_permutations, alpha=alpha)
    seed = int(perm_seeds[j])
    comps[measure] = compare_distributions(nat, rand, seed=seed, **kw)
    vs_chance[measure] = {
        side: compare_distributions(vals, getattr(chance, measure), seed=seed + 1 + i, names=(side, "chance"),
                                    **kw)
        for i, (side, vals) in enumerate((("natural", nat), ("random", rand)))}
  for side in ("natural", "random"):
    for measure, c in holm_adjust({m: d[side] for m, d in vs_chance.items()}, alpha=alpha,
                                  names=(side, "chance")).items():
      vs_chance[measure][side] = c
  return holm_adjust(comps, alpha=alpha), vs_chance


def analyse(feature_fn: FeatureFn, params: Any, images: Any, labels: Any, *, key: Union[PRNGKey, int],
            layers: Optional[Sequence[str]] = None, num_directions: int = 200, k: int = 10,
            num_classes: int = 10, batch_size: int = 1000, num_permutations: int = 10000, alpha: float = 0.05
            ) -> Dict[str, LayerAnalysis]:
  """Natural basis vs random directions for every layer of φ: top-k images, coherence, comparison.
  Per layer of ``layers`` (default: all, in φ's order): ``num_directions`` (>= 2) natural units (a subset
  seeded by ``key`` when the layer is wider) and as many random unit-norm Gaussian directions; their top-k
  (k >= 2) over ``images`` I [N, ...] (one streamed pass); coherence with ``labels`` [N]; per measure,
  natural vs random and both vs chance (``num_directions`` random k-subsets of I), each family of a
  layer Holm-corrected; degenerate directions (all k top scores equal) left out.
  Returns {layer: LayerAnalysis}."""
  images = _check_images(images)
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"analyse: labels must be int [{images.shape[0]}], got {labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"analyse: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  if num_directions < 2 or not 2 <= k <= images.shape[0]:
    raise ValueError(f"analyse: need num_directions >= 2 and k in [2, {images.shape[0]}], got "
                     f"{num_directions}, {k}")
  dims = feature_dims(feature_fn, params, images[:1])
  names = list(dims) if layers is None else list(layers)
  if not names or any(n not in dims for n in names):
    raise ValueError(f"analyse: layers {[n for n in names if n not in dims] or names} not among feature_fn's "
                     f"layers {list(dims)}")
  key_chance, key_perm, key = jax.random.split(_key(key), 3)
  perm_seeds = np.asarray(jax.random.randint(key_perm, (len(MEASURES),), 0, 2**31 - 3))
  units, rand_dirs = {}, {}
  for i, name in enumerate(names):
    k_units, k_dirs = jax.random.split(jax.random.fold_in(key, i))
    units[name] = sample_units(k_units, dims[name], num_directions)
    rand_dirs[name] = np.asarray(random_directions(k_dirs, num_directions, dims[name]))
  # One pass over I for natural and random directions of all layers: stacked per layer.
  stacked = {n: np.concatenate([natural_directions(dims[n], units[n]), rand_dirs[n]]) for n in names}
  top_all = top_k_images(feature_fn, params, images, stacked, k=k, batch_size=batch_size)
  chance_idx = random_subsets(key_chance, images.shape[0], num_directions, k)
  chance = coherence(labels[chance_idx], images=images[chance_idx], num_classes=num_classes)
  results = {}
  for name in names:
    d_nat, t = len(units[name]), top_all[name]
    tops = TopK(t.scores[:d_nat], t.indices[:d_nat]), TopK(t.scores[d_nat:], t.indices[d_nat:])
    cohs = [coherence(labels[tp.indices], images=images[tp.indices], num_classes=num_classes) for tp in tops]
    valid = [np.asarray(tp.scores[:, 0] != tp.scores[:, -1]) for tp in tops]  # not degenerate
    comps, vs_chance = _compare_layer(name, *cohs, chance, *valid, perm_seeds, num_permutations, alpha)
    results[name] = LayerAnalysis(name, dims[name], units[name], *tops, rand_dirs[name], *cohs, chance,
                                  *valid, comps, vs_chance)
    logging.info("units: layer %s (n=%d): %d natural (%d degenerate), %d random directions; %s", name,
                 dims[name], d_nat, int((~valid[0]).sum()), len(tops[1].scores),
                 "; ".join(f"{m}: nat {c.mean_a:.3f} vs rand {c.mean_b:.3f}, A={c.effect_a:.2f} -> "
                           f"{c.verdict}" for m, c in comps.items()))
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
  """One row per layer, the paper's claim measured: majority share natural / random / chance; "above
  chance" (which kinds of direction beat chance on every measure, Holm-corrected); "natural vs random"
  (the measures on which they differ and the winner, or "not distinguishable"); "claim": "supported" when
  both beat chance and are not distinguishable (paper: "the natural basis is not better than a random
  basis"), "<side> more coherent on m/3 measures" or "mixed" when they differ, "not coherent" when neither
  beats chance; "degenerate units": sampled natural units with all k top scores equal (excluded)."""
  rows = []
  for name, r in results.items():
    nat_ok, rand_ok = _above_chance(r, "natural"), _above_chance(r, "random")
    above = {(True, True): "both", (True, False): "natural only", (False, True): "random only",
             (False, False): "neither"}[(nat_ok, rand_ok)]
    winners = {m: "natural" if (c.effect_a > 0.5) == MEASURES[m] else "random"
               for m, c in r.comparisons.items() if c.significant}
    differ = "; ".join(f"{m}: {w}" for m, w in winners.items()) or "not distinguishable"
    if not winners:
      claim = "supported" if nat_ok and rand_ok else ("not coherent" if not (nat_ok or rand_ok) else
                                                      f"not distinguishable, but only {above} above chance")
    elif len(set(winners.values())) == 1:
      side = "natural basis" if "natural" in winners.values() else "random directions"
      claim = f"{side} more coherent on {len(winners)}/{len(r.comparisons)} measures"
    else:
      claim = "mixed"
    c = r.comparisons.get("majority_share")
    maj = ((c.mean_a, c.mean_b, r.vs_chance["majority_share"]["natural"].mean_b, c.effect_a) if c
           else [math.nan] * 4)
    rows.append({**(prefix or {}), "layer": name, "units n": r.dim,
                 **dict(zip(("majority natural", "majority random", "majority chance", "A nat>rand"), maj)),
                 "degenerate units": int((~r.natural_valid).sum()),
                 "above chance": above, "natural vs random": differ, "claim": claim})
  return rows


# ----------------------------------------------------------------------------------------------------
# The experiment of scripts/unit_analysis.py.

_METHOD_TEXT = (
    "Held-out set I: the first {n} MNIST test images. Per layer: {d} natural-basis units (a seeded subset "
    "when the layer is wider) and {d} random unit-norm Gaussian directions; top-{k} images by <phi(x), v>. "
    "Coherence of each top-{k}: majority-label share (higher = more coherent), label entropy in bits "
    "(lower), mean pairwise pixel cosine similarity (label-free, higher). Chance: random {k}-subsets of I. "
    "'Distinguishable': two-sided Mann-Whitney U and permutation ({p} permutations) p-values both below "
    "{alpha}, Holm-corrected over the layer's 3 measures. Effect size: Vargha-Delaney A = P(natural > "
    "random) (0.5 = none; |A-0.5| < .06 negligible, < .14 small, < .21 medium, else large). Degenerate "
    "directions (all top-k scores equal, e.g. dead ReLU units) are excluded. 'Supported': both kinds beat "
    "chance on every measure and are not distinguishable (the paper: 'the natural basis is not better than "
    "a random basis').")


def _check_config(config) -> None:
  from intriguing_jax import train  # pylint: disable=g-import-not-at-top
  c = config
  if (not c.models or c.num_directions < 2 or c.k < 2 or not 1 <= c.num_show <= c.num_directions
      or min(c.num_images, c.num_train) < 0 or c.num_permutations < 1 or not 0 < c.alpha < 1):
    raise ValueError(f"unit_analysis: need models non-empty, num_directions >= 2, k >= 2, 1 <= num_show <= "
                     f"num_directions, num_images, num_train >= 0, num_permutations >= 1, 0 < alpha < 1; "
                     f"got {list(c.models)}, {c.num_directions}, {c.k}, {c.num_show}, {c.num_images}, "
                     f"{c.num_train}, {c.num_permutations}, {c.alpha}")
  for name in c.models:
    train.recipe(name)  # raises for an unknown name
    if c.run_dirs.get(name) and not os.path.isfile(os.path.join(c.run_dirs[name], "result.json")):
      raise ValueError(f"unit_analysis: config.run_dirs.{name}={c.run_dirs[name]!r} is not a finished run "
                       "(no result.json)")


def _figure(title: str, r: LayerAnalysis, images: np.ndarray, labels: np.ndarray, num_show: int,
            rng: np.random.Generator, path: str) -> None:
  """Figure 1 | Figure 2 analogue: ``num_show`` random non-degenerate natural rows (left) and random rows."""
  from intriguing_jax import plotting  # pylint: disable=g-import-not-at-top
  k = r.natural.indices.shape[1]
  sides = [(rng.permutation(np.flatnonzero(valid))[:num_show], top, coh, ids) for valid, top, coh, ids in
           ((r.natural_valid, r.natural, r.natural_coherence, r.units),
            (r.random_valid, r.random, r.random_coherence, None))]
  n_rows = max(len(s[0]) for s in sides)
  grid = np.full((n_rows, 2 * k + 1) + images.shape[1:], np.nan, np.float32)  # NaN cells are drawn blank
  titles, row_labels = [""] * (n_rows * (2 * k + 1)), [""] * n_rows
  for side, (rows, top, coh, ids) in enumerate(sides):
    for row, d in enumerate(rows):
      col = row * (2 * k + 1) + side * (k + 1)
      grid[row, side * (k + 1):side * (k + 1) + k] = images[top.indices[d]]
      titles[col:col + k] = [str(l) for l in labels[top.indices[d]]]
      ident = f"unit {ids[d]}" if ids is not None else f"dir {d}"
      row_labels[row] += ("\n" if side and row_labels[row] else "") + f"{ident}: {coh.majority_share[d]:.1f}"
  plotting.save_image_grid(grid, path, titles=titles, row_labels=row_labels, suptitle=(
      f"{title}: top-{k} test images. Left: natural basis e_i (Fig. 1). Right: random directions (Fig. 2). "
      "Titles: labels; row labels: majority share."))


def _analyse_model(name: str, model, variables, test: Tuple[np.ndarray, np.ndarray], config, key,
                   workdir: str, rep, rng: np.random.Generator) -> Dict[str, Any]:
  """Analyses one trained model, draws its figures into ``rep``; returns its part of results.json."""
  from intriguing_jax import metrics, models, plotting  # pylint: disable=g-import-not-at-top
  phi = models.feature_fn(model)
  available = list(feature_dims(phi, variables, test[0][:1]))
  layers = [l for l in config.layers if l in available] if config.layers else available
  if not layers:
    raise ValueError(f"unit_analysis: config.layers={list(config.layers)}: none is a layer of {name} "
                     f"({available})")
  start = time.perf_counter()
  res = analyse(phi, variables, *test, key=key, layers=layers, num_directions=config.num_directions,
                k=config.k, batch_size=config.batch_size, num_permutations=config.num_permutations,
                alpha=config.alpha)
  out = {"test_error": metrics.error_rate(model.apply, variables, *test),
         "analysis_seconds": time.perf_counter() - start, "layers": {},
         "summary": summary_rows(res, prefix={"model": name}),
         "claim": verdict_rows(res, prefix={"model": name})}
  for layer, r in res.items():
    safe, title = f"{name}_{layer}".replace("/", "_"), f"{name} / {layer}"
    _figure(title, r, *test, config.num_show, rng, os.path.join(workdir, f"fig_{safe}.png"))
    cohs = {"natural": r.natural_coherence, "random": r.random_coherence, "chance": r.chance_coherence}
    valid = {"natural": r.natural_valid, "random": r.random_valid, "chance": Ellipsis}
    plotting.save_histograms({s: c.majority_share[valid[s]] for s, c in cohs.items()},
                             os.path.join(workdir, f"hist_{safe}.png"), bins=10, title=title,
                             xlabel=f"majority-label share of the top-{config.k}")
    rep.image(f"fig_{safe}.png", caption=f"{title}: natural units (left), random directions (right)")
    rep.image(f"hist_{safe}.png", caption=f"{title}: majority-label share per direction")
    out["layers"][layer] = {
        "dim": r.dim, "units": r.units.tolist(), "natural_valid": r.natural_valid.tolist(),
        "random_valid": r.random_valid.tolist(),
        **{f"{s}_{m}": np.asarray(getattr(coh, m)).tolist() for s, coh in cohs.items() for m in MEASURES},
        "comparisons": {m: c._asdict() for m, c in r.comparisons.items()},
        "vs_chance": {m: {s: c._asdict() for s, c in d.items()} for m, d in r.vs_chance.items()}}
  logging.info("unit_analysis: %s: test error %.4f, %d layers in %.1f s", name, out["test_error"], len(res),
               out["analysis_seconds"])
  return out


def run_experiment(config, workdir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Figures 1-2 and the measured claim for each of ``config.models`` (``configs/unit_analysis.py``).

  Writes ``<workdir>/report.md`` + ``report.html`` (claim per layer, coherence table, figures),
  ``results.json`` (returned), ``fig_<model>_<layer>.png`` and ``hist_<model>_<layer>.png``."""
  from intriguing_jax import checkpoint, data, models, report, train  # pylint: disable=g-import-not-at-top
  _check_config(config)
  start = time.perf_counter()
  test = tuple(a[:config.num_images or None] for a in data.load_mnist("test", data_dir))
  train_x, train_y = (a[:config.num_train or None] for a in data.load_mnist("train", data_dir))
  rep = report.Report("Unit analysis (paper Section 3): natural basis vs random directions")
  rep.paragraph(_METHOD_TEXT.format(n=test[0].shape[0], d=config.num_directions, k=config.k,
                                    p=config.num_permutations, alpha=config.alpha))
  rep.heading("Figures 1-2 analogues")
  results, rng = {"config": config.to_dict(), "models": {}}, np.random.default_rng(config.seed)
  for i, name in enumerate(config.models):
    if config.run_dirs.get(name):  # a finished run, loaded as is
      rec = train.recipe(name)
      model = models.get_model(rec["model"], **rec.get("model_kwargs", {}))
      variables = train.load_run(config.run_dirs[name], model)[0]
    else:
      model, variables = train.get_or_train(
          name, train_x, train_y, workdir=config.models_dir or os.path.join(workdir, "models"),
          seed=config.train_seed, epochs=config.epochs.get(name) or None, eval_data=test)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), i)
    results["models"][name] = _analyse_model(name, model, variables, test, config, key, workdir, rep, rng)
  for part, heading in (("claim", "The claim, measured: one row per layer"),
                        ("summary", "Coherence: natural vs random vs chance")):
    results[part] = [row for m in results["models"].values() for row in m[part]]
    rep.heading(heading)
    rep.table(results[part], floatfmt=".3g")
  results["total_seconds"] = time.perf_counter() - start
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results)
  md_path, _ = rep.write(workdir, "report")
  logging.info("unit_analysis: wrote %s in %.1f s", md_path, results["total_seconds"])
  return results
