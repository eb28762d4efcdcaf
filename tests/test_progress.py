"""Tests of intriguing_jax.progress.MetricWriter: full values in the JSON lines, short log lines."""

import json
import logging

from intriguing_jax import progress


def test_metric_writer_keeps_every_value_and_shortens_member_lists_in_the_log(tmp_path, caplog):
  writer = progress.MetricWriter(str(tmp_path), prefix="[t] ")
  losses = [0.5, 0.25, 0.75, 1.0, 0.5]
  with caplog.at_level(logging.INFO):
    writer.write(epoch=3, loss=losses, err=0.0123456, pair=[1.0, 2.0], flags=[True, False, True, True])
  record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["loss"] == losses and record["epoch"] == 3 and "time" in record
  line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[t] ")][-1]
  assert "loss=0.6 [0.25, 1] (5)" in line
  assert "err=0.012346" in line and "pair=[1.0, 2.0]" in line  # short lists stay whole
  assert "flags=[True, False, True, True]" in line  # booleans are not averaged


def test_a_write_cut_off_by_a_kill_costs_only_its_own_record(tmp_path):
  writer = progress.MetricWriter(str(tmp_path))
  writer.write(epoch=1, loss=0.5)
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(path.read_bytes() + b'{"epoch": 2, "lo')   # killed half-way through a line
  writer.write(epoch=2, loss=0.25)                              # the resumed run: on a line of its own
  records = progress.read_metrics(str(path))
  assert [(r["epoch"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]
  assert progress.read_metrics(str(tmp_path / "missing.jsonl")) == []
