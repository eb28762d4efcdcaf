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

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from intriguing_jax import configs
from intriguing_jax import progress
from intriguing_jax import reproduce

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "reproduce_mnist.py"),
    "Experiment config (intriguing_jax/configs/reproduce_mnist.py[:quick|:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and resume directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, "
                                "else tfds).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  reproduce.validate(config)
  logging.vlog(1, "config:\n%s", config)
  progress.log_run_start(_WORKDIR.value)
  results = reproduce.run_experiment(config, _WORKDIR.value, _DATA_DIR.value)
  for c in results["claims"]:
    logging.info("claim %s: %s %s", "HOLDS" if c["holds"] else "DOES NOT HOLD", c["claim"], c["evidence"])


def _parse_flags(argv):
  """absl's parser, except that --help/-h exits 0 (absl's own help flag exits 1)."""
  if {"--help", "-h", "-?", "--helpshort"} & set(argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True)
    sys.exit(0)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
