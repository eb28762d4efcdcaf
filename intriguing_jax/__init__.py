"""intriguing_jax: Szegedy et al., "Intriguing properties of neural networks" (ICLR 2014) in JAX.

Usage::

    import intriguing_jax as ij

    images, labels = ij.data.load_mnist("test")   # data_dir=..., else $INTRIGUING_JAX_MNIST_DIR, else tfds
    model = ij.models.get_model("fc100-100-10")
    ...
    result = ij.attack.lbfgs_attack(model.apply, variables, x, target)   # every function: fn(params, x)

Submodules are imported lazily, so ``import intriguing_jax`` stays cheap (TensorFlow Datasets, matplotlib
and scipy are only loaded by the modules that need them).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "types",
    "data",
    "models",
    "train",
    "checkpoint",
    "progress",
    "attack",
    "exact",
    "metrics",
    "paper",
    "tables",
    "tables_report",
    "reproduce",
    "driver",
    "scale",
    "cli",
    "units",
    "spectral",
    "certify",
    "plotting",
    "report",
    "adversarial_training",
    "distributed",
    "precision",
)


def __getattr__(name):
  if name in _SUBMODULES:
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
