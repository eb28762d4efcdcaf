r"""Table 5: per-layer Lipschitz upper bounds and their product (``scripts/spectral.py``,
``spectral.run_experiment``).

Presets, chosen with ``--config=intriguing_jax/configs/spectral.py:<preset>``:

* (none) or ``alexnet``: AlexNet (227x227x3) with random Flax-default weights, 2 inputs for the empirical
  lower bound.
* ``mnist``: the seven trained MNIST models, restored from ``models_dir`` (missing ones are skipped unless
  ``train_missing``); the empirical bound on the first 256 test images.
* ``smoke``: the MNIST ConvNet with random weights, 4 random inputs (seconds).

Fields: ``models`` (model names; recipe names with ``weights="trained"``); ``weights`` ("random", "trained",
or a .npz / checkpoint directory, see ``spectral.load_weights``); ``models_dir``, ``epochs`` (model ->
epochs, 0 = the recipe's), ``train_seed``, ``train_missing`` (trained models, ``train.get_or_train``),
``run_dirs`` (model -> a finished run directory, loaded as is with ``train.load_run``);
``method`` (conv norms: fft, lanczos) and ``num_steps``; ``num_empirical`` inputs and
``empirical_steps`` power steps for the empirical lower bound; ``adv_file`` (.npz with x and x_adv: pairs
for ‖f(x') − f(x)‖/‖x' − x‖); ``seed`` (random weights and inputs).
"""

import ml_collections

MNIST_MODELS = ("fc10-1e-4", "fc10-1e-2", "fc10-1", "fc100-100-10", "fc200-200-10", "ae400-10", "mnist_conv")


def get_config(arg=None):
  """The config of preset ``arg`` (None, "alexnet", "mnist" or "smoke")."""
  c = ml_collections.ConfigDict()
  c.models = ("alexnet",)
  c.weights = "random"
  c.models_dir = "runs/models"
  c.epochs = {name: 2 if name == "mnist_conv" else 0 for name in MNIST_MODELS}
  c.run_dirs = {name: "" for name in MNIST_MODELS}
  c.train_seed = 0
  c.train_missing = False
  c.method = "fft"
  c.num_steps = 100
  c.num_empirical = 2
  c.empirical_steps = 20
  c.adv_file = ""
  c.seed = 0
  if arg == "mnist":
    c.models, c.weights, c.num_empirical = MNIST_MODELS, "trained", 256
  elif arg == "smoke":
    c.models, c.num_empirical = ("mnist_conv",), 4
  elif arg not in (None, "alexnet"):
    raise ValueError(f"spectral config: unknown preset {arg!r} (alexnet, mnist, smoke)")
  return c
