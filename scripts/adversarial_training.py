r"""Regularisers against adversarial examples: weight decay, dropout, adversarial pools, Lipschitz penalties.

Trains FC100-100-10 (or, preset ``conv``, the MNIST ConvNet) on MNIST with weight decay; + dropout; +
dropout + a pool of adversarial examples (paper §4.2); and + a penalty on the layers' exact operator norms
for each strength μ of ``config.lipschitz.strengths`` (§4.3's suggestion). Per model it reports the test
error, the product of the layer bounds, the mean certified L2 radius and the certified accuracy at L2 0.3
and 1.0 on the test set (``intriguing_jax.certify``), and the mean minimum distortion of the L-BFGS attack on
the same 100 test images, bracketed by the certified radius (``adversarial_training.run_experiment``;
settings in ``intriguing_jax/configs/adversarial_training.py``). Writes ``results.json`` and
``report.md``/``.html``.

One seed of the default setting::

    python scripts/adversarial_training.py --workdir=runs/adversarial_training --config.seed=0

Expected (2 CPU cores; notes/adversarial_training.md): ~9 min per seed; over 16 seeds the pool's test
error averages 1.25 % (dropout 1.39 %, weight decay 1.67 %); mean distortion ~0.083 vs ~0.062 for weight
decay; the figures of the Lipschitz runs, over 3 seeds, are in notes/lipschitz.md. The runs are
independent and resumable: ``--config.runs="('adversarial',)"`` (etc.) in
parallel processes, then the full command assembles the report. Several seeds as one vmapped program per
run: ``--config.sweep_seeds="(0,1,2,3)"``. Smoke test (2000 images, 2 epochs; ~25 s on 2 cores, test
errors ~22-24 %, every claim but the distortion one False at this size)::

    python scripts/adversarial_training.py --config=intriguing_jax/configs/adversarial_training.py:smoke \
        --workdir=/tmp/adv_smoke

MNIST is read from ``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
"""

from absl import logging

from intriguing_jax import adversarial_training
from intriguing_jax import cli

FLAGS = cli.define_flags("adversarial_training")


def main(argv):
  cli.start(argv, FLAGS, adversarial_training.validate)
  out = adversarial_training.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  for claim, holds in out["claims"].items():
    logging.info("claim %s: %s", claim, holds)


if __name__ == "__main__":
  cli.run(main)
