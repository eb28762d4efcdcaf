r"""Benchmark of the adversarial-pool generation: cost of one refresh vs its size.

One refresh = ``adversarial_training.make_generate_fn``: draw R training images, attack them with the pool's
L-BFGS settings (``configs/adversarial_training.py``'s pool), place the stored examples (at RMS 0.035
along the attack's direction). Prints per R the median milliseconds per refresh, the cost per example and
the attack's success rate.

Command (2 CPU cores; the network: a ``final.msgpack`` of a finished FC100-100-10 run, e.g. the adversarial
run of ``scripts/adversarial_training.py``; "" = random initial weights)::

    python scripts/bench/pool_generation.py --config.sizes=4,16,32,64,128 --config.repeats=15 \
        --config.params=runs/adv/adversarial/final.msgpack

Expected (2 CPU cores, nearly idle, session 4, ~30 s; notes/adversarial_training.md): 2.6 / 10.9 / 12.4 /
20.8 / 39.0 ms per refresh, i.e. 644 / 682 / 388 / 325 / 305 us per example, 100 % success: rarer, larger
refreshes cost less per example. With ``--workdir``
the rows also go to ``<workdir>/bench_pool_generation.json``.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import attack
from intriguing_jax import checkpoint
from intriguing_jax import cli
from intriguing_jax import data
from intriguing_jax import models

FLAGS = cli.define_flags("bench_train", workdir_required=False,
                         workdir_help="If set, the figures also go to <workdir>/bench_pool_generation.json.")


def _params(model, x, path):
  """Random initial params, or those of a ``final.msgpack`` (a file of several seeds: the first seed's)."""
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  if path:
    variables = jax.tree.map(lambda t, a: jnp.asarray(a[0] if a.ndim == t.ndim + 1 else a).reshape(t.shape),
                             variables, checkpoint.load_pytree(path))
  return variables["params"]


def main(argv):
  cli.check_no_args(argv)
  c = FLAGS.config.value
  x, y = (jnp.asarray(a) for a in data.load_mnist("train", FLAGS.data_dir.value))
  model = models.get_model("fc100-100-10")
  params = _params(model, x, c.params)
  layers = at.model_pool_layers(model, ("input",))
  base = at.PoolConfig(**{**c.pool, "layers": ("input",), "attack": attack.AttackOptions(**c.pool.attack)})
  rows = []
  for r in c.sizes:
    gen = at.make_generate_fn(layers, dataclasses.replace(base, pool_size=r, refresh_fraction=1.0), 10)
    out = jax.block_until_ready(gen(params, x, y, jax.random.PRNGKey(0)))
    times = []
    for i in range(c.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(gen(params, x, y, jax.random.PRNGKey(i + 1)))
      times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    rows.append(dict(refresh_size=r, ms_per_refresh=1e3 * sec, us_per_example=1e6 * sec / r,
                     success=float(np.mean(np.asarray(out["input"][1].success)))))
    print(" ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()), flush=True)
  cli.write_figures(FLAGS.workdir.value, "bench_pool_generation", {"rows": rows}, c)


if __name__ == "__main__":
  cli.run(main)
