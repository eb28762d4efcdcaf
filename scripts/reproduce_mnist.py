r"""Reproduces Tables 1-4 of Szegedy et al. (2014) on MNIST: figures and a report beside the paper's numbers.

The paper setting (every training image attacked for Tables 1-2, every test image for Tables 3-4; models
trained, or restored from runs of ``scripts/train.py`` in ``models_dir``)::

    python scripts/reproduce_mnist.py --workdir=runs/mnist_full \
        --config.models_dir=runs/models --config.chunk_size=5000

A quick check on real MNIST (10000 training images, 2 epochs, 100 attacked examples per model and set)::

    python scripts/reproduce_mnist.py --config=intriguing_jax/configs/reproduce_mnist.py:quick \
        --workdir=runs/mnist_quick

Measured runtimes and results of both commands, with the machine they ran on: BUILD_NOTES.md. MNIST is read
from ``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``, else tfds. Outputs in ``--workdir``:
``results.json`` (every table per seed, the aggregate, the claims, timings), ``report.md`` + ``report.html``
(ours / the paper's, the claims checked on our numbers, the readings chosen, Figures 5-7 analogues),
``figures/``, ``models/`` and the attack chunks in ``attacks/``. A rerun of the same command after an
interruption restores finished models and attack chunks. Details of the run (the config) at ``--v=1``.
"""

from absl import logging

from intriguing_jax import cli
from intriguing_jax import reproduce

FLAGS = cli.define_flags("reproduce_mnist")


def main(argv):
  cli.start(argv, FLAGS, reproduce.validate)
  results = reproduce.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  for c in results["claims"]:
    logging.info("claim %s: %s %s", "HOLDS" if c["holds"] else "DOES NOT HOLD", c["claim"], c["evidence"])


if __name__ == "__main__":
  cli.run(main)
