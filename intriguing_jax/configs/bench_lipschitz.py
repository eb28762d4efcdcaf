"""Benchmark of the Lipschitz penalty's cost (``scripts/bench/lipschitz_penalty.py``).

Fields: ``model`` (a ``models.get_model`` name); ``model_kwargs``; ``batch_size``; ``steps`` (optimiser steps
per timed epoch); ``repeats`` (timed epochs after the first, which compiles); ``forms`` (penalty forms timed
against the plain step, ``train.TrainConfig.lipschitz_penalty`` values); ``strength`` (μ: its value does
not change the cost).
"""

import ml_collections


def get_config(arg=None):
  """The config of preset ``arg`` (None: the MNIST ConvNet; "fc": FC100-100-10)."""
  c = ml_collections.ConfigDict()
  c.model = "fc100-100-10" if arg == "fc" else "mnist_conv"
  c.model_kwargs = {}
  c.batch_size, c.steps, c.repeats = 128, 50, 5
  c.forms = ("sum", "hinge", "log", "parseval")
  c.strength = 1e-3
  if arg not in (None, "fc"):
    raise ValueError(f"bench_lipschitz config: unknown preset {arg!r}; known: fc")
  return c
