r"""Scale-out benchmark (``scripts/bench/scale.py``, ``scale.run``).

Presets (``--config=intriguing_jax/configs/scale.py:<preset>``): none, the throughput table at batch sizes
16, 64, 256 on the devices present; ``forced_cpu``, re-launched on 1, 2 and 4 forced CPU devices; ``gpu``,
batch sizes 1024, 4096, 16384; ``full``, every MNIST training image attacked once toward a seeded random
wrong label in resumable memory-sized chunks; ``smoke``, 4 examples and a 5-iteration attack (the test).

Fields: ``mode`` ("throughput" | "full"), ``model`` (a train recipe name), ``run_dir`` (a finished run to
attack; None: trained or restored in ``<workdir>/models``, or random weights in throughput mode without a
workdir), ``devices`` (forced CPU device counts; () = the devices present), ``batch_sizes``, ``repeats``
(timed calls after the compile call), ``num_examples`` (full: the first N; None = all), ``chunk_size``
(full; None = from device memory), ``max_chunk_size``, ``seed`` (targets), ``attack`` (every
``attack.AttackOptions`` field), e.g. ``--config.attack.maxiter=30``.
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
