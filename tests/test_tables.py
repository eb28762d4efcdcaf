"""Tests of intriguing_jax.tables (pure tables), reproduce's attack cache and tables_report, on tiny models.

The adversarial sets come from a deterministic stand-in attack (a line search toward the target's class
prototype), so the tests check the tables and the bookkeeping; the real attack is tested in test_attack.py
and end to end by tests/test_reproduce_script.py.
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import attack
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import plotting
from intriguing_jax import reproduce
from intriguing_jax import tables
from intriguing_jax import tables_report
from intriguing_jax.tables import Model

SHAPE = (6, 6, 1)
K = 4  # classes


def _protos():
  rng = np.random.default_rng(1_000_003 + K)
  return (rng.uniform(size=(K,) + SHAPE) < 0.25).astype(np.float32)


def _linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None]


def _models(num=3):
  """name -> Model: template matchers w = prototypes + noise; separable on the synthetic data."""
  p = _protos().reshape(K, -1)
  out = {}
  for i in range(num):
    noise = np.random.default_rng(i).normal(0, 0.3, p.shape).astype(np.float32)
    w = (p - p.mean(0) + noise).T * (1.0 + i)
    out[f"m{i}"] = Model(_linear_apply, {"w": jnp.asarray(w), "b": jnp.zeros((K,), jnp.float32)})
  return out


def _data(n=24, seed=0):
  return data.synthetic_mnist(n, seed=seed, num_classes=K, image_shape=SHAPE)


class FakeResult(NamedTuple):
  x_adv: jax.Array
  success: jax.Array
  c: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 4))
def _toward_prototype(apply_fn, params, x, target, fail_every):
  """x_adv = x + t (proto[target] - x) with the smallest t of 65 that reaches the target."""
  ts = jnp.linspace(0.0, 1.0, 65)
  cand = x[None] + ts[:, None, None, None, None] * (jnp.asarray(_protos())[target][None] - x[None])
  hit = jax.vmap(lambda xc: jnp.argmax(apply_fn(params, xc), -1) == target)(cand)  # [T, B]
  if fail_every:
    hit = hit & (jnp.arange(x.shape[0]) % fail_every != 0)[None]
  success = hit.any(axis=0)
  x_adv = jnp.where(success[:, None, None, None], cand[jnp.argmax(hit, axis=0), jnp.arange(x.shape[0])], x)
  return FakeResult(x_adv, success, jnp.ones((x.shape[0],)))


class CountingAttack:
  """The attack API (``attack_fn(apply_fn, params, x, target, options=...)``) over _toward_prototype."""

  def __init__(self, fail_every=0):
    self.calls, self.batch_sizes, self.fail_every = 0, [], fail_every

  def __call__(self, apply_fn, params, x, target, options=attack.AttackOptions()):
    del options
    self.calls += 1
    self.batch_sizes.append(x.shape[0])
    return _toward_prototype(apply_fn, params, jnp.asarray(x), jnp.asarray(target), self.fail_every)


def _adv(models, n=24, atk=None, **kw):
  x, y = _data(n)
  targets = tables.draw_targets(y, seed=0, num_classes=K)
  return reproduce.adversarial_sets(models, x, y, targets, attack_fn=atk or CountingAttack(), chunk_size=8,
                                    **kw)


def test_targets_and_examples_are_seeded_and_unchanged():
  y = np.repeat(np.arange(10), 300).astype(np.int32)
  t = tables.draw_targets(y, seed=3)
  assert t.dtype == np.int32 and np.all(t != y) and t.min() >= 0 and t.max() <= 9
  assert not np.array_equal(t, tables.draw_targets(y, seed=4))
  counts = np.bincount(t[y == 0], minlength=10)  # the 9 wrong labels equally likely (~33 each)
  assert counts[0] == 0 and counts[1:].min() > 15
  # The exact draws of the published runs (seed 0): a change here changes every table.
  np.testing.assert_array_equal(tables.draw_targets(np.arange(10), seed=0), [8, 7, 7, 6, 7, 6, 7, 8, 0, 7])
  np.testing.assert_array_equal(tables.select_examples(60000, 5, seed=0), [4013, 23840, 29603, 43011, 58703])
  np.testing.assert_array_equal(tables.select_examples(100, 10, seed=1),
                                tables.select_examples(100, 30, seed=1)[:10])
  np.testing.assert_array_equal(tables.select_examples(5, None), np.arange(5))
  with pytest.raises(ValueError, match="labels"):
    tables.draw_targets(np.array([0, 12]), num_classes=10)
  with pytest.raises(ValueError, match="num_examples"):
    tables.select_examples(5, 6)


def test_attack_cached_resumes_recomputes_and_keys_on_settings(tmp_path):
  (model,) = _models(1).values()
  x, y = _data(20)
  t = tables.draw_targets(y, seed=0, num_classes=K)
  cache, atk = str(tmp_path / "c"), CountingAttack()
  run = lambda m=model, o=None, xs=x, ts=t: reproduce.attack_cached(m, xs, ts, options=o, cache_dir=cache,
                                                                    chunk_size=8, attack_fn=atk)
  r1 = run()
  assert atk.calls == 3 and atk.batch_sizes == [8, 8, 8]  # ragged last chunk padded to the compiled size
  np.testing.assert_allclose(r1.distortion, tables.rms(x, r1.x_adv))
  r2 = run()  # every chunk reused
  assert atk.calls == 3
  for a, b in zip(r1, r2):
    np.testing.assert_array_equal(a, b)
  files = sorted(f for f in os.listdir(cache) if f.startswith("chunk_"))
  os.unlink(os.path.join(cache, files[1]))
  with open(os.path.join(cache, files[2]), "r+b") as f:  # a corrupted chunk is recomputed, never trusted
    f.seek(50)
    f.write(b"garbage")
  np.testing.assert_allclose(run().distortion, r1.distortion)
  assert atk.calls == 5
  run(o=attack.AttackOptions(maxiter=7))  # other options: nothing reused
  assert atk.calls == 8
  run()  # (back to the first settings)
  assert atk.calls == 11
  other = Model(_linear_apply, jax.tree.map(lambda a: a * 2, model.params))
  run(m=other)  # other parameters: nothing reused
  assert atk.calls == 14
  assert reproduce.model_digest(other) != reproduce.model_digest(model)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    reproduce.attack_cached(model, x + 2.0, t, attack_fn=atk)
  with pytest.raises(ValueError, match="targets"):
    reproduce.attack_cached(model, x, t[:3], attack_fn=atk)
  assert atk.calls == 14


def test_table1_rows_and_failures_reported():
  models = _models(3)
  x, y = _data(24)
  adv = _adv(models)
  rows = tables.table1(models, adv, (x, y), _data(16, seed=5))
  assert [r["model"] for r in rows] == list(models)
  for r in rows:
    a = adv[r["model"]]
    assert r["success_rate"] == 1.0 and r["num_failed"] == 0 and r["num_attacked"] == 24
    assert r["av_min_distortion"] == pytest.approx(float(a.distortion.mean()))
    assert 0 < r["av_min_distortion"] < 1
    assert 0.0 <= r["train_error"] <= 1.0 and 0.0 <= r["test_error"] <= 1.0
  err = float(np.mean(np.argmax(np.asarray(_linear_apply(models["m1"].params, x)), -1) != y))
  assert rows[1]["train_error"] == pytest.approx(err)
  adv_f = _adv(models, atk=CountingAttack(fail_every=4))  # failures stay in the set and are counted (A7)
  rows_f = tables.table1(models, adv_f, (x, y), (x, y))
  assert rows_f[0]["num_failed"] == 6 and rows_f[0]["success_rate"] == pytest.approx(0.75)
  assert tables.table2(models, adv_f)[0]["m0"] < 1.0  # the diagonal shows the failures


def test_noisy_refuses_integer_images():
  # uint8 images failed inside jax with a dtype error; their scale is not the [0, 1] the noise rows assume.
  with pytest.raises(ValueError, match="float images"):
    tables.noisy(0, 0, np.zeros((2, 4), np.uint8), 0.1)
  x = np.zeros((2, 4), np.float32)
  np.testing.assert_array_equal(tables.noisy(0, 0, x, 0.1), tables.noisy(0, 0, x, 0.1))


def test_table2_matrix_and_noise_rows():
  models = _models(3)
  adv = _adv(models, n=32)
  rows = tables.table2(models, adv, noise_stddevs=(0.1, 0.3), seed=1)
  assert [r["kind"] for r in rows] == ["adversarial"] * 3 + ["noise"] * 2
  for r in rows[:3]:
    assert r[r["source"]] == 1.0  # every attack succeeded -> 100% error on the source model
    assert r["av_distortion"] == pytest.approx(float(adv[r["source"]].distortion.mean()))
  for r, s in zip(rows[3:], (0.1, 0.3)):
    assert r["stddev"] == s and r["av_distortion"] == pytest.approx(s, rel=0.05)  # unclipped noise
  a = adv["m0"]  # plain error against the true labels (A9), by hand
  err = float(np.mean(np.argmax(np.asarray(_linear_apply(models["m1"].params, a.x_adv)), -1) != a.labels))
  assert rows[0]["m1"] == pytest.approx(err)
  with pytest.raises(ValueError, match="no set for model"):
    tables.table2(models, {"m0": adv["m0"]})
  bad = dict(adv, m1=adv["m1"]._replace(labels=(adv["m1"].labels + 1) % K))
  with pytest.raises(ValueError, match="same examples"):
    tables.table2(models, bad)


def test_table3_and_table4():
  models = _models(3)
  (x1, y1), (x2, y2) = data.split_p1_p2(*_data(40))
  adv = _adv(models, n=24)
  rows3 = tables.table3(models, adv, (x1, y1), (x2, y2), _data(24, seed=7))
  assert [r["model"] for r in rows3] == list(models)
  assert all(set(r) >= {"error_p1", "error_p2", "error_test", "min_av_distortion"} for r in rows3)
  rows4 = tables.table4(models, adv, magnify_to=0.1, seed=0)
  assert [(r["kind"], r["block"], r.get("reading")) for r in rows4] == (
      [("adversarial", "upper", None)] * 3 + [("noise", "upper", None)] + [("magnified", "lower", "per_example")] * 3
      + [("magnified", "lower", "per_set")] * 3 + [("noise", "lower", None)])
  mean_d = np.mean([r["av_distortion"] for r in rows4[:3]])
  assert rows4[3]["stddev"] == pytest.approx(mean_d)  # noise at the measured mean stddev (paper: 0.06)
  for r in rows4[4:7]:
    d = adv[r["source"]].distortion
    assert r["av_distortion"] == pytest.approx(0.1 * (d > 0).mean(), rel=1e-4)  # each rescaled to RMS 0.1 (A11)
    assert r["magnification"] == pytest.approx(0.1 / d.mean())
    assert r["shrunk_fraction"] == pytest.approx((d > 0.1).mean())
  for r in rows4[7:10]:
    assert r["av_distortion"] == pytest.approx(0.1, rel=1e-4)  # one factor: the set's mean RMS becomes 0.1
  assert rows4[10]["stddev"] == 0.1
  assert tables.table4(models, adv, noise_stddev=0.06)[3]["stddev"] == 0.06
  only = tables.table4(models, adv, readings=("per_set",))
  assert [r.get("reading") for r in only if r["kind"] == "magnified"] == ["per_set"] * 3
  with pytest.raises(ValueError, match="readings"):
    tables.table4(models, adv, readings=("both",))


def test_magnify_readings():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(5, 6, 6, 1)).astype(np.float32)
  r = rng.normal(size=x.shape).astype(np.float32) * np.array([0.01, 0.03, 0.05, 0.2, 0.3])[:, None, None, None]
  d = tables.rms(x, x + r)
  each = tables.magnify(x, x + r, 0.1, "per_example")
  np.testing.assert_allclose(tables.rms(x, each), 0.1, rtol=1e-4)
  one = tables.magnify(x, x + r, 0.1, "per_set")
  np.testing.assert_allclose(one - x, r * (0.1 / d.mean()), atol=1e-5)   # the same factor for every example
  assert tables.rms(x, one).mean() == pytest.approx(0.1, rel=1e-4)
  clipped = tables.magnify(x, x + r, 0.1, "per_set", clip=True)
  assert clipped.min() >= 0.0 and clipped.max() <= 1.0 and not np.array_equal(clipped, one)
  with pytest.raises(ValueError, match="reading"):
    tables.magnify(x, x + r, 0.1, "average")
  with pytest.raises(ValueError, match="magnify_to"):
    tables.magnify(x, x + r, 0.0, "per_set")


def test_magnified_diagonal_splits_shrunk_and_grown_examples():
  """A linear model attacked to just past its boundary: rescaling a perturbation below its attack size
  undoes the attack; growing it keeps it (linear logits). The breakdown must show exactly that."""
  models = _models(1)
  adv = _adv(models, n=24)
  a = adv["m0"]
  rows = tables.magnified_diagonal(models, adv, magnify_to=float(np.median(a.distortion)),
                                   readings=("per_example",), clips=(False,))
  (r,) = rows
  shrunk = a.distortion > np.median(a.distortion)
  assert r["shrunk_fraction"] == pytest.approx(shrunk.mean())
  pred = metrics.predict(models["m0"].apply_fn, models["m0"].params,
                         tables.magnify(a.x, a.x_adv, float(np.median(a.distortion)), "per_example"))
  wrong = pred != a.labels
  assert r["error"] == pytest.approx(wrong.mean())
  assert r["error_shrunk"] == pytest.approx(wrong[shrunk].mean())
  assert r["error_grown"] == pytest.approx(wrong[~shrunk].mean())
  assert r["error_grown"] == 1.0 and r["error_shrunk"] < 1.0
  assert r["pred_true"] == pytest.approx(1.0 - r["error"])
  assert len(tables.magnified_diagonal(models, adv)) == 4   # 2 readings x 2 clips x 1 model


def test_qualitative_claims_detect_holding_and_failing():
  t1 = [{"model": "FC10(10^-4)", "av_min_distortion": 0.06},
        {"model": "FC10(10^-2)", "av_min_distortion": 0.1}, {"model": "FC10(1)", "av_min_distortion": 0.14}]
  t2 = [{"row": "a", "kind": "adversarial", "source": "a", "a": 1.0, "b": 0.4, "av_distortion": 0.06},
        {"row": "b", "kind": "adversarial", "source": "b", "a": 0.3, "b": 1.0, "av_distortion": 0.07},
        {"row": "n", "kind": "noise", "source": None, "stddev": 0.1, "a": 0.05, "b": 0.02,
         "av_distortion": 0.1}]
  t4 = [{"row": "a", "kind": "adversarial", "block": "upper", "source": "a", "a": 1.0, "b": 0.1},
        {"row": "b", "kind": "adversarial", "block": "upper", "source": "b", "a": 0.08, "b": 1.0},
        {"row": "ma", "kind": "magnified", "block": "lower", "source": "a", "a": 1.0, "b": 0.6},
        {"row": "mb", "kind": "magnified", "block": "lower", "source": "b", "a": 0.5, "b": 1.0},
        {"row": "n", "kind": "noise", "block": "lower", "source": None, "stddev": 0.1, "a": 0.03, "b": 0.03}]
  claims = tables_report.qualitative_claims({"table1": t1, "table2": t2, "table4": t4})
  assert len(claims) == 5 and all(c["holds"] for c in claims), claims
  t1_bad = [dict(r, av_min_distortion=0.2 - r["av_min_distortion"]) for r in t1]
  t2_bad = [dict(r) for r in t2]
  t2_bad[2]["a"] = t2_bad[2]["b"] = 0.9
  t2_bad[0]["a"] = 0.9
  claims = tables_report.qualitative_claims({"table1": t1_bad, "table2": t2_bad})
  assert [c["holds"] for c in claims] == [False, False, False]


def test_aggregate_rows_over_seeds():
  a = [{"model": "x", "err": 0.1, "n": 3}, {"model": "y", "err": 0.3, "n": 3}]
  b = [{"model": "x", "err": 0.3, "n": 3}, {"model": "y", "err": 0.5, "n": 3}]
  out = tables_report.aggregate_rows([a, b], "model")
  assert out[0]["err"] == pytest.approx(0.2) and out[0]["err_std"] == pytest.approx(0.1)
  assert out[1]["model"] == "y" and out[1]["n"] == 3


@pytest.mark.slow
def test_report_has_every_table_and_figures(tmp_path, monkeypatch):
  names = ["FC100-100-10", "FC123-456-10", "FC100-100-10'"]
  models = dict(zip(names, _models(3).values()))
  x, y = _data(24)
  adv = _adv(models, n=24)
  results = {"table1": tables.table1(models, adv, (x, y), (x, y)), "table2": tables.table2(models, adv),
             "table3": tables.table3(models, adv, (x, y), (x, y), (x, y)),
             "table4": tables.table4(models, adv), "config": {"seeds": [0]}, "timings": {"total": 1.0}}
  results["claims"] = tables_report.qualitative_claims(results)
  drawn, save = [], plotting._save_figure
  monkeypatch.setattr(plotting, "_save_figure", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
  figs = tables_report.save_figures(str(tmp_path), adv, models, prefix="t", num_pairs=12)
  assert len(figs) == 5 and len(drawn) == 5  # fig7 a, b, c; triplets; distortion CDFs
  for rel, _ in figs:
    assert open(tmp_path / rel, "rb").read(4) == b"\x89PNG"
  a, nm = adv[names[0]], names[0]
  pred = metrics.predict(*models[nm], a.x_adv[:12])
  under = [ax.get_xlabel() for ax in drawn[0].axes]  # Figure 7(a): one label under each of the 12 pairs
  assert under[1::2] == [f"true {y} > target {t}\npred {p}" for y, t, p in zip(a.labels, a.targets, pred)]
  assert under[0::2] == [f"true {y}" for y in a.labels[:12]]
  diffs = [ax.images[0] for ax in drawn[3].axes if ax.images and ax.images[0].get_cmap().name == "RdBu_r"]
  vmax = max(float(np.abs(adv[n].x_adv[:2] - adv[n].x[:2]).max()) for n in names)
  assert len(diffs) == 6 and all(im.norm.vmin == -im.norm.vmax == pytest.approx(-vmax) for im in diffs)
  assert len(drawn[4].axes[0].lines) == 3 and drawn[4].axes[0].get_legend() is not None
  md, html = tables_report.build_report(results, figures=figs).write(str(tmp_path), "report")
  text = open(md).read()
  for heading in ("Table 1", "Table 2", "Table 3", "Table 4", "qualitative claims", "Readings", "Figures"):
    assert heading in text, heading
  assert "/ 0.062 |" in text and "/ 26.2% |" in text  # paper values beside ours (names match the paper's)
  assert "/ 2.2% |" in text and "/ 43% |" in text  # Table 4's noise and magnified rows matched to the paper
  assert "Gaussian noise with stddev=0.1" in text and text.count("![") == 5
  assert "data:image/png;base64" in open(html).read()
