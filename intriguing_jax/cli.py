"""The flag vocabulary every script shares: ``--config``, ``--workdir``, ``--data_dir``.

Usage (a whole script)::

    from absl import app
    from intriguing_jax import cli, units

    FLAGS = cli.define_flags("unit_analysis")     # --config defaults to intriguing_jax/configs/unit_analysis.py

    def main(argv):
      cli.check_no_args(argv)
      units.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)

    if __name__ == "__main__":
      cli.run(main)

``--config=intriguing_jax/configs/<name>.py:<preset>`` selects a preset; ``--config.a.b=v`` overrides one
field (unknown fields and wrong types are refused while the flags are parsed, before any work). ``--data_dir``
is the MNIST IDX directory; without it ``data.load_mnist`` reads ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from intriguing_jax import configs

_HELP = {"--help", "-h", "-?", "--helpshort", "--helpfull"}


class Flags(NamedTuple):
  """The holders of the three shared flags (read ``.value`` inside ``main``)."""
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  data_dir: flags.FlagHolder


def config_path(name: str) -> str:
  """Path of ``intriguing_jax/configs/<name>.py``; ValueError naming the known configs if absent."""
  path = os.path.join(os.path.dirname(configs.__file__), f"{name}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(os.path.dirname(path)) if f.endswith(".py") and f[0] != "_")
    raise ValueError(f"no config named {name!r}; known: {known}")
  return path


def define_flags(config_name: str, *, workdir_required: bool = True) -> Flags:
  """Defines ``--config`` (default: the named config), ``--workdir`` and ``--data_dir``."""
  config = config_flags.DEFINE_config_file(
      "config", config_path(config_name),
      f"Experiment config: intriguing_jax/configs/{config_name}.py[:preset]; override fields with "
      "--config.<field>=<value>.")
  workdir = flags.DEFINE_string("workdir", None, "Output directory; a rerun of the same command resumes there.")
  data_dir = flags.DEFINE_string(
      "data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR, else tfds).")
  if workdir_required:
    flags.mark_flag_as_required("workdir")
  return Flags(config, workdir, data_dir)


def check_no_args(argv: Sequence[str]) -> None:
  """Refuses positional arguments (a misspelt flag without ``--`` would otherwise be ignored)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def parse_flags(argv: Sequence[str]):
  """absl's parser, except that ``--help`` and its aliases print the usage and exit 0 (absl exits 1)."""
  if _HELP & set(argv[1:]):
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
    sys.exit(0)
  return app.parse_flags_with_usage(list(argv))


def run(main: Callable[[Sequence[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`."""
  app.run(main, flags_parser=parse_flags)
