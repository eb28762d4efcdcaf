"""Benchmarks of training (``scripts/bench/train.py``, ``pool_generation.py``, ``pool_sweep.py``).

Fields: ``model``; ``num_train`` (first N MNIST training images, 0 = all; ``synthetic``: N synthetic images
instead); ``epochs``; ``weight_decays`` (train.py: the λ of the sweep); ``sizes`` (pool_generation.py:
refresh sizes); ``params`` (pool_generation.py: a ``final.msgpack`` of a trained run, "" = random init);
``repeats``; ``ks`` (pool_sweep.py: members per sweep, 0 = one ``train_with_pool`` run); ``warmup_steps``;
``pool`` (the pool of ``configs/adversarial_training.py``, in ``PoolConfig`` fields).
"""

import dataclasses

import ml_collections

from intriguing_jax import adversarial_training
from intriguing_jax.configs import adversarial_training as adv_config


def get_config(arg=None):
  """The config of preset ``arg`` (None or "sigmoid": train.py on FC100-100-10)."""
  c = ml_collections.ConfigDict()
  c.model = "fc100-100-10" if arg == "sigmoid" else "fc10"
  c.num_train, c.synthetic, c.epochs = 0, False, 5
  c.weight_decays = (1e-4, 1e-2, 1.0)
  c.sizes, c.params, c.repeats = (4, 16, 64), "", 7
  c.ks, c.warmup_steps = (0, 4, 8), 10
  pool = adv_config.get_config().pool
  c.pool = dict(pool, warmup_steps=0)
  del c.pool["warmup_epochs"]
  assert set(c.pool) == {f.name for f in dataclasses.fields(adversarial_training.PoolConfig)}
  if arg not in (None, "sigmoid"):
    raise ValueError(f"bench_train config: unknown preset {arg!r}; known: sigmoid")
  return c
