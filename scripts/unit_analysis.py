r"""Figures 1-2 and a measured verdict: natural basis vs random directions (paper Section 3).

For each model and hidden layer φ, the MNIST test set I is ranked by ``<φ(x), v>`` for natural-basis
units ``v = e_i`` and random unit-norm directions; the top-k images of every direction are scored for
coherence (majority-label share, label entropy, pixel cosine) and natural vs random are compared
(Mann-Whitney U, permutation test, Vargha-Delaney A), each also against random k-subsets of I.

Command (from the repository root)::

    python scripts/unit_analysis.py --workdir=runs/units
    # or with finished runs of scripts/train.py: --config.run_dirs.mnist_conv=runs/models/mnist_conv_577e613e

Expected runtime: ~1-2 min on 2 shared CPU cores once the models exist in runs/models (the default trains
the 2-epoch ConvNet and FC100-100-10 there otherwise, tens of minutes). Expected result (10000 test
images, 200 directions, k = 10; notes/units.md): in every layer both natural and random directions are
far above chance (majority-label share 0.60-0.86 vs 0.27); majority share and label entropy are mostly
not distinguishable between natural and random; the pixel similarity differs with small/medium effects
in both directions.

Quick run (1-epoch models on 5000 images, 1000 test images, 24 directions; ~3 min on 2 cores)::

    python scripts/unit_analysis.py --workdir=/tmp/units \
        --config=intriguing_jax/configs/unit_analysis.py:quick

Writes ``<workdir>/report.md`` + ``report.html``, ``results.json`` and the figures. MNIST is read from
``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
"""

import os

from intriguing_jax import cli
from intriguing_jax import plotting
from intriguing_jax import units

FLAGS = cli.define_flags("unit_analysis")


def main(argv):
  cli.start(argv, FLAGS)
  out = units.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  print(plotting.markdown_table(out["claim"], floatfmt=".3g"))
  print(f"report: {os.path.join(FLAGS.workdir.value, 'report.md')}  ({out['total_seconds']:.1f} s)")


if __name__ == "__main__":
  cli.run(main)
