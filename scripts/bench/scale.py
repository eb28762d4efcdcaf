r"""Scale-out benchmark: attack throughput vs batch size and devices, and the paper-scale 60,000-image attack.

Throughput table on the devices present (FC100-100-10 with its random initial weights, MNIST test digits,
the default attack; a few minutes on 2 CPU cores; on an accelerator use ``:gpu``)::

    python scripts/bench/scale.py --config=intriguing_jax/configs/scale.py

The same table on 1, 2 and 4 forced CPU devices (one child process each; ~10 minutes on 2 cores)::

    python scripts/bench/scale.py --config=intriguing_jax/configs/scale.py:forced_cpu \
        --workdir=runs/bench_scale

The full attack: every training image attacked once by a trained FC100-100-10 (``--config.run_dir`` of
``scripts/train.py``, else trained or restored in ``<workdir>/models``), streamed in resumable chunks::

    python scripts/bench/scale.py --config=intriguing_jax/configs/scale.py:full --workdir=runs/scale \
        --config.run_dir=runs/models/fc100-100-10

Expected: 100 % success, mean RMS distortion 0.059 (paper Table 1: 0.058), about 22 s on one H200 and 6 min
on 2 CPU cores (notes/scale.md). A killed run continues from its last finished chunk. Prints the table or
the summary as JSON; with ``--workdir`` writes ``results.json`` there. MNIST comes from ``--data_dir``, else
``$INTRIGUING_JAX_MNIST_DIR``, else tfds. Multi-host: run the same command on every host with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set and a shared ``--workdir``.
"""

import json

from absl import app

from intriguing_jax import cli
from intriguing_jax import plotting
from intriguing_jax import scale

FLAGS = cli.define_flags(
    "scale", workdir_required=False,
    workdir_help="Models, the resumable attack stream and results.json (required in full mode).")
_COLUMNS = ["backend", "data", "devices", "batch", "examples_per_s", "seconds_per_batch",
            "examples_per_cpu_s", "first_call_s", "load_avg_1m", "success", "mean_distortion"]


def main(argv):
  cli.check_no_args(argv)
  config = FLAGS.config.value
  try:
    scale.validate(config)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = scale.run(config, FLAGS.workdir.value, FLAGS.data_dir.value)
  if config.mode == "full":
    print(json.dumps(results, indent=2))
  else:
    print(plotting.markdown_table(results["rows"], _COLUMNS, floatfmt=".3g"))


if __name__ == "__main__":
  cli.run(main)
