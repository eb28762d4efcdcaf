r"""Table 5 (paper §4.3): per-layer Lipschitz upper bounds and their product, AlexNet and our MNIST nets.

Commands (from the repository root; figures measured on 2 shared CPU cores, notes/spectral.md)::

    # AlexNet, random Flax-default weights, 227x227x3 (~1 min): product of the upper bounds ~3.1e3,
    # paper-style product ~68, the 8 Table 5 layers, 2 Jacobian norms.
    OPENBLAS_NUM_THREADS=1 python scripts/spectral.py --workdir=runs/spectral
    # Your AlexNet weights (.npz with "<layer>/kernel" keys in Flax layout, or a checkpoint directory):
    python scripts/spectral.py --workdir=runs/spectral --config.weights=/path/alexnet.npz
    # The trained MNIST models in runs/models (scripts/train.py; missing ones skipped), ~35 s:
    python scripts/spectral.py --workdir=runs/spectral --config=intriguing_jax/configs/spectral.py:mnist
    # Smoke run (random-weight ConvNet, a few seconds):
    python scripts/spectral.py --workdir=/tmp/spectral --config=intriguing_jax/configs/spectral.py:smoke

Writes ``<workdir>/<model>.md`` (table and products) and ``<workdir>/<model>.json`` and prints the
tables. MNIST is read from ``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # batched LAPACK SVDs: see scripts/bench/spectral.py

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from intriguing_jax import configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import progress  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "spectral.py"),
    "Experiment config (intriguing_jax/configs/spectral.py[:alexnet|:mnist|:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (<model>.md, <model>.json).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, "
                                "else tfds).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  progress.log_run_start(_WORKDIR.value)
  out = spectral.run_experiment(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
  for name in out:
    with open(os.path.join(_WORKDIR.value, f"{name}.md")) as f:
      print(f.read(), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=progress.parse_flags)
