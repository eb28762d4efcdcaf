r"""Benchmark of the attack: quality vs the exact optimum (FC10), speed vs a scipy baseline (FC100-100-10).

Commands (2 CPU cores; models trained by ``train.get_or_train`` in --workdir on first use, restored after)::

    python scripts/bench/attack.py --workdir=runs/models --data_dir=../shared/data/mnist
    python scripts/bench/attack.py --workdir=/tmp/tiny --config=intriguing_jax/configs/bench_attack.py:tiny
    git worktree add /tmp/ref <older commit>          # side by side with an older engine, same inputs:
    python scripts/bench/attack.py --workdir=runs/models --data_dir=../shared/data/mnist \
        --config.parts="('convex','compare','budgets','batch')" --config.reference=/tmp/ref

Figures and their commands: BUILD_NOTES.md, "The attack at the machine's limit (issue 20)". The ``tiny``
preset (models trained 1 epoch on 2,000 images) checks the wiring in under a minute.
Parts and fields: intriguing_jax/configs/bench_attack.py.
"""

from intriguing_jax import cli
from intriguing_jax.attack import bench

FLAGS = cli.define_flags(
    "bench_attack", workdir_help="Trained models are kept here; figures go to <workdir>/bench_attack.json.")


def main(argv):
  cli.check_no_args(argv)
  figures = bench.run(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  cli.write_figures(FLAGS.workdir.value, "bench_attack", figures, FLAGS.config.value)


if __name__ == "__main__":
  cli.run(main)
