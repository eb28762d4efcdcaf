r"""Benchmark of the attack against Foolbox 3's DDN, FMN and Carlini-Wagner L2 on the same weights and inputs.

FC100-100-10 (trained by ``train.get_or_train`` in --workdir on first use, restored after) is copied into
torch (``attack.peers.torch_mlp``, checked to give the JAX logits); our attack under several budgets and
each Foolbox attack (targeted, bounds (0, 1), minimisation mode) run on the first correctly classified test
images toward seeded random targets, and every output is re-scored by the JAX model with one success rule
and one RMS distortion. Printed per method: s/example, examples/s, success, mean RMS, the default's mean
RMS over the method's on the examples both solved, gradient evaluations per example, Pareto front.

torch and foolbox are never dependencies of the package or of CI: they live in an optional environment
(the torch 2.13.0 CPU wheel lies on this machine's disk; foolbox comes from PyPI)::

    python3 -m venv .venv-peers && .venv-peers/bin/pip install -e . torch==2.13.0 foolbox==3.3.4
    OPENBLAS_NUM_THREADS=1 .venv-peers/bin/python scripts/bench/peers.py --workdir=runs/models \
        --data_dir=../shared/data/mnist
    OPENBLAS_NUM_THREADS=1 .venv-peers/bin/python scripts/bench/peers.py --workdir=/tmp/peers_tiny \
        --data_dir=../shared/data/mnist --config=intriguing_jax/configs/bench_peers.py:tiny   # the wiring

Budgets, peers and presets: intriguing_jax/configs/bench_peers.py.
"""

from intriguing_jax import cli
from intriguing_jax.attack import peers

FLAGS = cli.define_flags(
    "bench_peers", workdir_help="Trained models are kept here; figures go to <workdir>/bench_peers.json.")


def main(argv):
  cli.check_no_args(argv)
  figures = peers.run(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)
  cli.write_figures(FLAGS.workdir.value, "bench_peers", figures, FLAGS.config.value)


if __name__ == "__main__":
  cli.run(main)
