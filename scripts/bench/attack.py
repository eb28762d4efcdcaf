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

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from intriguing_jax import checkpoint
from intriguing_jax import configs
from intriguing_jax import progress
from intriguing_jax.attack import bench

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "bench_attack.py"),
    "Benchmark config (intriguing_jax/configs/bench_attack.py[:tiny]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/models",
                               "Trained models are kept here; figures go to <workdir>/bench_attack.json.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR, "
                                "then tfds).")


def main(argv):
  del argv
  figures = bench.run(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
  checkpoint.atomic_write_json(os.path.join(_WORKDIR.value, "bench_attack.json"),
                               dict(figures, config=_CONFIG.value.to_dict()))


if __name__ == "__main__":
  app.run(main, flags_parser=progress.parse_flags)
