import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import checkpoint


def _tree():
  return {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}, "step": jnp.asarray(7)}


def test_round_trip_with_and_without_target(tmp_path):
  tree = _tree()
  checkpoint.save_pytree(tmp_path / "a.msgpack", tree)
  raw = checkpoint.load_pytree(tmp_path / "a.msgpack")
  np.testing.assert_array_equal(raw["params"]["w"], tree["params"]["w"])
  restored = checkpoint.load_pytree(tmp_path / "a.msgpack", target=jax_zeros_like(tree))
  np.testing.assert_array_equal(restored["params"]["b"], tree["params"]["b"])
  assert int(restored["step"]) == 7


def jax_zeros_like(tree):
  import jax
  return jax.tree.map(jnp.zeros_like, tree)


def test_corrupted_and_truncated_files_are_named(tmp_path):
  path = tmp_path / "c.msgpack"
  checkpoint.save_pytree(path, _tree())
  data = path.read_bytes()
  path.write_bytes(data[:-5])
  with pytest.raises(checkpoint.CheckpointError, match="c.msgpack.*checksum"):
    checkpoint.load_pytree(path)
  path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="not an intriguing_jax checkpoint"):
    checkpoint.load_pytree(path)
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    checkpoint.load_pytree(tmp_path / "missing.msgpack")


def test_checkpoint_dir_keeps_latest_and_last_pointer(tmp_path):
  d = tmp_path / "ckpt"
  assert checkpoint.restore_checkpoint(d, target=None) == (None, None)
  for step in (1, 2, 3):
    checkpoint.save_checkpoint(d, {"x": jnp.full((2,), step)}, step)
  assert checkpoint.all_steps(d) == [2, 3]
  assert (d / "LAST").read_text().strip() == "ckpt_00000003.msgpack"
  tree, step = checkpoint.restore_checkpoint(d)
  assert step == 3 and np.all(tree["x"] == 3)
  assert np.all(checkpoint.load_pytree(d / "ckpt_00000002.msgpack")["x"] == 2)
  (d / "LAST").write_bytes(b"\xd8\xff garbage")   # not UTF-8 (it raised UnicodeDecodeError): the newest file
  assert checkpoint.latest_step(d) == 3


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
  path = tmp_path / "r.json"
  checkpoint.atomic_write_json(path, {"a": 1})

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.atomic_write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def test_json_accepts_arrays(tmp_path):
  checkpoint.atomic_write_json(tmp_path / "j.json", {"e": np.float32(0.5), "v": jnp.arange(3)})
  assert checkpoint.read_json(tmp_path / "j.json") == {"e": 0.5, "v": [0, 1, 2]}


def test_guard_run_config_records_then_refuses_other_settings(tmp_path):
  checkpoint.guard_run_config(tmp_path, {"lr": 0.1, "seeds": [0]})
  checkpoint.guard_run_config(tmp_path, {"lr": 0.1, "seeds": [0]})  # same settings: fine
  with pytest.raises(ValueError, match=r"other settings \(lr\)"):
    checkpoint.guard_run_config(tmp_path, {"lr": 0.2, "seeds": [0]})


def test_written_files_honour_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    checkpoint.save_pytree(tmp_path / "p.msgpack", _tree())
    checkpoint.atomic_write_json(tmp_path / "r.json", {"a": 1})
    os.umask(0o027)
    checkpoint.save_checkpoint(tmp_path / "ckpt", _tree(), step=1)
  finally:
    os.umask(old)
  assert (tmp_path / "p.msgpack").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
  assert (tmp_path / "ckpt" / "ckpt_00000001.msgpack").stat().st_mode & 0o777 == 0o640


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
  d = tmp_path / "ckpt"
  for step in (1, 2):
    checkpoint.save_checkpoint(d, {"x": jnp.full((2,), step)}, step)
  latest = d / "ckpt_00000002.msgpack"
  latest.write_bytes(latest.read_bytes()[:-3])                      # truncated by a crash
  with caplog.at_level("WARNING"):
    tree, step = checkpoint.restore_checkpoint(d, target={"x": jnp.zeros((2,))})
  assert step == 1 and np.all(np.asarray(tree["x"]) == 1)
  assert any("checksum" in r.getMessage() and "step 1" in r.getMessage() for r in caplog.records)
  (d / "ckpt_00000001.msgpack").write_bytes(b"garbage")             # nothing intact left: a way out is named
  with pytest.raises(checkpoint.CheckpointError, match="delete that directory"):
    checkpoint.restore_checkpoint(d)


def test_restore_into_another_architecture_names_the_shapes(tmp_path):
  checkpoint.save_pytree(tmp_path / "a.msgpack", _tree())
  other = {"params": {"w": jnp.zeros((2, 4)), "b": jnp.zeros(3), "extra": jnp.zeros(1)}, "step": jnp.asarray(0)}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"\['params'\]\['w'\]: \(2, 3\) in the file, \(2, 4\) expected.*\['extra'\]: missing"):
    checkpoint.load_pytree(tmp_path / "a.msgpack", target=other)
