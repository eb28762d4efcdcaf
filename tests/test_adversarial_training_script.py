"""End-to-end test of scripts/adversarial_training.py on tiny synthetic IDX files, in a subprocess.

A subprocess (not an in-process ``main``) because the script defines absl flags (``--workdir``, ``--seed``,
...) that other scripts under test define too. Covers: flag wiring, the three runs, the real L-BFGS
distortion attack and the generation timing, results.json/report, restoring finished runs on a rerun,
refusing a finished run with other settings, and clear errors for impossible flag combinations.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from intriguing_jax import checkpoint

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "adversarial_training.py"

# 512 training images at batch 64: 8 steps per epoch; the pool (32 examples, 8 per refresh) is filled after
# 4 clean steps and refreshed every 2 steps.
_TINY = ["--epochs=2", "--batch_size=64", "--warmup_epochs=0.5", "--pool_layers=input", "--pool_size=32",
         "--refresh_every=2", "--refresh_fraction=0.25", "--mix_ratio=0.2", "--pool_maxiter=3",
         "--pool_rms=0.05", "--pool_untargeted", "--nopool_refine", "--adv_dropout", "--num_attack=4",
         "--attack_maxiter=5", "--attack_bisection=1", "--chunk_size=4", "--learning_rate=0.01"]


def _run(*args, env=None):
  env = dict(os.environ if env is None else env)
  env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, str(_SCRIPT), *args], capture_output=True, text=True, env=env,
                        timeout=900)


def test_script_end_to_end_and_resume(synthetic_idx_dir, tmp_path):
  workdir = str(tmp_path / "adv")
  args = [f"--workdir={workdir}", f"--data_dir={synthetic_idx_dir}", *_TINY]
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.load(open(os.path.join(workdir, "results.json")))
  assert res["evaluation_set"] == "test"
  assert set(res["summary"]) == {"weight_decay", "dropout", "adversarial"}
  for row in res["summary"].values():
    assert 0.0 <= row["test_error"] <= 1.0 and row["num_common"] <= 4
    assert row["attack_success"] in (0.0, 0.25, 0.5, 0.75, 1.0)
  # The flags reached the pool configuration and the attack.
  pc = res["pool_config"]
  assert (pc["layers"], pc["pool_size"], pc["refresh_every"], pc["maxiter"], pc["refine"]) == (
      ["input"], 32, 2, 3, False)
  assert pc["warmup_steps"] == 4 and pc["perturbation_rms"] == 0.05 and pc["untargeted"] is True
  assert res["attack_options"] == {"maxiter": 5, "num_bisection": 1}
  timing = res["generation_timing"]
  assert timing["refresh_size"] == 8 and timing["refreshes_per_epoch"] == 4.0
  assert timing["seconds_per_refresh"] > 0 and 0 < timing["generation_share_of_epoch"]
  # The in-run measure against the run trained the same way without pools (dropout, as --adv_dropout is on).
  assert timing["reference_run"] == "dropout" and timing["reference_median_epoch_seconds"] > 0
  assert timing["pool_share_of_epoch_vs_reference"] == pytest.approx(
      1 - timing["reference_median_epoch_seconds"] / timing["median_epoch_seconds"])
  assert set(res["claims"]) == {"adversarial_error_at_most_1.2%", "adversarial_error_below_both_baselines",
                                "adversarial_distortion_above_weight_decay"}
  # The adversarial run really mixed pool examples in: its history records refreshes and pool losses.
  adv = json.load(open(os.path.join(workdir, "adversarial", "result.json")))
  assert len(adv["history"]) == 2 and adv["history"][-1]["num_refreshes"] > 0
  assert os.path.isfile(os.path.join(workdir, "report.md")) and os.path.isfile(os.path.join(workdir, "report.html"))

  # Rerun: every finished run is restored (not retrained) and the summary is the same.
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("restored from") == 3
  res2 = json.load(open(os.path.join(workdir, "results.json")))
  assert {k: v["test_error"] for k, v in res2["summary"].items()} == {
      k: v["test_error"] for k, v in res["summary"].items()}

  # A finished run with other settings is refused, naming the difference, not silently reused (here
  # --pool_rms=0 turns the RMS placement off, which lets --pool_scale rule).
  other = _run(*[a for a in args if not a.startswith("--pool_rms")], "--pool_rms=0", "--pool_scale=0.5",
               "--runs=adversarial")
  assert other.returncode != 0
  assert "other settings (pool_config)" in other.stderr
  # --adv_weight_decay reaches the adversarial run only: its stored config differs, the baselines' do not.
  adv_wd = _run(*args, "--adv_weight_decay=3e-5,3e-5,3e-6")
  assert adv_wd.returncode != 0
  assert "adversarial holds a finished run with other settings (config)" in adv_wd.stderr
  assert adv_wd.stderr.count("restored from") == 2


def test_script_sweep_mode_matches_the_single_seed_run(synthetic_idx_dir, tmp_path):
  # --sweep_seeds=0,1 trains each run for both seeds as one program; seed 0 (= --seed, hence the same batch
  # order) must end where the plain --seed=0 run ends.
  common = [f"--data_dir={synthetic_idx_dir}", *_TINY]
  sweep_dir, single_dir = str(tmp_path / "sweep"), str(tmp_path / "single")
  proc = _run(f"--workdir={sweep_dir}", "--sweep_seeds=0,1", *common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.load(open(os.path.join(sweep_dir, "results.json")))
  assert res["seeds"] == [0, 1] and res["data_seed"] == 0 and res["num_attacked"] == 4
  for name in ("weight_decay", "dropout", "adversarial"):
    rows = res["per_seed"][name]
    assert len(rows) == 2 and all(0.0 <= r["test_error"] <= 1.0 and "av_min_distortion" in r for r in rows)
    assert res["mean"][name]["test_error"] == pytest.approx(sum(r["test_error"] for r in rows) / 2)
  assert res["claims"]["seeds_with_adversarial_error_at_most_1.2%"].endswith("of 2")
  assert "mean_adversarial_error_below_both_baselines" in res["claims"]
  assert os.path.isfile(os.path.join(sweep_dir, "report.md"))
  single = _run(f"--workdir={single_dir}", "--seed=0", *common)
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.load(open(os.path.join(single_dir, "results.json")))["summary"]
  for name in ("weight_decay", "dropout", "adversarial"):
    # The trained weights agree up to float rounding; so do the errors (at most one flipped prediction).
    stacked = checkpoint.load_pytree(os.path.join(sweep_dir, name, "final.msgpack"))
    alone = checkpoint.load_pytree(os.path.join(single_dir, name, "final.msgpack"))
    flat_s, flat_a = jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(alone)
    assert len(flat_s) == len(flat_a) == 6, name
    for u, v in zip(flat_s, flat_a):
      assert u.shape == (2,) + v.shape
      np.testing.assert_allclose(u[0], v, rtol=0, atol=1e-4, err_msg=name)
      assert not np.allclose(u[1], v, atol=1e-3), name  # seed 1 is another network
    assert abs(res["per_seed"][name][0]["test_error"] - one[name]["test_error"]) <= 1 / 128 + 1e-9, name
  # A rerun restores the three sweeps; other seeds in the same workdir are refused, naming the difference.
  again = _run(f"--workdir={sweep_dir}", "--sweep_seeds=0,1", *common)
  assert again.returncode == 0 and again.stderr.count("restored from") == 3, again.stderr[-3000:]
  other = _run(f"--workdir={sweep_dir}", "--sweep_seeds=0,2", *common)
  assert other.returncode != 0 and "other settings (seeds)" in other.stderr


@pytest.mark.parametrize("flags_, message", [
    (["--pool_rms=0.05", "--pool_scale=0.5"], "not both"),
    (["--pool_scale=0.5"], "--pool_rms=0 turns it off"),  # --pool_rms is on by default
    (["--pool_c_grid=a,b"], "--pool_c_grid must be numbers"),
    (["--weight_decay=1e-5,x"], "--weight_decay must be numbers"),
    (["--adv_weight_decay=x"], "--adv_weight_decay must be numbers"),
    (["--mix_ratio=1.0"], "mix_ratio"),
    (["--sweep_seeds=0,x"], "--sweep_seeds must be integers"),
    (["--sweep_seeds=1,1"], "--sweep_seeds must be distinct"),
])
def test_script_rejects_impossible_flags(synthetic_idx_dir, tmp_path, flags_, message):
  proc = _run(f"--workdir={tmp_path / 'w'}", f"--data_dir={synthetic_idx_dir}", "--epochs=1", *flags_)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_script_reports_missing_data_dir(tmp_path):
  proc = _run(f"--workdir={tmp_path / 'w'}", f"--data_dir={tmp_path / 'nowhere'}", "--epochs=1")
  assert proc.returncode != 0
  assert "nowhere" in proc.stderr and "does not exist" in proc.stderr


def test_bench_pool_sweep_runs_and_writes_its_figures(synthetic_idx_dir, tmp_path):
  out = tmp_path / "bench.json"
  script = _SCRIPT.parent / "bench_pool_sweep.py"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(script), f"--data_dir={synthetic_idx_dir}", "--ks=0,2", "--epochs=2",
                         "--warmup_steps=2", f"--out={out}"], capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.load(open(out))["rows"]
  assert [r["k"] for r in rows] == [0, 2] and all(len(r["epoch_seconds"]) == 2 for r in rows)
  assert rows[0]["speedup_vs_one_run"] == pytest.approx(1.0)
  assert rows[1]["seconds_per_model_epoch"] == pytest.approx(rows[1]["epoch_seconds"][1] / 2)
  assert "speed-up vs one run" in proc.stdout
  bad = subprocess.run([sys.executable, str(script), f"--data_dir={synthetic_idx_dir}", "--ks=a"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert bad.returncode != 0 and "--ks must be integers" in bad.stderr
