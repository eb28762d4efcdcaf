"""Benchmark of the attack (``scripts/bench/attack.py``, ``attack.bench.run``).

Presets (``--config=intriguing_jax/configs/bench_attack.py:<preset>``): (none) the measured setting, 100
convex and 200 compare images, every training image, the models' recipes; ``tiny``: 10 and 20 images, the
baseline on 5, models trained 1 epoch on 2000 images (about a minute on 2 CPU cores, no figures to quote).

Fields: ``parts`` (convex, compare, budgets, batch, first_call); ``seed`` (random targets); ``num_convex``;
``num_compare``; ``num_baseline`` (compare images the scipy baseline attacks; 0 = none); ``reference`` (a
checkout of another commit whose engine, at its defaults, the compare part runs on the same inputs; "" =
none); ``repeats`` (warm calls, median); ``first_call_rounds`` (rounds of the first_call part, each
measuring every checkout once; medians and ranges); ``budgets`` (name -> ``AttackOptions`` overrides, the
budgets part's points; "default" is the ratios' reference); ``batches`` (the batch part's sizes);
``train_examples`` (0 = all) and ``epochs`` (0 = the recipe's) of the models trained by
``train.get_or_train`` in the workdir; ``attack`` (every ``AttackOptions`` field, e.g.
``--config.attack.num_workers=1``).
"""

import dataclasses

import ml_collections

from intriguing_jax import attack


def get_config(arg=None):
  """The config of preset ``arg`` (None or "tiny")."""
  c = ml_collections.ConfigDict(dict(parts=("convex", "compare"), seed=0, num_convex=100, num_compare=200,
                                     num_baseline=200, repeats=3, first_call_rounds=3, train_examples=0,
                                     epochs=0, reference="", batches=(25, 100, 200, 1000, 4000)))
  c.budgets = {"default": {}, "refine=False": dict(refine=False), "num_bisection=0": dict(num_bisection=0),
               "num_bisection=1": dict(num_bisection=1), "num_bisection=6": dict(num_bisection=6),
               "refine_rounds=2": dict(refine_rounds=2), "maxiter=20": dict(maxiter=20),
               "maxiter=100": dict(maxiter=100), "ftol=1e-6": dict(ftol=1e-6),
               "history_size=10": dict(history_size=10),
               "num_bisection=0, refine=False": dict(num_bisection=0, refine=False)}
  c.attack = dataclasses.asdict(attack.AttackOptions())
  if arg == "tiny":
    c.num_convex, c.num_compare, c.num_baseline, c.repeats, c.first_call_rounds = 10, 20, 5, 1, 1
    c.train_examples, c.epochs, c.batches = 2000, 1, (5, 20)
    c.budgets = {"default": {}, "refine=False": dict(refine=False)}
  elif arg is not None:
    raise ValueError(f"bench_attack config: unknown preset {arg!r} (tiny)")
  return c
