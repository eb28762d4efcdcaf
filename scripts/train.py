r"""Trains one of the paper's MNIST models (Tables 1 and 3) with its recipe and reports its errors.

Commands (measured train / test error and training wall time on 2 CPU cores: notes/models.md; paper in
brackets)::

    python scripts/train.py --workdir=runs/models --config=intriguing_jax/configs/train.py:fc10-1e-4
        # 6.75 % / 7.42 % [6.7 / 7.4]; likewise :fc10-1e-2, :fc10-1, :fc100-100-10, :fc200-200-10, :ae400-10
    python scripts/train.py --workdir=runs/models --config=intriguing_jax/configs/train.py:fc100-100-10-t3 \
        --config.split=p1                                   # Table 3, P1: 0.01 % / 2.17 % [0 / 2.0]
    python scripts/train.py --workdir=runs/sweeps --config=intriguing_jax/configs/train.py:fc10 \
        --config.sweep_weight_decays="(1e-4,1e-2,1.0)"    # three λ as one vmapped program

Quick check (FC10(1e-4), 2 epochs; ~5 s on 2 cores; train / test error 8.37 % / 8.18 %)::

    python scripts/train.py --workdir=/tmp/train_quick --config=intriguing_jax/configs/train.py:quick

A finished run in the workdir is restored instead of retrained; an interrupted one resumes. Errors go to
``<workdir>/<run>/errors.json``. MNIST is read from ``--data_dir``, else ``$INTRIGUING_JAX_MNIST_DIR``,
else tfds.
"""

from intriguing_jax import cli
from intriguing_jax import train

FLAGS = cli.define_flags("train")


def main(argv):
  cli.start(argv, FLAGS)
  out = train.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  for row in out["rows"]:
    print(f"{out['model']} [{out['split']}]: " + "  ".join(
        f"{k} {v:.2%}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
  cli.run(main)
