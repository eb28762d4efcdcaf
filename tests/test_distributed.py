"""Tests of intriguing_jax.distributed (and, sharded, metrics.predict, train.train_sweep and train.evaluate;
the sharded attack is tested in tests/test_distributed_attack.py).

Multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts, and
conftest.py has already imported JAX, so they run this file as a worker script in a subprocess
(``python tests/test_distributed.py <case> ...``) that asserts ``jax.device_count() == 4`` itself. The
multi-process check starts 2 processes x 2 CPU devices through ``jax.distributed.initialize`` (gloo
collectives on CPU). Those subprocess tests compile in fresh processes: they are marked slow.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import checkpoint
from intriguing_jax import distributed

_HERE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_HERE))


# ------------------------------------------------------------------------------------------------
# A tiny model shared by the tests and the workers.


def _params(seed=0, d=64, h=32, k=10):
  rng = np.random.RandomState(seed)
  return {"w1": (rng.randn(d, h) / np.sqrt(d)).astype(np.float32), "b1": np.zeros((h,), np.float32),
          "w2": (rng.randn(h, k) / np.sqrt(h)).astype(np.float32),
          "b2": (0.1 * rng.randn(k)).astype(np.float32)}


def mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"][None])
  return h @ params["w2"] + params["b2"][None]


def _data(n, seed=1):
  rng = np.random.RandomState(seed)
  return rng.rand(n, 8, 8, 1).astype(np.float32), rng.randint(0, 10, size=n).astype(np.int32)


def _logits_and_pred(params, x):
  logits = mlp(params, x)
  return {"logits": logits, "pred": jnp.argmax(logits, -1).astype(jnp.int32)}


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  return env


def run_worker(args, devices=4, timeout=240, extra_env=None):
  env = _env(devices)
  env.update(extra_env or {})
  return subprocess.run([sys.executable, _HERE] + [str(a) for a in args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=_ROOT)


def check_worker(proc):
  assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc.stdout


# ------------------------------------------------------------------------------------------------
# In-process (one device) tests.


def test_pad_and_unpad_round_trip():
  x, y = _data(5)
  padded = distributed.pad_batch((x, y), 8)
  assert padded[0].shape == (8, 8, 8, 1) and padded[1].shape == (8,)
  np.testing.assert_array_equal(padded[0][5:], np.repeat(x[:1], 3, axis=0))   # valid rows, no NaN
  back = distributed.unpad(padded, 5)
  np.testing.assert_array_equal(back[0], x)
  np.testing.assert_array_equal(back[1], y)
  with pytest.raises(ValueError, match="do not fit"):
    distributed.pad_batch(x, 4)


def _one_shot(fn, *batched, **kw):   # the whole set as one sharded chunk
  return distributed.stream_map(fn, *batched, chunk_size=batched[0].shape[0], **kw)


def test_stream_map_one_chunk_matches_direct_call_and_validates():
  params = _params()
  x, _ = _data(37)
  out = _one_shot(_logits_and_pred, x, broadcast=(params,))
  want = np.asarray(mlp(params, jnp.asarray(x)))
  assert out["logits"].shape == (37, 10)
  np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["pred"], np.argmax(want, -1))
  with pytest.raises(ValueError, match="disagree on the batch size"):
    distributed.stream_map(lambda a, b: a, x, x[:3])
  with pytest.raises(ValueError, match="empty example set"):
    distributed.stream_map(lambda a: a, x[:0])
  with pytest.raises(ValueError, match="chunk_size"):
    distributed.stream_map(lambda a: a, x, chunk_size=0)


def test_pick_chunk_size():
  assert distributed.pick_chunk_size(1000, num_devices=4, memory_bytes=10 ** 6, memory_fraction=0.5) == 2000
  assert distributed.pick_chunk_size(1000, num_devices=4, memory_bytes=10 ** 6, max_chunk_size=1001) == 1004
  assert distributed.pick_chunk_size(10 ** 9, num_devices=3, memory_bytes=10 ** 6) == 3   # >= 1 per device
  cpu = distributed.pick_chunk_size(1000, num_devices=2, memory_bytes=None)
  assert cpu == (distributed.DEFAULT_EXAMPLES_PER_DEVICE * 2 if distributed.device_memory_bytes() is None
                 else cpu)
  with pytest.raises(ValueError, match="memory_fraction"):
    distributed.pick_chunk_size(1000, memory_fraction=0.0)
  with pytest.raises(ValueError, match="bytes_per_example"):
    distributed.pick_chunk_size(0)


def test_estimate_bytes_per_example_grows_with_the_example():
  params = _params()
  x, _ = _data(1)
  small = distributed.estimate_bytes_per_example(_logits_and_pred, x, broadcast=(params,))
  big_x = np.zeros((1, 16, 16, 1), np.float32)
  big = distributed.estimate_bytes_per_example(_logits_and_pred, big_x, broadcast=(_params(d=256),))
  assert small >= x[0].nbytes            # at least its own input
  assert big > small


@contextlib.contextmanager
def _on_chunk(fn):
  """Calls fn(i, chunks_done) after stream_map computed and saved chunk i (a hook on its progress log)."""
  progress = distributed._progress

  def hook(plan, done, i=None, *args):
    progress(plan, done, i, *args)
    if i is not None:
      fn(i, done)

  distributed._progress = hook
  try:
    yield
  finally:
    distributed._progress = progress


def _stream(x, params, workdir, calls=None, **kw):
  kw.setdefault("chunk_size", 20)
  kw.setdefault("key", "mlp")
  with _on_chunk(lambda i, done: calls is not None and calls.append(i)):
    return distributed.stream_map(_logits_and_pred, x, broadcast=(params,), workdir=workdir, **kw)


def _chunk_files(workdir):
  return sorted(f for f in os.listdir(workdir) if f.startswith("chunk_"))


def test_stream_map_equals_one_shot_and_resumes(tmp_path):
  params = _params()
  x, _ = _data(103)
  one_shot = _one_shot(_logits_and_pred, x, broadcast=(params,))
  workdir = str(tmp_path / "stream")
  calls = []

  def crash_after_2(i, done):
    calls.append(i)
    if done == 2:
      raise KeyboardInterrupt("simulated crash")

  with pytest.raises(KeyboardInterrupt), _on_chunk(crash_after_2):
    distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=20, workdir=workdir,
                           key="mlp")
  assert calls == [0, 1]
  assert checkpoint.read_json(os.path.join(workdir, "progress.json"))["chunks_done"] == 2
  calls.clear()
  resumed = _stream(x, params, workdir, calls)
  assert calls == [2, 3, 4, 5]                        # only the missing chunks ran
  uninterrupted = distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=20)
  np.testing.assert_array_equal(resumed["logits"], uninterrupted["logits"])   # same chunks: bit-for-bit
  np.testing.assert_array_equal(resumed["pred"], one_shot["pred"])
  np.testing.assert_allclose(resumed["logits"], one_shot["logits"], rtol=1e-5, atol=1e-6)  # other batch shape
  calls.clear()
  again = _stream(x, params, workdir, calls)         # a finished stream is loaded, not recomputed
  assert calls == []
  np.testing.assert_array_equal(again["logits"], resumed["logits"])
  assert checkpoint.read_json(os.path.join(workdir, "progress.json"))["chunks_done"] == 6


def test_stream_map_recomputes_a_corrupted_chunk(tmp_path):
  params = _params()
  x, _ = _data(103)
  workdir = str(tmp_path / "stream")
  first = _stream(x, params, workdir)
  path = os.path.join(workdir, _chunk_files(workdir)[1])
  raw = bytearray(open(path, "rb").read())
  raw[-5] ^= 0xFF                                     # one flipped bit in the payload
  open(path, "wb").write(bytes(raw))
  calls = []
  again = _stream(x, params, workdir, calls)
  assert calls == [1]                                 # only the corrupted chunk ran again
  np.testing.assert_array_equal(again["logits"], first["logits"])
  open(path, "wb").write(b"")                         # truncated to nothing
  calls.clear()
  np.testing.assert_array_equal(_stream(x, params, workdir, calls)["logits"], first["logits"])
  assert calls == [1]


def test_stream_map_refuses_chunks_of_another_computation(tmp_path):
  params = _params()
  x, _ = _data(103)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  want = _stream(x, params, a)
  other_key = _stream(x, params, b, key="other")      # same inputs, another key (e.g. attack options)
  np.testing.assert_array_equal(other_key["logits"], want["logits"])
  name = _chunk_files(a)[2]
  with open(os.path.join(b, name), "rb") as f:        # chunk 2 of the other computation put in place
    foreign = f.read()
  with open(os.path.join(a, name), "wb") as f:
    f.write(foreign)
  calls = []
  np.testing.assert_array_equal(_stream(x, params, a, calls)["logits"], want["logits"])
  assert calls == [2]
  # Other parameters, other inputs: every chunk is recomputed; the results are those of a fresh run.
  calls.clear()
  other = _params(seed=1)
  got = _stream(x, other, a, calls)
  assert calls == [0, 1, 2, 3, 4, 5]
  np.testing.assert_array_equal(got["logits"], _stream(x, other, None)["logits"])
  calls.clear()
  np.testing.assert_array_equal(_stream(x[::-1], other, a, calls)["pred"],
                                _stream(x[::-1], other, None)["pred"])
  assert calls == [0, 1, 2, 3, 4, 5]
  # Another chunk size writes its own files; a longer example set reuses the chunks of its prefix.
  calls.clear()
  _stream(x, params, a, calls, chunk_size=40)
  assert calls == [0, 1, 2]
  calls.clear()
  x_long = np.concatenate([x[::-1], _data(30, seed=5)[0]])
  got = _stream(x_long, other, a, calls)
  assert calls == [5, 6]                              # chunk 5 was short before, chunk 6 is new
  np.testing.assert_array_equal(got["pred"], _stream(x_long, other, None)["pred"])


class _Result(NamedTuple):   # a NamedTuple output, like attack.AttackResult
  x_adv: np.ndarray
  success: np.ndarray
  c: np.ndarray


def test_stream_map_host_mode_keeps_namedtuples(tmp_path):
  x, _ = _data(7)

  def host_fn(xb):   # a host-level function returning a NamedTuple, like lbfgs_attack
    d = np.asarray(xb).reshape(xb.shape[0], -1)
    return _Result(x_adv=np.asarray(xb), success=d.mean(1) > 0.5, c=d.sum(1))

  first = distributed.stream_map(host_fn, x, chunk_size=3, jit=False, workdir=str(tmp_path))
  with _on_chunk(lambda i, d: pytest.fail("should be loaded from disk")):
    loaded = distributed.stream_map(host_fn, x, chunk_size=3, jit=False, workdir=str(tmp_path))
  assert isinstance(loaded, _Result)
  for u, v in zip(first, loaded):
    np.testing.assert_array_equal(u, v)
  np.testing.assert_array_equal(loaded.x_adv, x)


def test_initialize_without_settings_is_single_process(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    distributed.initialize()
  with pytest.raises(ValueError, match="process_id must be in"):
    distributed.initialize(num_processes=2, process_id=2)


# ------------------------------------------------------------------------------------------------
# Multi-device tests (subprocesses).


@pytest.mark.slow
def test_four_devices_sharded_equals_unsharded_and_resumes_after_kill(tmp_path):
  workdir = str(tmp_path / "stream")
  killed = run_worker(["resume", workdir, 2, str(tmp_path / "a.npz")])
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert checkpoint.read_json(os.path.join(workdir, "progress.json"))["chunks_done"] == 3
  out = check_worker(run_worker(["resume", workdir, -1, str(tmp_path / "b.npz")]))
  assert "ran chunks [3, 4, 5]" in out, out
  for marker in ("devices 4", "one chunk ok", "predict ok", "stream ok"):   # the resumed worker checks these
    assert marker in out, out
  got = np.load(str(tmp_path / "b.npz"))
  params = _params()
  x, _ = _data(1001)
  want = np.asarray(mlp(params, jnp.asarray(x)))
  np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["one_shot_logits"], got["logits"])   # same chunks: bit-for-bit


@pytest.mark.slow
def test_four_devices_sweep_and_evaluate(tmp_path):
  out = check_worker(run_worker(["sweep", str(tmp_path)]))
  for marker in ("sweep ok", "sweep resume ok", "evaluate ok"):
    assert marker in out, out


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(args):
  """Runs this file's worker ``args`` as 2 processes x 2 CPU devices; returns [(rc, stdout, stderr)]."""
  port = _free_port()
  env = _env(2)
  procs = []
  for i in range(2):
    e = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, _HERE] + list(args), env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=_ROOT))
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, stdout, stderr))
  return outs


@pytest.mark.slow
def test_two_processes_gather_without_loss_or_duplication(tmp_path):
  outs = run_two_processes(["multiprocess", str(tmp_path / "stream")])
  for i, (rc, stdout, stderr) in enumerate(outs):
    assert rc == 0, f"process {i} failed:\n{stdout}\n{stderr[-4000:]}"
    assert f"process {i} of 2, devices 4 ok" in stdout, stdout
  assert json.load(open(tmp_path / "stream" / "progress.json"))["chunks_done"] == 3


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("INTRIGUING_JAX_SLOW_TESTS") != "1",
                    reason="slow (2 processes compile a sweep twice); set INTRIGUING_JAX_SLOW_TESTS=1")
def test_two_processes_sweep_equals_one_device(tmp_path):
  outs = run_two_processes(["multiprocess_sweep", str(tmp_path / "sweep")])
  for i, (rc, stdout, stderr) in enumerate(outs):
    assert rc == 0, f"process {i} failed:\n{stdout}\n{stderr[-4000:]}"
    assert f"process {i} sweep ok" in stdout, stdout
  assert checkpoint.latest_step(tmp_path / "sweep" / "ckpt") == 1


# ------------------------------------------------------------------------------------------------
# Worker cases (run in a subprocess with forced CPU devices).


def _case_four_devices():
  from intriguing_jax import metrics  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  print("devices 4")
  params = _params()
  x, y = _data(1001)
  one = distributed.data_mesh(jax.devices()[:1])
  four = distributed.data_mesh()
  assert four.size == 4
  a = _one_shot(_logits_and_pred, x, broadcast=(params,), mesh=one)
  b = _one_shot(_logits_and_pred, x, broadcast=(params,), mesh=four)
  assert b["logits"].shape == (1001, 10)
  np.testing.assert_allclose(b["logits"], a["logits"], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(b["pred"], a["pred"])
  print("one chunk ok")

  pred = metrics.predict(mlp, params, x, batch_size=250)     # 250 -> 252 on 4 devices; ragged tail
  np.testing.assert_array_equal(pred, a["pred"])
  labels = a["pred"].copy()
  labels[:10] = (labels[:10] + 1) % 10
  assert metrics.error_rate(mlp, params, x, labels, batch_size=1000) == 10 / 1001
  print("predict ok")

  s = distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=300)
  np.testing.assert_array_equal(s["pred"], b["pred"])
  np.testing.assert_allclose(s["logits"], b["logits"], rtol=1e-6, atol=1e-7)
  print("stream ok")


def _case_resume(workdir, kill_after, out_path):
  assert jax.device_count() == 4, jax.devices()
  kill_after = int(kill_after)
  params = _params()
  x, _ = _data(1001)
  ran = []

  def on_chunk(i, done):
    ran.append(i)
    if i == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)       # a hard crash right after chunk i was saved

  with _on_chunk(on_chunk):
    res = distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=200, workdir=workdir,
                                 key="mlp")
  print(f"ran chunks {ran}")
  one_shot = distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=200)  # uninterrupted
  np.savez(out_path, logits=res["logits"], pred=res["pred"], one_shot_logits=one_shot["logits"])
  _case_four_devices()


def _tree_allclose(a, b, **kw):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    assert np.shape(u) == np.shape(v), (np.shape(u), np.shape(v))
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def _case_sweep(tmp):
  """train_sweep with k=3 members on 4 devices (ragged: one padding copy) == the 1-device sweep; its
  checkpoint holds the 3 real members (resumable on another device count); sharded train.evaluate."""
  from intriguing_jax import data, models, train  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  x, y = data.synthetic_mnist(256, seed=0, image_shape=(8, 8, 1))
  ex, ey = data.synthetic_mnist(101, seed=1, image_shape=(8, 8, 1))
  x, y, ex, ey = (np.asarray(a) for a in (x, y, ex, ey))
  model = models.get_model("fc16-16-10")
  cfg = train.TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2, eval_batch_size=50)
  kw = dict(weight_decays=[(1e-3,), (1e-1,), (1e-2,)], seeds=[0, 5, 9], data_seed=3, eval_data=(ex, ey))
  one = distributed.data_mesh(jax.devices()[:1])
  four = distributed.data_mesh()
  ref = train.train_sweep(model, x, y, cfg, mesh=one, **kw)
  got = train.train_sweep(model, x, y, cfg, mesh=four, **kw)
  assert len(got.variables) == 3 and jax.tree_util.tree_leaves(got.stacked_variables)[0].shape[0] == 3
  assert np.asarray(got.state.step).shape == (3,)                     # padding member dropped
  _tree_allclose(got.stacked_variables, ref.stacked_variables, rtol=1e-4, atol=1e-5)
  _tree_allclose(got.state.opt_state, ref.state.opt_state, rtol=1e-3, atol=1e-6)
  for hg, hr in zip(got.history, ref.history):
    assert np.shape(hg["loss"]) == (3,) and np.shape(hg["eval_error"]) == (3,)
    np.testing.assert_allclose(hg["loss"], hr["loss"], rtol=1e-4)
    assert np.max(np.abs(np.subtract(hg["eval_error"], hr["eval_error"]))) <= 1 / 101 + 1e-9  # <= one flip
  assert not np.allclose(got.variables[0]["params"]["output"]["kernel"],
                         got.variables[1]["params"]["output"]["kernel"])
  print("sweep ok")
  # Interrupted on 4 devices after epoch 1, resumed on 1 device: the checkpoint holds 3 members.
  workdir = os.path.join(tmp, "sweep")
  part = train.train_sweep(model, x, y, cfg, mesh=four, workdir=workdir, stop_after_epoch=1, **kw)
  assert np.asarray(part.state.epoch).tolist() == [1, 1, 1]
  restored, step = checkpoint.restore_checkpoint(os.path.join(workdir, "ckpt"))
  assert step == 1 and np.asarray(restored["step"]).shape == (3,)
  resumed = train.train_sweep(model, x, y, cfg, mesh=one, workdir=workdir, **kw)
  assert [h["epoch"] for h in resumed.history] == [1, 2]
  _tree_allclose(resumed.stacked_variables, ref.stacked_variables, rtol=1e-4, atol=1e-5)
  print("sweep resume ok")

  # train.evaluate with the evaluation batch sharded (50 -> 52 rows, ragged tail of 101 masked).
  params = ref.variables[0]["params"]
  count = jax.jit(lambda p, xb, yb: jnp.sum((jnp.argmax(model.apply({"params": p}, xb), -1) != yb)
                                            & (yb >= 0)))
  ey_noisy = ey.copy()
  ey_noisy[::7] = (ey_noisy[::7] + 1) % 10            # some errors to count, in every chunk
  want = float(np.mean(np.argmax(np.asarray(model.apply({"params": params}, ex)), -1) != ey_noisy))
  assert float(train.evaluate(count, params, ex, ey_noisy, 50)) == want
  assert float(train.evaluate(count, params, ex, ey_noisy, 50, mesh=four)) == want
  assert 0.1 < want < 0.9, want
  print("evaluate ok")


def _case_multiprocess(workdir):
  from intriguing_jax import metrics  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert distributed.initialize() is True
  pi, pc = jax.process_index(), jax.process_count()
  assert pc == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  params = _params()
  x, _ = _data(1001)
  want = np.asarray(mlp(params, jnp.asarray(x)))
  out = _one_shot(_logits_and_pred, x, broadcast=(params,))
  assert out["logits"].shape == (1001, 10)
  np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics.predict(mlp, params, x, batch_size=300), np.argmax(want, -1))
  seen = []

  def host_fn(xb):   # every process calls a host function on the whole padded chunk (SPMD)
    seen.append(xb.shape[0])
    return {"x": np.asarray(xb), "row_sum": np.asarray(xb).reshape(xb.shape[0], -1).sum(1)}

  s = distributed.stream_map(host_fn, x, chunk_size=400, jit=False, workdir=workdir)
  assert seen == [400, 400, 400], seen
  np.testing.assert_array_equal(s["x"], x)                  # all rows, in order, once
  seen.clear()
  again = distributed.stream_map(host_fn, x, chunk_size=400, jit=False, workdir=workdir)
  assert seen == [] and again["x"].shape == x.shape         # both processes agree to reuse every chunk
  s2 = distributed.stream_map(_logits_and_pred, x, broadcast=(params,), chunk_size=512)
  np.testing.assert_allclose(s2["logits"], want, rtol=1e-5, atol=1e-6)
  print(f"process {pi} of {pc}, devices {jax.device_count()} ok")


def _case_multiprocess_sweep(workdir):
  from intriguing_jax import data, models, train  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert distributed.initialize() is True and jax.device_count() == 4
  x, y = data.synthetic_mnist(128, seed=0, image_shape=(8, 8, 1))
  ex, ey = data.synthetic_mnist(37, seed=1, image_shape=(8, 8, 1))
  x, y, ex, ey = (np.asarray(a) for a in (x, y, ex, ey))
  model = models.get_model("fc16-16-10")
  cfg = train.TrainConfig(epochs=1, batch_size=32, learning_rate=1e-2, eval_batch_size=16)
  kw = dict(weight_decays=[(1e-3,), (1e-1,), (1e-2,)], seeds=[0, 5, 9], data_seed=3, eval_data=(ex, ey))
  # 3 members over the 4 global devices (2 per process), written by process 0 only.
  got = train.train_sweep(model, x, y, cfg, workdir=workdir, **kw)
  ref = train.train_sweep(model, x, y, cfg, mesh=distributed.data_mesh(jax.local_devices()[:1]), **kw)
  _tree_allclose(got.stacked_variables, ref.stacked_variables, rtol=1e-4, atol=1e-5)
  diff = np.subtract(got.history[0]["eval_error"], ref.history[0]["eval_error"])
  assert np.max(np.abs(diff)) <= 1 / 37 + 1e-9
  print(f"process {jax.process_index()} sweep ok")


if __name__ == "__main__":
  jax.config.update("jax_numpy_rank_promotion", "raise")
  _case = sys.argv[1]
  {"resume": _case_resume, "sweep": _case_sweep,
   "multiprocess": _case_multiprocess, "multiprocess_sweep": _case_multiprocess_sweep}[_case](*sys.argv[2:])
