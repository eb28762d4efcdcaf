r"""Scale-out benchmark (``scripts/bench/scale.py``, ``scale.run``).

Presets, chosen with ``--config=intriguing_jax/configs/scale.py:<preset>``:

* (none): the throughput table (examples/s of ``attack.lbfgs_attack``) at batch sizes 16, 64, 256 on the
  devices present.
* ``forced_cpu``: the same table re-launched on 1, 2 and 4 forced CPU devices.
* ``gpu``: the table at batch sizes 1024, 4096, 16384 (an accelerator).
* ``full``: the paper-scale attack: every MNIST training image attacked once toward a seeded random wrong
  label, streamed in resumable chunks sized to device memory.
* ``smoke``: a 4-example table with a 5-iteration attack (the end-to-end test of the script).

Fields: ``mode`` ("throughput" | "full"), ``model`` (``models.get_model`` / train recipe name),
``run_dir`` (a finished training run to attack; None: trained or restored in ``<workdir>/models``, or its
random initial weights in throughput mode without a workdir), ``devices`` (forced CPU device counts to
re-launch with; () = the devices present), ``batch_sizes``, ``repeats`` (timed calls per batch after the
compile call), ``num_examples`` (full mode: the first N training images; None = all), ``chunk_size`` (full
mode; None = from device memory), ``max_chunk_size``, ``seed`` (targets), ``attack`` (every
``attack.AttackOptions`` field, its defaults), e.g. ``--config.attack.maxiter=30``.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from intriguing_jax import attack


def get_config(arg=None):
  """The config of preset ``arg`` (None, "forced_cpu", "gpu", "full" or "smoke")."""
  c = ml_collections.ConfigDict()
  c.mode = "throughput"
  c.model = "fc100-100-10"
  c.run_dir = config_dict.placeholder(str)
  c.devices = ()
  c.batch_sizes = (16, 64, 256)
  c.repeats = 2
  c.num_examples = config_dict.placeholder(int)
  c.chunk_size = config_dict.placeholder(int)
  c.max_chunk_size = 10000
  c.seed = 0
  c.attack = ml_collections.ConfigDict(dataclasses.asdict(attack.AttackOptions()))
  if arg == "forced_cpu":
    c.devices = (1, 2, 4)
  elif arg == "gpu":
    c.batch_sizes = (1024, 4096, 16384)
  elif arg == "full":
    c.mode = "full"
  elif arg == "smoke":
    c.batch_sizes, c.repeats = (4,), 1
    c.attack.maxiter, c.attack.num_bisection, c.attack.refine = 5, 1, False
  elif arg:
    raise ValueError(f"scale config: unknown preset {arg!r}; known: forced_cpu, gpu, full, smoke")
  return c
