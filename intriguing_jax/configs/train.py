r"""Train one of the paper's MNIST models (``scripts/train.py``, ``train.run_experiment``).

Presets, chosen with ``--config=intriguing_jax/configs/train.py:<preset>``:

* (none): FC100-100-10 with its recipe (``train.RECIPES``) on all 60000 training images.
* ``quick``: FC10(1e-4), 2 epochs.
* a recipe name (e.g. ``fc10-1e-2``, ``fc100-100-10-t3``): that model with its recipe.

Fields: ``model`` (a ``train.RECIPES`` key or any "fc<w1>-<w2>-10"); ``split`` (full, p1 = first 30000,
p2 = last 30000 training images, paper.md A15); ``seed``; ``epochs`` (None = the recipe's); ``model_kwargs``
(``dropout_rate``, ``input_dropout_rate``; None = the recipe's); ``overrides`` (every ``train.TrainConfig``
field; None = the recipe's); ``sweep_weight_decays`` (λ values, each a number or per-layer tuple, trained
as one vmapped program). E.g. ``--config.overrides.weight_decay=(1e-4,) --config.epochs=5``.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from intriguing_jax import train

def _placeholder(field):
  """A None field of the type of TrainConfig's ``field`` (so that the command line can set it)."""
  hint = str(field.type)
  kind = tuple if "Tuple" in hint else {"int": int, "float": float}.get(hint, str)
  return config_dict.placeholder(kind)


def get_config(arg=None):
  """The config of preset ``arg`` (None, "quick" or a recipe name)."""
  c = ml_collections.ConfigDict()
  c.model = "fc100-100-10"
  c.split = "full"
  c.seed = 0
  c.epochs = config_dict.placeholder(int)
  c.model_kwargs = dict(dropout_rate=config_dict.placeholder(float),
                        input_dropout_rate=config_dict.placeholder(float))
  c.overrides = {f.name: _placeholder(f) for f in dataclasses.fields(train.TrainConfig)}
  c.sweep_weight_decays = ()
  if arg == "quick":
    c.model, c.epochs = "fc10-1e-4", 2
  elif arg:
    train.recipe(arg)  # raises for an unknown name
    c.model = arg
  return c
