"""MNIST summary (``scripts/mnist_summary.py``).

Fields: ``split`` (train, test or all); ``tfds_data_dir`` (the tfds data directory, tfds path only; "" =
tfds's default); ``tfds_manual_dir`` (build the tfds dataset offline from the IDX files in this directory;
"" = read the IDX files directly, or let tfds download). No presets.
"""

import ml_collections


def get_config(arg=None):
  """The config (``arg`` must be None: no presets)."""
  if arg is not None:
    raise ValueError(f"mnist_summary config: unknown preset {arg!r} (none defined)")
  return ml_collections.ConfigDict(dict(split="all", tfds_data_dir="", tfds_manual_dir=""))
