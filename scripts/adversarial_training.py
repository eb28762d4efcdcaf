r"""Adversarial training with a pool of adversarial examples vs weight decay vs dropout (paper §4.2).

Trains FC100-100-10 three ways on MNIST (weight decay; + dropout; + dropout + a pool of adversarial
examples), then measures each model's test error and the mean minimum distortion of the L-BFGS attack on
the same 100 test images (``adversarial_training.run_experiment``; settings in
``intriguing_jax/configs/adversarial_training.py``). Writes ``results.json`` and ``report.md``/``.html``.

One seed of the default setting::

    python scripts/adversarial_training.py --workdir=runs/adversarial_training --config.seed=0

Expected (2 CPU cores; notes/adversarial_training.md): ~9 min per seed; over 16 seeds the pool's test
error averages 1.25 % (dropout 1.39 %, weight decay 1.67 %); mean distortion ~0.083 vs ~0.062 for weight
decay. The three runs are independent and resumable: ``--config.runs="('adversarial',)"`` (etc.) in
parallel processes, then the full command assembles the report. Several seeds as one vmapped program per
run: ``--config.sweep_seeds="(0,1,2,3)"``. Smoke test (2000 images, 2 epochs; ~25 s on 2 cores, test
errors ~22-24 %, every claim but the distortion one False at this size)::

    python scripts/adversarial_training.py --config=intriguing_jax/configs/adversarial_training.py:smoke \
        --workdir=/tmp/adv_smoke

MNIST is read from ``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from intriguing_jax import adversarial_training
from intriguing_jax import configs
from intriguing_jax import progress

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "adversarial_training.py"),
    "Experiment config (intriguing_jax/configs/adversarial_training.py[:smoke|:paper]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and resume directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR, "
                                "else tfds).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  adversarial_training.validate(_CONFIG.value)
  logging.vlog(1, "config:\n%s", _CONFIG.value)
  progress.log_run_start(_WORKDIR.value)
  out = adversarial_training.run_experiment(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
  for claim, holds in out["claims"].items():
    logging.info("claim %s: %s", claim, holds)


if __name__ == "__main__":
  app.run(main, flags_parser=progress.parse_flags)
