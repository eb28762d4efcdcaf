"""The flag vocabulary every script shares: ``--config``, ``--workdir``, ``--data_dir``.

Usage (a whole script)::

    from intriguing_jax import cli, units

    FLAGS = cli.define_flags("unit_analysis")   # --config default: intriguing_jax/configs/unit_analysis.py

    def main(argv):
      cli.start(argv, FLAGS)                      # or cli.check_no_args(argv) where there is nothing to log
      units.run_experiment(FLAGS.config.value, FLAGS.workdir.value, FLAGS.data_dir.value)

    if __name__ == "__main__":
      cli.run(main)

``--config=intriguing_jax/configs/<name>.py:<preset>`` selects a preset; ``--config.a.b=v`` overrides one
field (unknown fields and wrong types are refused while the flags are parsed, before any work). ``--data_dir``
is the MNIST IDX directory; without it ``data.load_mnist`` reads ``$INTRIGUING_JAX_MNIST_DIR``, else tfds.
A benchmark prints its figures and, given ``--workdir``, writes them with :func:`write_figures`.
:func:`run` turns on JAX's persistent compilation cache (:func:`enable_compilation_cache`), so a second
invocation of a script with the same shapes loads its programs instead of compiling them, and keeps
OpenBLAS (JAX's CPU LAPACK) to one thread unless told otherwise (:func:`limit_lapack_threads`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
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


def define_flags(config_name: str, *, workdir_required: bool = True,
                 workdir_help: str = "Output directory; a rerun of the same command resumes there.") -> Flags:
  """Defines ``--config`` (default: the named config), ``--workdir`` and ``--data_dir``."""
  try:  # config_flags applies the --config.<field> overrides of sys.argv here already
    config = config_flags.DEFINE_config_file(
        "config", config_path(config_name), f"Experiment config: intriguing_jax/configs/{config_name}.py"
        "[:preset]; override fields with --config.<field>=<value>.")
  except (AttributeError, KeyError) as e:
    _exit_unknown_field(e, sys.argv)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  data_dir = flags.DEFINE_string(
      "data_dir", None, "MNIST IDX directory (default: $INTRIGUING_JAX_MNIST_DIR, else tfds).")
  if workdir_required:
    flags.mark_flag_as_required("workdir")
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  for holder in (config, workdir, data_dir):  # key flags of the script: listed by its --help
    flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller,
                                             flags.FLAGS[holder.name])
  return Flags(config, workdir, data_dir)


def check_no_args(argv: Sequence[str]) -> None:
  """Refuses positional arguments (a misspelt flag without ``--`` would otherwise be ignored)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def start(argv: Sequence[str], flags_: Flags, validate: Optional[Callable[[Any], Any]] = None) -> None:
  """An experiment script's start: :func:`check_no_args`, ``validate(config)`` (before the workdir is
  created), the config logged at ``--v=1``, the devices logged and the command and flags saved to
  ``<workdir>/flags.txt`` (``progress.log_run_start``)."""
  check_no_args(argv)
  if validate is not None:
    validate(flags_.config.value)
  logging.vlog(1, "config:\n%s", flags_.config.value)
  from intriguing_jax import progress  # pylint: disable=g-import-not-at-top  (imports jax)
  progress.log_run_start(flags_.workdir.value, flags.FLAGS)


def parse_flags(argv: Sequence[str]):
  """absl's parser, except that ``--help`` and its aliases print the usage and exit 0 (absl exits 1)."""
  if _HELP & set(argv[1:]):
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
    sys.exit(0)
  try:
    return app.parse_flags_with_usage(list(argv))
  except (AttributeError, KeyError) as e:  # config_flags' error for a field the config lacks
    _exit_unknown_field(e, argv)


def _exit_unknown_field(error: Exception, argv: Sequence[str]) -> None:
  field = str(error).strip("\"'")
  given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  sys.exit(f"FATAL Flags parsing error: unknown config field {field!r} among {given}; the fields are in the "
           "config file (--help shows its path)")


def write_figures(workdir: Optional[str], name: str, figures: Dict[str, Any], config: Any) -> None:
  """Writes a benchmark's figures and config to ``<workdir>/<name>.json`` (atomically); no workdir: no-op."""
  if workdir:
    from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top  (cli itself needs no jax)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"{name}.json")
    checkpoint.atomic_write_json(path, dict(figures, config=config.to_dict()))


DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "intriguing_jax", "jax_cache")


def enable_compilation_cache() -> Optional[str]:
  """Points JAX's persistent compilation cache at ``$JAX_COMPILATION_CACHE_DIR`` if that is set (empty:
  the cache stays off), else at ``~/.cache/intriguing_jax/jax_cache``; returns the directory (None: off).
  Programs that took under ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (JAX's default 1 s) to compile
  are not stored."""
  import jax  # pylint: disable=g-import-not-at-top  (cli itself needs no jax)
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  path = os.path.expanduser(DEFAULT_CACHE_DIR) if path is None else path
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
  return path or None


def limit_lapack_threads() -> None:
  """Sets ``OPENBLAS_NUM_THREADS=1`` unless it is set. JAX's CPU ``eigh``/``svd`` call scipy's OpenBLAS,
  loaded at the first such call; its spinning worker threads fight XLA's for the cores. With two processes
  on 2 cores, a FC100-100-10 epoch with the Lipschitz penalty took 22.9 s with OpenBLAS's default threads
  and 1.7 s with one (notes/lipschitz.md)."""
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def run(main: Callable[[Sequence[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`, after :func:`enable_compilation_cache` and
  :func:`limit_lapack_threads`."""
  enable_compilation_cache()
  limit_lapack_threads()
  app.run(main, flags_parser=parse_flags)
