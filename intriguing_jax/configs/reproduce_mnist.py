r"""Config of Tables 1-4 on MNIST (``scripts/reproduce_mnist.py``, ``reproduce.run_experiment``).

Presets (``--config=intriguing_jax/configs/reproduce_mnist.py:<preset>``): none, the paper setting (every
training image attacked for Tables 1-2, every test image for 3-4, the recipes' epochs, ``AttackOptions()``);
``quick``, 10000 training images, 2 epochs, 100 examples per model and set, 50 iterations and 5 bisections;
``smoke``, 300 synthetic images, 1 epoch, 12 examples, 10 iterations without refinement (the script's test).
None in ``num_examples`` / ``num_train`` / ``epochs`` / ``models_dir`` means all examples / all training
images / the recipes' epochs / ``<workdir>/models``; ``synthetic_data=N`` replaces MNIST by N synthetic
images; ``attack`` holds every ``attack.AttackOptions`` field (``--config.attack.maxiter=50``);
``unrefined`` also attacks every set with ``refine=False`` (the paper's method alone) and reports its
distortion beside the refined attack's in Tables 1 and 3 (skipped when ``attack.refine`` is False).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from intriguing_jax import attack


def get_config(arg=None):
  """The config of preset ``arg`` (None, "quick" or "smoke")."""
  c = ml_collections.ConfigDict()
  c.seeds = (0,)
  c.tables = (1, 2, 3, 4)
  c.num_examples = config_dict.placeholder(int)
  c.num_train = config_dict.placeholder(int)
  c.epochs = config_dict.placeholder(int)
  c.chunk_size = 500
  c.models_dir = config_dict.placeholder(str)
  c.figures = True
  c.synthetic_data = 0
  c.attack = ml_collections.ConfigDict(dataclasses.asdict(attack.AttackOptions()))
  c.unrefined = True
  if arg == "quick":
    c.num_examples, c.num_train, c.epochs = 100, 10000, 2
    c.attack.maxiter, c.attack.num_bisection = 50, 5
  elif arg == "smoke":
    c.synthetic_data, c.num_train, c.num_examples, c.epochs, c.chunk_size = 300, 300, 12, 1, 6
    c.attack.maxiter, c.attack.num_bisection, c.attack.refine = 10, 2, False
  elif arg:
    raise ValueError(f"reproduce_mnist config: unknown preset {arg!r}; known: quick, smoke")
  return c
