"""intriguing_jax: Szegedy et al., "Intriguing properties of neural networks" (ICLR 2014) in JAX.

Usage::

    import functools
    import intriguing_jax as ij

    images, labels = ij.data.load_mnist("test")          # offline: INTRIGUING_JAX_MNIST_DIR=/path/to/idx
    model = ij.models.get_model("fc100-100-10")
    ...
    result = ij.attack.lbfgs_attack(functools.partial(model.apply, params), x, target)

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
    "transfer",
    "transfer_report",
    "units",
    "spectral",
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
