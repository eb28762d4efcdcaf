r"""Benchmark of the adversarial-pool generation (issue 8): cost per refresh vs refresh size and attack settings.

One refresh = ``intriguing_jax.adversarial_training.make_generate_fn``: draw R training images, attack them
with the pool's L-BFGS settings against the given network, place the stored examples (here along the
attack's direction at ``--pool_rms``). Prints, per refresh size R, the median seconds per refresh, the
cost per example, the attack's success rate and the share of a training epoch the generation would take
with ``--new_per_step`` new examples per step on average (a refresh of R every R / new_per_step steps)
given ``--step_ms`` (the measured cost of one training step without the generation; 0: not printed). It
also checks that the refinement, which the library skips under ``perturbation_rms``, would not have changed
the stored examples (largest difference over the examples).

Command (2 CPU cores; the network: a ``final.msgpack`` of a finished run, e.g. an adversarial_training.py
run, or the trained FC100-100-10 restored -- or trained first -- by intriguing_jax.train.get_or_train)::

    nice -n 5 .venv/bin/python scripts/bench_pool_generation.py --data_dir=../shared/data/mnist \
        --params=runs/adv_s4b_final_seed0/adversarial/final.msgpack --sizes=4,16,64 --out=runs/bench_pool.json

Expected result (2 CPU cores, nearly idle, session 4, the command above with --sizes=4,16,32,64,128
--repeats=15 --step_ms=1.87, ~30 s; notes/adversarial_training.md): 2.6 / 10.9 / 12.4 / 20.8 / 39.0 ms per
refresh, i.e. 644 / 682 / 388 / 325 / 305 us per example, 100% success, the skipped refinement changes the
stored examples by at most 1.2e-7. At 4 new examples per step the generation would take 58 / 59 / 45 / 41 /
39% of the epoch: rarer, larger refreshes cost less per example. The small sizes vary most between runs
(16 examples: 6.5-10.9 ms across sessions' runs).
"""

import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import train

MODEL = "fc100-100-10"

_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR).")
_PARAMS = flags.DEFINE_string("params", None, "final.msgpack of a trained FC100-100-10 run; default: the model "
                              "of train.get_or_train in --models_dir.")
_MODELS_DIR = flags.DEFINE_string("models_dir", "runs/models", "train.get_or_train's workdir (without --params).")
_SIZES = flags.DEFINE_list("sizes", ["4", "16", "64"], "Refresh sizes R (new examples per refresh).")
_MAXITER = flags.DEFINE_integer("maxiter", 10, "L-BFGS iterations of the pool attack.", lower_bound=1)
_C_GRID = flags.DEFINE_list("c_grid", ["0.1", "1.0"], "c values of the pool attack.")
_UNTARGETED = flags.DEFINE_bool("untargeted", True, "Untargeted pool attack.")
_POOL_RMS = flags.DEFINE_float("pool_rms", 0.035, "RMS placement of the stored examples.", lower_bound=1e-6)
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed refreshes per size (median reported).", lower_bound=1)
_NEW_PER_STEP = flags.DEFINE_float("new_per_step", 4.0, "New pool examples per training step on average, for "
                                    "the epoch share.", lower_bound=1e-3)
_STEP_MS = flags.DEFINE_float("step_ms", 0.0, "Milliseconds of one training step without the pool (e.g. the "
                              "dropout run's epoch time / steps); 0: no epoch share.", lower_bound=0.0)
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here (atomically).")


def _params(x_train, y_train):
  if _PARAMS.value:
    if not os.path.isfile(_PARAMS.value):
      raise app.UsageError(f"--params: no such file {_PARAMS.value!r}")
    return jax.tree.map(jnp.asarray, checkpoint.load_pytree(_PARAMS.value))["params"]
  _, variables = train.get_or_train(MODEL, x_train, y_train, workdir=_MODELS_DIR.value)
  return variables["params"]


def main(argv):
  del argv
  try:
    sizes = sorted({int(s) for s in _SIZES.value})
    c_grid = tuple(float(c) for c in _C_GRID.value)
  except ValueError as e:
    raise app.UsageError(f"--sizes and --c_grid must be numbers: {e}") from e
  if not sizes or sizes[0] < 1:
    raise app.UsageError(f"--sizes must be positive integers, got {_SIZES.value}")
  x, y = data.load_mnist("train", _DATA_DIR.value)
  params = _params(x, y)
  x, y = jnp.asarray(x), jnp.asarray(y)
  layers = at.model_pool_layers(models.get_model(MODEL), ["input"])
  rows = []
  for r in sizes:
    cfg = dict(layers=("input",), pool_size=r, refresh_fraction=1.0, mix_ratio=0.1, untargeted=_UNTARGETED.value,
               maxiter=_MAXITER.value, c_grid=c_grid, perturbation_rms=_POOL_RMS.value)
    gen = at.make_generate_fn(layers, at.PoolConfig(**cfg), data.NUM_CLASSES)
    first = gen(params, x, y, jax.random.PRNGKey(0))
    jax.block_until_ready(first)
    times = []
    for i in range(_REPEATS.value):
      t0 = time.perf_counter()
      out = gen(params, x, y, jax.random.PRNGKey(i + 1))
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    # The refinement the library skips under perturbation_rms: run the attack WITH it (a config without
    # the RMS placement), rescale its direction the same way, and compare with the stored examples.
    xb, yb, key = x[:r], y[:r], jax.random.PRNGKey(0)
    gen_one = jax.jit(lambda p, c: at.generate_adversarial(layers[0], p, xb, yb, key, c, data.NUM_CLASSES)[0],
                      static_argnums=1)
    stored = gen_one(params, at.PoolConfig(**cfg))
    refined = gen_one(params, at.PoolConfig(**{**cfg, "perturbation_rms": None}))
    diff = float(jnp.max(jnp.abs(at.place_at_rms(xb, refined, _POOL_RMS.value, (0.0, 1.0)) - stored)))
    sec = float(np.median(times))
    row = {"refresh_size": r, "ms_per_refresh": 1e3 * sec, "us_per_example": 1e6 * sec / r,
           "success": float(np.mean(np.asarray(out["input"][1].success))), "refine_skip_max_diff": diff}
    if _STEP_MS.value:
      gen_ms = 1e3 * sec / r * _NEW_PER_STEP.value
      row["epoch_share"] = gen_ms / (gen_ms + _STEP_MS.value)
    rows.append(row)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
  if _OUT.value:
    checkpoint.atomic_write_json(_OUT.value, {"rows": rows, "maxiter": _MAXITER.value, "c_grid": list(c_grid),
                                              "untargeted": _UNTARGETED.value, "pool_rms": _POOL_RMS.value,
                                              "new_per_step": _NEW_PER_STEP.value, "step_ms": _STEP_MS.value,
                                              "params": _PARAMS.value or _MODELS_DIR.value,
                                              "backend": jax.default_backend()})


if __name__ == "__main__":
  app.run(main)
