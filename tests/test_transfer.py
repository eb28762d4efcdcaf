"""Tests of intriguing_jax.transfer on tiny synthetic problems with tiny linear models.

The tests use a deterministic stand-in attack (a line search towards the target's class prototype), so they
check the experiment bookkeeping; the real L-BFGS attack is exercised by scripts/reproduce_mnist.py runs
(notes/tables.md) -- its compilation alone takes ~35 s on a loaded 2-core CPU, too slow for this file.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import data
from intriguing_jax import transfer
from intriguing_jax import transfer_report

SHAPE = (6, 6, 1)
K = 4  # classes


def _protos():
  rng = np.random.default_rng(1_000_003 + K)
  return (rng.uniform(size=(K,) + SHAPE) < 0.25).astype(np.float32)


def _linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None]


def _models(num=3):
  """name -> (apply_fn, params): template matchers w = prototypes + noise; separable on the synthetic data."""
  p = _protos().reshape(K, -1)
  out = {}
  for i in range(num):
    noise = np.random.default_rng(i).normal(0, 0.3, p.shape).astype(np.float32)
    w = (p - p.mean(0) + noise).T * (1.0 + i)
    out[f"m{i}"] = (_linear_apply, {"w": jnp.asarray(w), "b": jnp.zeros((K,), jnp.float32)})
  return out


def _data(n=24, seed=0):
  return data.synthetic_mnist(n, seed=seed, num_classes=K, image_shape=SHAPE)


class FakeResult(NamedTuple):
  x_adv: jax.Array
  success: jax.Array
  c: jax.Array
  distortion: jax.Array


class CountingAttack:
  """x_adv = x + t (proto[target] - x) with the smallest t on a grid that reaches the target."""

  def __init__(self, fail_every=0):
    self.calls = 0
    self.batch_sizes = []
    self.fail_every = fail_every

  def __call__(self, logits_fn, x, target, *, params=None, steps=65):
    self.calls += 1
    self.batch_sizes.append(x.shape[0])
    fn = functools.partial(logits_fn, params) if params is not None else logits_fn
    protos = jnp.asarray(_protos())
    ts = jnp.linspace(0.0, 1.0, steps)
    cand = x[None] + ts[:, None, None, None, None] * (protos[target][None] - x[None])  # [T, B, ...]
    hit = jax.vmap(lambda xc: jnp.argmax(fn(xc), -1) == target)(cand)  # [T, B]
    if self.fail_every:
      hit = hit & (jnp.arange(x.shape[0]) % self.fail_every != 0)[None]
    first = jnp.argmax(hit, axis=0)
    success = hit.any(axis=0)
    first = jnp.where(success, first, steps - 1)
    x_adv = jnp.where(success[:, None, None, None], cand[first, jnp.arange(x.shape[0])], x)  # failure: x
    d = jnp.sqrt(jnp.mean((x_adv - x).reshape(x.shape[0], -1) ** 2, axis=1))
    return FakeResult(x_adv, success, jnp.ones_like(d), d)


def _adv(models, n=24, attack=None, **kw):
  x, y = _data(n)
  targets = transfer.draw_targets(y, seed=0, num_classes=K)
  return transfer.adversarial_sets(models, x, y, targets, attack_fn=attack or CountingAttack(), chunk_size=8, **kw)


def test_targets_are_wrong_uniform_and_seeded():
  y = np.repeat(np.arange(10), 300).astype(np.int32)
  t = transfer.draw_targets(y, seed=3)
  assert t.dtype == np.int32 and t.shape == y.shape
  assert np.all(t != y) and t.min() >= 0 and t.max() <= 9
  np.testing.assert_array_equal(t, transfer.draw_targets(y, seed=3))
  assert not np.array_equal(t, transfer.draw_targets(y, seed=4))
  # For label 0 the 9 wrong labels are equally likely (300 draws: each ~33).
  counts = np.bincount(t[y == 0], minlength=10)
  assert counts[0] == 0 and counts[1:].min() > 15
  with pytest.raises(ValueError, match="labels"):
    transfer.draw_targets(np.array([0, 12]), num_classes=10)


def test_select_examples_prefix_and_validation():
  a = transfer.select_examples(100, 10, seed=1)
  b = transfer.select_examples(100, 30, seed=1)
  np.testing.assert_array_equal(a, b[:10])  # a larger request extends a smaller one
  assert len(set(b.tolist())) == 30
  np.testing.assert_array_equal(transfer.select_examples(5, None), np.arange(5))
  with pytest.raises(ValueError, match="num_examples"):
    transfer.select_examples(5, 6)


def test_run_attack_cached_resumes_and_invalidates(tmp_path):
  (apply_fn, params), = list(_models(1).values())
  x, y = _data(20)
  t = transfer.draw_targets(y, seed=0, num_classes=K)
  cache = str(tmp_path / "c")
  atk = CountingAttack()
  kw = dict(params=params, attack_fn=atk, cache_dir=cache, chunk_size=8, cache_key="m0")
  r1 = transfer.run_attack_cached(apply_fn, x, t, **kw)
  assert atk.calls == 3 and atk.batch_sizes == [8, 8, 8]  # ragged last chunk padded to the compiled size
  assert r1.x_adv.shape == x.shape and r1.success.shape == (20,)
  # Rerun: every chunk reused, identical results.
  r2 = transfer.run_attack_cached(apply_fn, x, t, **kw)
  assert atk.calls == 3
  for a, b in zip(r1, r2):
    np.testing.assert_array_equal(a, b)
  # An interruption that lost one chunk, and a corrupted chunk: only those are recomputed.
  (sub,) = os.listdir(cache)
  cache_sub = os.path.join(cache, sub)
  files = sorted(f for f in os.listdir(cache_sub) if f.startswith("chunk_"))
  assert len(files) == 3
  os.unlink(os.path.join(cache_sub, files[1]))
  with open(os.path.join(cache_sub, files[2]), "r+b") as f:
    f.seek(50)
    f.write(b"garbage")
  r3 = transfer.run_attack_cached(apply_fn, x, t, **kw)
  assert atk.calls == 5
  np.testing.assert_allclose(r3.distortion, r1.distortion)
  # Other settings (model key, options) never reuse stale chunks.
  transfer.run_attack_cached(apply_fn, x, t, **dict(kw, cache_key="other"))
  assert atk.calls == 8
  transfer.run_attack_cached(apply_fn, x, t, attack_options={"steps": 33}, **kw)
  assert atk.calls == 11
  # A larger set reuses the finished prefix chunks.
  x2, y2 = _data(20)
  xx = np.concatenate([x, x2[:4]])
  tt = np.concatenate([t, t[:4]])
  transfer.run_attack_cached(apply_fn, xx, tt, **kw)
  assert atk.calls == 12  # chunks [0,8) and [8,16) reused; [16,24) is new (other content)


def test_run_attack_cached_validates_before_attacking():
  atk = CountingAttack()
  x, y = _data(8)
  with pytest.raises(ValueError, match="targets must have shape"):
    transfer.run_attack_cached(lambda v: v, x, y[:3], attack_fn=atk)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    transfer.run_attack_cached(lambda v: v, x + 2.0, y, attack_fn=atk)
  with pytest.raises(ValueError, match="NaN"):
    transfer.run_attack_cached(lambda v: v, np.full_like(x, np.nan), y, attack_fn=atk)
  with pytest.raises(ValueError, match="chunk_size"):
    transfer.run_attack_cached(lambda v: v, x, y, attack_fn=atk, chunk_size=0)
  assert atk.calls == 0


def test_table1_rows_and_failures_reported():
  models = _models(3)
  x, y = _data(24)
  xt, yt = _data(16, seed=5)
  adv = _adv(models)
  rows = transfer.table1(models, (x, y), (xt, yt), adversarial=adv)
  assert [r["model"] for r in rows] == list(models)
  for r in rows:
    a = adv[r["model"]]
    assert r["success_rate"] == 1.0 and r["num_failed"] == 0 and r["num_attacked"] == 24
    assert r["av_min_distortion"] == pytest.approx(float(a.distortion.mean()))
    assert 0.0 < r["av_min_distortion"] < 1.0
    assert 0.0 <= r["train_error"] <= 1.0 and 0.0 <= r["test_error"] <= 1.0
  # Failures stay in the set and are counted (paper A7).
  adv_f = _adv(models, attack=CountingAttack(fail_every=4))
  rows_f = transfer.table1(models, (x, y), (xt, yt), adversarial=adv_f)
  assert rows_f[0]["num_failed"] == 6 and rows_f[0]["success_rate"] == pytest.approx(0.75)
  t2 = transfer.table2(models, adversarial=adv_f, seed=0)
  assert t2[0]["m0"] < 1.0  # the diagonal shows the failures


def test_table1_builds_its_own_sets_with_cache(tmp_path):
  models = _models(2)
  x, y = _data(24)
  atk = CountingAttack()
  kw = dict(num_examples=16, seed=0, attack_fn=atk, cache_dir=str(tmp_path), chunk_size=8)
  rows = transfer.table1(models, (x, y), (x, y), **kw)
  assert atk.calls == 4 and rows[0]["num_attacked"] == 16
  rows2 = transfer.table1(models, (x, y), (x, y), **kw)
  assert atk.calls == 4  # resumed from the cache
  assert rows2 == rows


def test_table2_matrix_and_noise_rows():
  models = _models(3)
  adv = _adv(models, n=32)
  rows = transfer.table2(models, adversarial=adv, noise_stddevs=(0.1, 0.3), seed=1)
  assert [r["kind"] for r in rows] == ["adversarial"] * 3 + ["noise"] * 2
  for r in rows[:3]:
    assert r[r["source"]] == 1.0  # every attack succeeded -> 100% error on the source model
    assert r["av_distortion"] == pytest.approx(float(adv[r["source"]].distortion.mean()))
  for r, s in zip(rows[3:], (0.1, 0.3)):
    assert r["stddev"] == s
    assert r["av_distortion"] == pytest.approx(s, rel=0.05)  # 32 x 36 pixels, unclipped noise
    assert all(0.0 <= r[m] <= 1.0 for m in models)
  # Plain error against the true labels (A9): recompute one cell by hand.
  a = adv["m0"]
  fn = functools.partial(*models["m1"])
  err = float(np.mean(np.argmax(np.asarray(fn(jnp.asarray(a.x_adv))), -1) != a.labels))
  assert rows[0]["m1"] == pytest.approx(err)
  with pytest.raises(ValueError, match="no set for model"):
    transfer.table2(models, adversarial={"m0": adv["m0"]})


def test_table3_and_table4():
  models = _models(3)
  (x1, y1), (x2, y2) = data.split_p1_p2(*_data(40))
  test = _data(24, seed=7)
  adv = _adv(models, n=24)
  rows3 = transfer.table3(models, (x1, y1), (x2, y2), test, adversarial=adv)
  assert [r["model"] for r in rows3] == list(models)
  assert all(set(r) >= {"error_p1", "error_p2", "error_test", "min_av_distortion"} for r in rows3)
  rows4 = transfer.table4(models, adversarial=adv, magnify_to=0.1, seed=0)
  kinds = [(r["kind"], r["block"]) for r in rows4]
  assert kinds == ([("adversarial", "upper")] * 3 + [("noise", "upper")] + [("magnified", "lower")] * 3
                   + [("noise", "lower")])
  mean_d = np.mean([r["av_distortion"] for r in rows4[:3]])
  assert rows4[3]["stddev"] == pytest.approx(mean_d)  # noise at the measured mean stddev (paper: 0.06)
  for r in rows4[4:7]:
    nz = adv[r["source"]].distortion > 0
    assert r["av_distortion"] == pytest.approx(0.1 * nz.mean(), rel=1e-4)  # rescaled to RMS 0.1 (A11)
    assert r["magnification"] > 0
  assert rows4[7]["stddev"] == 0.1
  rows4b = transfer.table4(models, adversarial=adv, noise_stddev=0.06)
  assert rows4b[3]["stddev"] == 0.06


def test_qualitative_claims_detect_holding_and_failing():
  t1 = [{"model": "FC10(10^-4)", "av_min_distortion": 0.06}, {"model": "FC10(10^-2)", "av_min_distortion": 0.1},
        {"model": "FC10(1)", "av_min_distortion": 0.14}]
  t2 = [{"row": "a", "kind": "adversarial", "source": "a", "a": 1.0, "b": 0.4, "av_distortion": 0.06},
        {"row": "b", "kind": "adversarial", "source": "b", "a": 0.3, "b": 1.0, "av_distortion": 0.07},
        {"row": "n", "kind": "noise", "source": None, "stddev": 0.1, "a": 0.05, "b": 0.02, "av_distortion": 0.1}]
  t4 = [{"row": "a", "kind": "adversarial", "block": "upper", "source": "a", "a": 1.0, "b": 0.1},
        {"row": "b", "kind": "adversarial", "block": "upper", "source": "b", "a": 0.08, "b": 1.0},
        {"row": "ma", "kind": "magnified", "block": "lower", "source": "a", "a": 1.0, "b": 0.6},
        {"row": "mb", "kind": "magnified", "block": "lower", "source": "b", "a": 0.5, "b": 1.0},
        {"row": "n", "kind": "noise", "block": "lower", "source": None, "stddev": 0.1, "a": 0.03, "b": 0.03}]
  claims = transfer_report.qualitative_claims({"table1": t1, "table2": t2, "table4": t4})
  assert len(claims) == 5 and all(c["holds"] for c in claims), claims
  t1_bad = [dict(r, av_min_distortion=0.2 - r["av_min_distortion"]) for r in t1]
  t2_bad = [dict(r) for r in t2]
  t2_bad[2]["a"] = t2_bad[2]["b"] = 0.9
  t2_bad[0]["a"] = 0.9
  claims = transfer_report.qualitative_claims({"table1": t1_bad, "table2": t2_bad})
  by = {c["claim"][:20]: c["holds"] for c in claims}
  assert list(by.values()) == [False, False, False]


def test_aggregate_rows_over_seeds():
  a = [{"model": "x", "err": 0.1, "n": 3}, {"model": "y", "err": 0.3, "n": 3}]
  b = [{"model": "x", "err": 0.3, "n": 3}, {"model": "y", "err": 0.5, "n": 3}]
  out = transfer_report.aggregate_rows([a, b], "model")
  assert out[0]["err"] == pytest.approx(0.2) and out[0]["err_std"] == pytest.approx(0.1)
  assert out[1]["model"] == "y" and out[1]["n"] == 3


def test_report_has_every_table_and_figures(tmp_path):
  models = _models(3)
  names = ["FC100-100-10", "FC123-456-10", "FC100-100-10'"]
  models = dict(zip(names, models.values()))
  x, y = _data(24)
  adv = _adv(models, n=24)
  results = {
      "table1": transfer.table1(models, (x, y), (x, y), adversarial=adv),
      "table2": transfer.table2(models, adversarial=adv),
      "table3": transfer.table3(models, (x, y), (x, y), (x, y), adversarial=adv),
      "table4": transfer.table4(models, adversarial=adv),
      "config": {"seeds": [0]}, "timings": {"total": 1.0},
  }
  results["claims"] = transfer_report.qualitative_claims(results)
  figs = transfer_report.save_figures(str(tmp_path), adv, models, prefix="t", num_pairs=12)
  assert len(figs) == 5  # fig7 a, b, c; triplets; histogram
  for rel, _ in figs:
    assert open(tmp_path / rel, "rb").read(4) == b"\x89PNG"
  md, html = transfer_report.build_report(results, figures=figs).write(str(tmp_path), "report")
  text = open(md).read()
  for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "qualitative claims", "Readings", "Figures"):
    assert heading in text, heading
  assert "0.062" in text and "26.2%" in text  # paper values beside ours (Table 3/4 names match the paper's)
  assert "Gaussian noise with stddev=0.1" in text
  assert text.count("![") == 5
  assert "data:image/png;base64" in open(html).read()


def test_report_functions_stay_reachable_from_transfer():
  # They moved to transfer_report; the old names resolve to the same functions, unknown names still fail.
  for name in ("qualitative_claims", "aggregate_rows", "save_figures", "build_report"):
    assert getattr(transfer, name) is getattr(transfer_report, name)
  with pytest.raises(AttributeError, match="no attribute 'tabel1'"):
    getattr(transfer, "tabel1")
