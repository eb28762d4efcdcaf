r"""Benchmark of the attack: quality vs the exact optimum (FC10), speed vs a scipy baseline (FC100-100-10).

Commands (2 CPU cores; models trained by ``train.get_or_train`` in --workdir on first use, restored after)::

    python scripts/bench/attack.py --workdir=runs/models --data_dir=../shared/data/mnist
    python scripts/bench/attack.py --workdir=/tmp/tiny --config=intriguing_jax/configs/bench_attack.py:tiny
    python scripts/bench/attack.py --workdir=runs/models --config.parts=compare --config.num_baseline=0 \
        --config.num_compare=1000 --config.attack.num_slots=16      # throughput vs rows in flight

The default setting (models already trained) took about a minute on an idle 2-core machine and printed:
convex, the default attack at 1.00024x the exact optimum with 100 % success (refine=False, the paper's
method alone: 1.028x); compare, the attack at 261-286 examples/s against the scipy baseline's 19-20, 100 %
success for both, mean RMS ratio 0.991. Those figures were measured with the code before the redesign,
whose default path this one reproduces bit for bit (notes/attack.md, "Redesign"). The ``tiny`` preset
(models trained 1 epoch on 2,000 images) checks the wiring in under a minute (15 s once its models exist).
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
