r"""Benchmark of the adversarial-pool generation: cost of one refresh vs its size.

One refresh = ``adversarial_training.make_generate_fn``: draw R training images, attack them with the pool's
L-BFGS settings (``configs/adversarial_training.py``'s pool), place the stored examples (at RMS 0.035
along the attack's direction). Prints per R the median milliseconds per refresh, the cost per example and
the attack's success rate.

Command (2 CPU cores; the network: a ``final.msgpack`` of a finished FC100-100-10 run)::

    python scripts/bench/pool_generation.py --config.sizes=4,16,32,64,128 --config.repeats=15 \
        --config.params=runs/adv/adversarial/final.msgpack

Expected (2 CPU cores, nearly idle, session 4, ~30 s; notes/adversarial_training.md): 2.6 / 10.9 / 12.4 /
20.8 / 39.0 ms per refresh, i.e. 644 / 682 / 388 / 325 / 305 us per example, 100 % success: rarer, larger
refreshes cost less per example.
"""

import dataclasses
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from intriguing_jax import adversarial_training as at
from intriguing_jax import attack
from intriguing_jax import checkpoint
from intriguing_jax import configs
from intriguing_jax import data
from intriguing_jax import models
from intriguing_jax import progress

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "bench_train.py"), "Benchmark config.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, "
                                "else tfds).")


def main(argv):
  del argv
  c = _CONFIG.value
  x, y = (jnp.asarray(a) for a in data.load_mnist("train", _DATA_DIR.value))
  model = models.get_model("fc100-100-10")
  params = (checkpoint.load_pytree(c.params, model.init(jax.random.PRNGKey(0), x[:1])) if c.params
            else model.init(jax.random.PRNGKey(0), x[:1]))["params"]
  layers = at.model_pool_layers(model, ("input",))
  base = at.PoolConfig(**{**c.pool, "layers": ("input",), "attack": attack.AttackOptions(**c.pool.attack)})
  for r in c.sizes:
    gen = at.make_generate_fn(layers, dataclasses.replace(base, pool_size=r, refresh_fraction=1.0), 10)
    out = jax.block_until_ready(gen(params, x, y, jax.random.PRNGKey(0)))
    times = []
    for i in range(c.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(gen(params, x, y, jax.random.PRNGKey(i + 1)))
      times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    print(f"refresh_size={r} ms_per_refresh={1e3 * sec:.4g} us_per_example={1e6 * sec / r:.4g} "
          f"success={float(np.mean(np.asarray(out['input'][1].success))):.4g}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=progress.parse_flags)
