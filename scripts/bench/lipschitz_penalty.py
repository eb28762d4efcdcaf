r"""Benchmark: the time of a training step with and without the exact Lipschitz penalty.

Commands (CPU, 2 shared cores, ~1 min each; figures in notes/lipschitz.md)::

    python scripts/bench/lipschitz_penalty.py                 # the MNIST ConvNet
    python scripts/bench/lipschitz_penalty.py --config=intriguing_jax/configs/bench_lipschitz.py:fc

Trains ``config.model`` through the one driver (``train.train_model``) on synthetic MNIST-sized data, once
per penalty form and once without (``lipschitz_penalty="none"``), ``repeats + 1`` epochs of ``steps`` steps.
Prints per form the median steady-state step time (epochs after the first, which compiles) and its ratio
to the plain step. Goal (issue 19): the exact penalty at most 2x a plain step on the ConvNet. Then the
gradient of Σ_l σ_l alone, through ``spectral.top_singular_value`` (eigh of the smaller Gram matrix,
Hellmann-Feynman) and through ``jnp.linalg.svd`` (the same σ; their relative difference is printed).
With ``--workdir`` the figures also go to ``<workdir>/bench_lipschitz.json``.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import cli
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import spectral
from intriguing_jax import train

FLAGS = cli.define_flags("bench_lipschitz", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_lipschitz.json.")


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  x, y = data.synthetic_mnist(c.steps * c.batch_size, seed=0)
  model = models.get_model(c.model, **c.model_kwargs)
  rows = {}
  for form in ("none",) + tuple(c.forms):
    config = train.TrainConfig(epochs=c.repeats + 1, batch_size=c.batch_size, lipschitz_penalty=form,
                               lipschitz_strength=0.0 if form == "none" else c.strength)
    history = train.train_model(model, x, y, config, seed=0).history
    step_ms = 1e3 * float(np.median([h["seconds"] for h in history[1:]])) / c.steps
    rows[form] = {"step_ms": step_ms, "first_epoch_s": history[0]["seconds"]}
  plain = rows["none"]["step_ms"]
  print(f"{c.model} {dict(c.model_kwargs)}, batch {c.batch_size}, {c.steps} steps x {c.repeats} epochs")
  print(f"{'penalty':<10}{'step ms':>10}{'vs plain':>10}{'1st epoch s':>13}")
  for form, r in rows.items():
    r["ratio"] = r["step_ms"] / plain
    print(f"{form:<10}{r['step_ms']:>10.2f}{r['ratio']:>9.2f}x{r['first_epoch_s']:>13.2f}")
  grads = _norm_gradients(model, x.shape[1:], c.repeats)
  print(f"grad of sum_l sigma_l: eigh-Gram {grads['eigh_ms']:.2f} ms, svd {grads['svd_ms']:.2f} ms "
        f"({grads['svd_ms'] / grads['eigh_ms']:.1f}x), max relative difference {grads['max_rel_diff']:.1e}")
  cli.write_figures(FLAGS.workdir.value, "bench_lipschitz", dict(rows=rows, norm_gradient=grads), c)


def _svd_norm(m):
  return jnp.linalg.svd(m, compute_uv=False)[..., 0]


def _norm_gradients(model, shape, repeats):
  """Median ms of jit(grad(Σ_l σ_l)) with σ from eigh-Gram (the penalty's) and from svd, on init params."""
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(shape)))["params"]
  layers = train.penalty_layers(model, shape)
  def total(p, top):
    out = 0.0
    for l in layers:
      k = models.get_param(p, l.path)["kernel"]
      if l.kind == "dense":
        out += top(k)
      else:  # the polyphase symbol's per-frequency matrices, as spectral.circular_conv_norm
        sym = spectral._polyphase_symbol(k, l.grid, l.strides, full=False)  # pylint: disable=protected-access
        out += jnp.max(top(sym))
    return out
  result = {}
  for name, top in (("eigh", spectral.top_singular_value), ("svd", _svd_norm)):
    fn = jax.jit(jax.grad(lambda p, top=top: total(p, top)))
    jax.block_until_ready(fn(params))
    times = []
    for _ in range(max(3, repeats)):
      t = time.perf_counter()
      g = jax.block_until_ready(fn(params))
      times.append(time.perf_counter() - t)
    result[name], result[f"{name}_ms"] = g, 1e3 * float(np.median(times))
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
  diffs = jax.tree.leaves(jax.tree.map(rel, result.pop("eigh"), result.pop("svd")))
  return dict(result, max_rel_diff=max(diffs))


if __name__ == "__main__":
  cli.run(main)
