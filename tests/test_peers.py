"""Tests of intriguing_jax.attack.peers (the Foolbox comparison) and its config.

The config and ``rescore`` need neither torch nor foolbox; the torch copy of a SigmoidMLP and a
Foolbox call are skipped where those optional packages are absent (scripts/bench/peers.py says how to make
the environment that has them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from intriguing_jax import models
from intriguing_jax.attack import bench, peers
from intriguing_jax.configs import bench_peers


def test_config_presets_validate_and_tiny_drops_the_long_peers():
  full, tiny = bench_peers.get_config(), bench_peers.get_config("tiny")
  peers.validate(full)
  assert bench.reference_budget(full.budgets) == "default" and set(full.budgets) == {
      "default", "refine=False", "num_bisection=0", "num_bisection=6", "maxiter=20"}
  assert (tiny.num_examples, tiny.repeats) == (10, 1)
  assert set(tiny.peers) == {"ddn (defaults)", "fmn (defaults)"}
  assert {"ddn 1000 steps", "cw 9x1000"} <= set(full.peers)
  with pytest.raises(ValueError, match="unknown preset 'bogus'"):
    bench_peers.get_config("bogus")


@pytest.mark.parametrize("field, entry, match", [
    ("peers", {"method": "pgd"}, "unknown method 'pgd'"),
    ("peers", {"steps": 3}, "unknown method None"),
    ("peers", {"method": "ddn", "binary_search_steps": 3}, r"ddn takes no \['binary_search_steps'\]"),
    ("budgets", {"maxiterr": 3}, "budget 'bad'"),
    ("budgets", {"penalty": "l3"}, "budget 'bad'.*penalty"),
])
def test_validate_refuses_bad_entries_by_name(field, entry, match):
  c = bench_peers.get_config("tiny")
  c[field] = dict(c[field].to_dict(), bad=entry)
  with pytest.raises(ValueError, match=match):
    peers.validate(c)
  if field == "peers":
    with pytest.raises(ValueError, match="peer 'bad'"):
      peers.validate(c)


def test_validate_refuses_a_model_without_a_torch_copy_and_empty_counts():
  c = bench_peers.get_config("tiny")
  c.model = "mnist_conv"
  with pytest.raises(ValueError, match="not a SigmoidMLP"):
    peers.validate(c)
  c = bench_peers.get_config("tiny")
  c.num_examples = 0
  with pytest.raises(ValueError, match="num_examples"):
    peers.validate(c)
  c = bench_peers.get_config("tiny")
  c.repeat_below_s = -1.0
  with pytest.raises(ValueError, match="repeat_below_s"):
    peers.validate(c)


def test_methods_are_timed_in_rounds_and_the_median_kept():
  calls = []

  def timer(name, seconds):
    def timed():
      calls.append(name)
      return seconds.pop(0)
    return timed

  methods = {"ours": dict(times_s=[9.0]), "ddn": dict(times_s=[1.0]), "cw": dict(times_s=[50.0])}
  timers = {"ours": timer("ours", [2.0, 3.0]), "ddn": timer("ddn", [1.5, 4.0])}   # cw: timed once
  peers._time_in_rounds(2, 10, methods, timers)
  assert calls == ["ours", "ddn", "ours", "ddn"]   # one call of each per round, in turn
  assert [methods[k]["timed_calls"] for k in ("ours", "ddn", "cw")] == [3, 3, 1]
  np.testing.assert_allclose([methods[k]["s_per_example"] for k in ("ours", "ddn", "cw")], [0.3, 0.15, 5.0])
  assert methods["ddn"]["examples_per_s"] == pytest.approx(10 / 1.5)


def _linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["kernel"] + params["bias"][None, :]


def test_rescore_applies_the_margin_the_box_and_the_rms():
  # 4 pixels, 3 classes: logit j = pixel j (class 2 also reads pixel 3).
  params = {"kernel": jnp.array([[1., 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]), "bias": jnp.zeros(3)}
  x = np.full((5, 2, 2, 1), 0.5, np.float32)
  target = np.array([0, 0, 1, 2, 1])
  x_adv = x.copy().reshape(5, 4)
  x_adv[0] = [0.9, 0.5, 0.3, 0.1]          # z = (0.9, 0.5, 0.4): target 0 wins by 0.4
  x_adv[1] = [0.5005, 0.5, 0.25, 0.25]     # target 0 wins by 5e-4 only: below the margin
  x_adv[2] = [0.2, 1.0 + 1e-3, 0.2, 0.2]   # target 1 wins but leaves the box
  x_adv[3] = [0.1, 0.2, 0.6, -5e-7]        # target 2 wins, within the box's tolerance
  x_adv[4] = [0.5, 0.5, 0.5, 0.5]          # class 2 wins: a failure
  ok, d = peers.rescore(_linear_apply, params, x, target, x_adv.reshape(x.shape))
  np.testing.assert_array_equal(ok, [True, False, False, True, False])
  r = x_adv - 0.5
  np.testing.assert_allclose(d, np.sqrt(np.mean(r.astype(np.float64) ** 2, axis=1)), rtol=1e-6)
  assert d[4] == 0.0
  ok0, _ = peers.rescore(_linear_apply, params, x, target, x_adv, success_margin=0.0)  # flat x_adv too
  np.testing.assert_array_equal(ok0, [True, True, False, True, False])


def _random_sigmoid_mlp(widths, input_shape, num_classes=4):
  model = models.SigmoidMLP(widths=widths, num_classes=num_classes)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1,) + input_shape))
  variables = jax.tree.map(lambda a: 3 * a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                           variables)   # non-zero biases, far from identity-like weights
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (6,) + input_shape))
  return model, variables, x


@pytest.mark.parametrize("widths", [(), (5, 7), (3, 4, 6)])
def test_torch_mlp_reproduces_the_flax_logits(widths):
  torch = pytest.importorskip("torch")
  model, variables, x = _random_sigmoid_mlp(widths, (4, 3, 2))   # H != W != C: checks the flatten order
  net = peers.torch_mlp(variables)
  with torch.no_grad():
    got = net(torch.from_numpy(x)).numpy()
  want = np.asarray(model.apply(variables, x))
  assert got.dtype == np.float32 and not net.training
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(want).max() > 1.0   # not a vacuous comparison


def test_torch_mlp_refuses_other_parameters():
  pytest.importorskip("torch")
  _, variables, _ = _random_sigmoid_mlp((5,), (4, 3, 2))
  params = dict(variables["params"], hidden_2=variables["params"]["hidden_0"])   # a gap: hidden_1 missing
  with pytest.raises(ValueError, match="not SigmoidMLP parameters"):
    peers.torch_mlp({"params": params})


def test_run_foolbox_returns_rescorable_points_and_the_budget():
  pytest.importorskip("torch")
  pytest.importorskip("foolbox")
  model, variables, x = _random_sigmoid_mlp((8,), (3, 3, 1))
  pred = np.asarray(model.apply(variables, x)).argmax(1)
  target = (pred + 1) % 4
  net = peers.torch_mlp(variables)
  x_adv, seconds = peers.run_foolbox(net, x, target, "ddn", steps=20)
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32 and seconds > 0
  ok, d = peers.rescore(model.apply, variables, x, target, x_adv, success_margin=0.0)
  assert ok.any() and np.all(d[ok] > 0)
  assert peers.gradient_evals("ddn", steps=20) == 20
  assert peers.gradient_evals("cw", binary_search_steps=3, steps=7) == 21
  assert peers.gradient_evals("fmn") == peers.make_attack("fmn").steps   # Foolbox's default


def test_get_config_validates_its_preset(monkeypatch):
  def refuse(config):
    raise ValueError(f"validated {config.num_examples}")
  monkeypatch.setattr(peers, "validate", refuse)
  with pytest.raises(ValueError, match="validated 10"):
    bench_peers.get_config("tiny")
