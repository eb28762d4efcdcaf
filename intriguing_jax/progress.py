"""Progress reporting: absl log lines plus a JSON-lines metrics file in the workdir.

Usage::

    writer = progress.MetricWriter(workdir)          # appends to workdir/metrics.jsonl
    writer.write(step=epoch, train_loss=0.1, test_error=0.02)
    with progress.Timer() as t:
      ...
    logging.info("took %.1fs", t.seconds)

No ``print`` in the library: everything goes through absl logging; scripts may add tqdm bars.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

from absl import logging
import numpy as np


def _to_py(v: Any) -> Any:
  if isinstance(v, (np.generic,)):
    return v.item()
  if hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


def _fmt(key: str, value: Any) -> str:
  """One ``key=value`` of a log line; a list of numbers (one per sweep member) as ``mean [min, max] (n)``."""
  if isinstance(value, float):
    return f"{key}={value:.5g}"
  if (isinstance(value, list) and len(value) > 3 and
      all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
    a = np.asarray(value, np.float64)
    return f"{key}={np.mean(a):.5g} [{np.min(a):.5g}, {np.max(a):.5g}] ({a.size})"
  return f"{key}={value}"


class MetricWriter:
  """Logs metrics with absl and appends one JSON object per call to ``workdir/<filename>``.

  The JSON keeps every value; the log line shortens lists of more than 3 numbers (sweep members) to
  ``mean [min, max] (count)``.
  """

  def __init__(self, workdir: Optional[str], filename: str = "metrics.jsonl", prefix: str = ""):
    self.path = None
    self.prefix = prefix
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, filename)

  def write(self, **metrics: Any) -> None:
    record = {k: _to_py(v) for k, v in metrics.items()}
    record.setdefault("time", time.time())
    logging.info("%s%s", self.prefix, ", ".join(_fmt(k, v) for k, v in record.items() if k != "time"))
    if self.path:
      with open(self.path, "ab") as f:
        torn = f.tell() > 0 and _last_byte(self.path) != b"\n"   # a write cut off by a kill
        f.write(("\n" if torn else "").encode() + (json.dumps(record) + "\n").encode())
        f.flush()


def _last_byte(path: str) -> bytes:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """The records of a ``MetricWriter`` file in order; lines that are not JSON objects (a write cut off by a
  kill) are skipped. [] if the file does not exist."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, "rb") as f:
    for line in f:
      try:
        record = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


class Timer:
  """Context manager measuring wall time in seconds (``.seconds``)."""

  def __enter__(self) -> "Timer":
    self._start = time.perf_counter()
    self.seconds = 0.0
    return self

  def __exit__(self, *exc) -> None:
    self.seconds = time.perf_counter() - self._start


def log_run_start(workdir: Optional[str], flag_values: Any = None) -> None:
  """Shared script start-up: log devices and save the flags used to ``workdir/flags.txt``."""
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("JAX %s, backend %s, devices: %s", jax.__version__, jax.default_backend(), jax.devices())
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    if flag_values is not None:
      from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top
      text = getattr(flag_values, "flags_into_string", lambda: str(flag_values))()
      checkpoint.atomic_write_bytes(os.path.join(workdir, "flags.txt"),
                                    (" ".join(sys.argv) + "\n" + text).encode())
