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

from intriguing_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = cli.define_flags("spectral")


def main(argv):
  cli.start(argv, FLAGS)
  out = spectral.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  for name in out:
    with open(os.path.join(FLAGS.workdir.value, f"{name}.md")) as f:
      print(f.read(), flush=True)


if __name__ == "__main__":
  cli.run(main)
