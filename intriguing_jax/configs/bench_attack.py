"""Benchmark of the attack (``scripts/bench/attack.py``, ``attack.bench.run``).

Presets (``--config=intriguing_jax/configs/bench_attack.py:<preset>``): (none) the measured setting, 100
convex and 200 compare images, every training image, the models' recipes; ``tiny``: 10 and 20 images, the
baseline on 5, models trained 1 epoch on 2000 images (about a minute on 2 CPU cores, no figures to quote).

Fields: ``parts`` (convex, compare); ``seed`` (random targets); ``num_convex``; ``num_compare``;
``num_baseline`` (compare images the scipy baseline attacks; 0 = none); ``repeats`` (warm calls, median);
``train_examples`` (0 = all) and ``epochs`` (0 = the recipe's) of the models trained by
``train.get_or_train`` in the workdir; ``attack`` (every ``AttackOptions`` field, e.g.
``--config.attack.num_slots=16``).
"""

import dataclasses

import ml_collections

from intriguing_jax import attack


def get_config(arg=None):
  """The config of preset ``arg`` (None or "tiny")."""
  c = ml_collections.ConfigDict(dict(parts=("convex", "compare"), seed=0, num_convex=100, num_compare=200,
                                     num_baseline=200, repeats=3, train_examples=0, epochs=0))
  c.attack = dataclasses.asdict(attack.AttackOptions())
  if arg == "tiny":
    c.num_convex, c.num_compare, c.num_baseline, c.repeats = 10, 20, 5, 1
    c.train_examples, c.epochs = 2000, 1
  elif arg is not None:
    raise ValueError(f"bench_attack config: unknown preset {arg!r} (tiny)")
  return c
