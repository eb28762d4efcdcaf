r"""Figures 1-2 and the measured claim: natural basis vs random directions (``scripts/unit_analysis.py``,
``units.run_experiment``).

Presets, chosen with ``--config=intriguing_jax/configs/unit_analysis.py:<preset>``:

* (none): the MNIST ConvNet (2 epochs) and FC100-100-10 (its recipe), trained on all 60000 training images
  by ``train.get_or_train`` into ``models_dir`` (restored when there); all 10000 test images, 200
  directions of each kind per layer, k = 10, 10000 permutations per test.
* ``quick``: 1-epoch models on 5000 training images (in ``<workdir>/models``), 1000 test images, 24
  directions, 1000 permutations.
* ``smoke``: FC100-100-10 for 1 epoch on 2000 images, 300 test images, 6 directions, 100 permutations.

Fields: ``models``; ``layers`` (feature layers to analyse, default all; names missing from a model are
skipped); ``num_directions``, ``k``, ``num_show`` (rows per kind in the figures), ``num_images`` (first N
test images, 0 = all), ``num_permutations``, ``alpha``, ``batch_size``, ``seed`` (units, directions,
chance baseline, figure rows); training: ``models_dir`` ("" = ``<workdir>/models``), ``epochs`` (model ->
epochs, 0 = the recipe's), ``num_train`` (first N training images, 0 = all), ``train_seed``; ``run_dirs``
(model -> a finished run directory loaded as is with ``train.load_run``, "" = ``train.get_or_train``).
"""

import ml_collections


def get_config(arg=None):
  """The config of preset ``arg`` (None, "quick" or "smoke")."""
  c = ml_collections.ConfigDict()
  c.models = ("mnist_conv", "fc100-100-10")
  c.layers = ()
  c.num_directions = 200
  c.k = 10
  c.num_show = 4
  c.num_images = 0
  c.num_permutations = 10000
  c.alpha = 0.05
  c.batch_size = 1000
  c.seed = 0
  c.models_dir = "runs/models"
  c.epochs = {"mnist_conv": 2, "fc100-100-10": 0}
  c.run_dirs = {"mnist_conv": "", "fc100-100-10": ""}
  c.num_train = 0
  c.train_seed = 0
  if arg == "quick":
    c.models_dir, c.num_train, c.epochs = "", 5000, {"mnist_conv": 1, "fc100-100-10": 1}
    c.num_images, c.num_directions, c.num_permutations = 1000, 24, 1000
  elif arg == "smoke":
    c.models, c.models_dir, c.num_train, c.epochs = ("fc100-100-10",), "", 2000, {"fc100-100-10": 1}
    c.num_images, c.num_directions, c.num_permutations, c.num_show = 300, 6, 100, 2
  elif arg is not None:
    raise ValueError(f"unit_analysis config: unknown preset {arg!r} (quick, smoke)")
  return c
