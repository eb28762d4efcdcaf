r"""Figures 1-2 and a measured verdict: natural basis vs random directions (paper Section 3).

For each model (default: the MNIST ConvNet and FC100-100-10, trained on the MNIST training set with their
default recipes by ``train.get_or_train``, restored from ``--models_dir`` when already trained) and each
hidden layer φ, the MNIST test set I is ranked by ``<φ(x), v>`` for natural-basis units ``v = e_i`` and
for random unit-norm Gaussian directions; the top-k images of every direction are scored for coherence
(majority-label share, label entropy, mean pairwise pixel cosine) and the natural and random distributions
are compared (Mann-Whitney U, permutation test, Vargha-Delaney A), each also against a chance baseline of
random k-subsets of I. Output in ``--workdir``: ``report.md`` + ``report.html`` (table, verdicts,
figures), ``results.json``, ``fig_<model>_<layer>.png`` (left: natural units as in Figure 1; right: random
directions as in Figure 2; rows are random non-degenerate picks, not selected by coherence) and
``hist_<model>_<layer>.png``.

Command (from the repo root; models trained beforehand in runs/models)::

    .venv/bin/python scripts/unit_analysis.py --workdir=runs/units --data_dir=../shared/data/mnist \
        --run_dirs=mnist_conv=runs/models/mnist_conv_577e613e

(the 2-epoch ConvNet of notes/units.md; without ``--run_dirs`` the ConvNet comes from
``get_or_train("mnist_conv", ...)`` with its recipe, ``--epochs=mnist_conv=2`` reproduces ours).
Expected runtime: ~1-2 min on 2 shared CPU cores once the models exist (58.8 s measured; training the
ConvNet took 48 min there). Expected result (10000 test images, 200 directions, k = 10): in every layer
both natural and random directions are far above chance (majority-label share 0.60-0.86 vs 0.27);
majority share and label entropy are mostly not distinguishable between natural and random; the pixel
similarity differs with small/medium effects in both directions (see notes/units.md).

Smoke run (1-epoch models on 5000 images trained into ``<workdir>/models``, 1000 test images,
24 directions; ~3 min on the loaded 2-core machine, mostly training)::

    .venv/bin/python scripts/unit_analysis.py --workdir=/tmp/units_quick --data_dir=../shared/data/mnist --quick
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from intriguing_jax import checkpoint
from intriguing_jax import data
from intriguing_jax import metrics
from intriguing_jax import models
from intriguing_jax import plotting
from intriguing_jax import progress
from intriguing_jax import report
from intriguing_jax import train
from intriguing_jax import units

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (report, figures, results.json).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, f"MNIST IDX directory. Default: ${data.ENV_VAR}, else tfds.")
_MODELS_DIR = flags.DEFINE_string(
    "models_dir", None, "Parent directory of the trained models (train.get_or_train's workdir). Default: "
    "runs/models, or <workdir>/models with --quick.")
_MODELS = flags.DEFINE_list("models", ["mnist_conv", "fc100-100-10"], "Models to analyse (train.RECIPES names).")
_LAYERS = flags.DEFINE_list("layers", [], "Feature layers to analyse in each model (default: all hidden layers; "
                            "names missing from a model are skipped for it).")
_NUM_DIRECTIONS = flags.DEFINE_integer("num_directions", 200, "Natural units (subset when the layer is wider) "
                                       "and random directions per layer.", lower_bound=2)
_K = flags.DEFINE_integer("k", 10, "Top images per direction (Figures 1-2: 10).", lower_bound=2)
_NUM_SHOW = flags.DEFINE_integer("num_show", 4, "Rows of each kind in the figures (Figures 1-2: 4).",
                                 lower_bound=1)
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Use the first N test images (default: all 10000).",
                                   lower_bound=2)
_NUM_PERMUTATIONS = flags.DEFINE_integer("num_permutations", 10000, "Permutations per test.", lower_bound=1)
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Significance level of the verdicts.", lower_bound=1e-6,
                            upper_bound=0.5)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1000, "Images per streamed batch.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of units, directions, chance baseline and figure rows.")
_TRAIN_SEED = flags.DEFINE_integer("train_seed", 0, "get_or_train seed of the models.")
_EPOCHS = flags.DEFINE_list("epochs", [], "Training epochs per model as name=N (e.g. mnist_conv=2); models not "
                            "listed use their recipe's epochs. A changed value is a different run in --models_dir.")
_RUN_DIRS = flags.DEFINE_list(
    "run_dirs", [], "Finished runs to analyse as name=dir (a get_or_train run directory holding final.msgpack "
    "and result.json), e.g. mnist_conv=runs/models/mnist_conv_577e613e; loaded as is, without get_or_train's "
    "recipe and data checks. Models not listed come from get_or_train.")
_QUICK = flags.DEFINE_boolean("quick", False, "Smoke run: 1-epoch models (--epochs ignored) on 5000 training "
                              "images (in <workdir>/models), 1000 test images, 24 directions, 1000 permutations "
                              "(--num_images, --num_directions, --num_permutations given explicitly win).")

_QUICK_DEFAULTS = {"num_images": 1000, "num_directions": 24, "num_permutations": 1000}


def _flag(holder):
  """The flag's value, or its --quick default when --quick is on and the flag was not given."""
  if _QUICK.value and not flags.FLAGS[holder.name].present and holder.name in _QUICK_DEFAULTS:
    return _QUICK_DEFAULTS[holder.name]
  return holder.value


def _figure(name, layer, r, images, labels, k, num_show, rng, path):
  """Figure 1 | Figure 2 analogue: num_show natural rows and num_show random rows side by side."""
  def pick(valid):
    idx = np.flatnonzero(valid)
    return rng.permutation(idx)[:num_show]
  rows_nat, rows_rand = pick(r.natural_valid), pick(r.random_valid)
  n_rows = max(len(rows_nat), len(rows_rand))
  shape = images.shape[1:]
  grid = np.full((n_rows, 2 * k + 1) + shape, np.nan, np.float32)  # NaN cells are drawn blank
  titles = [""] * (n_rows * (2 * k + 1))
  row_labels = []
  for row in range(n_rows):
    label = []
    for side, (rows, top, coh, what) in enumerate(
        [(rows_nat, r.natural, r.natural_coherence, "unit"), (rows_rand, r.random, r.random_coherence, "dir")]):
      if row >= len(rows):
        continue
      d = rows[row]
      idx = top.indices[d]
      grid[row, side * (k + 1):side * (k + 1) + k] = images[idx]
      for j in range(k):
        titles[row * (2 * k + 1) + side * (k + 1) + j] = str(labels[idx[j]])
      ident = r.units[d] if what == "unit" else d
      label.append(f"{what} {ident}: {coh.majority_share[d]:.1f}")
    row_labels.append("\n".join(label))
  plotting.save_image_grid(
      grid, path, titles=titles, row_labels=row_labels,
      suptitle=f"{name} / {layer}: top-{k} test images. Left: natural basis e_i (Fig. 1). "
               f"Right: random directions (Fig. 2). Titles: labels; row labels: majority share.")


def _verdict_line(model_name, layer, r):
  parts = []
  for measure, c in r.comparisons.items():
    parts.append(f"{measure}: natural {c.mean_a:.3f} vs random {c.mean_b:.3f} (chance "
                 f"{r.vs_chance[measure]['natural'].mean_b:.3f}; A={c.effect_a:.2f}, p_perm={c.p_permutation:.2g}, "
                 f"p_MWU={c.p_mannwhitney:.2g}, p_Holm={c.p_adjusted:.2g}) -> {c.verdict}")
  degenerate = int((~r.natural_valid).sum())
  return (f"{model_name} / {layer} (n={r.dim}; {len(r.units)} natural units, {degenerate} degenerate and "
          f"excluded; {len(r.random_valid)} random directions): " + "; ".join(parts))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdir = _WORKDIR.value
  unknown = [m for m in _MODELS.value if m.lower() not in train.RECIPES]
  if unknown or not _MODELS.value:
    raise app.UsageError(f"--models: unknown {unknown or 'empty list'}; known: {', '.join(sorted(train.RECIPES))}")
  num_images, num_directions, k = _flag(_NUM_IMAGES), _flag(_NUM_DIRECTIONS), _K.value
  num_permutations = _flag(_NUM_PERMUTATIONS)
  if _NUM_SHOW.value > num_directions:
    raise app.UsageError(f"--num_show={_NUM_SHOW.value} exceeds --num_directions={num_directions}")
  models_dir = _MODELS_DIR.value or (os.path.join(workdir, "models") if _QUICK.value else "runs/models")
  progress.log_run_start(workdir, flags.FLAGS)
  start = time.perf_counter()

  try:
    test_x, test_y = data.load_mnist("test", _DATA_DIR.value)
    train_x, train_y = data.load_mnist("train", _DATA_DIR.value)
  except data.MnistError as e:
    raise app.UsageError(f"MNIST: {e}") from e
  if num_images is not None:
    if num_images > test_x.shape[0]:
      raise app.UsageError(f"--num_images={num_images} exceeds the {test_x.shape[0]} test images")
    test_x, test_y = test_x[:num_images], test_y[:num_images]
  if k > test_x.shape[0]:
    raise app.UsageError(f"--k={k} exceeds the number of images {test_x.shape[0]}")
  epochs = {}
  for item in _EPOCHS.value:
    model_name, _, value = item.partition("=")
    if model_name not in _MODELS.value or not value.isdigit() or int(value) < 1:
      raise app.UsageError(f"--epochs: expected <model in --models>=<N >= 1>, got {item!r}")
    epochs[model_name] = int(value)
  run_dirs = {}
  for item in _RUN_DIRS.value:
    model_name, _, run_dir = item.partition("=")
    if model_name not in _MODELS.value or not os.path.isfile(os.path.join(run_dir, "result.json")):
      raise app.UsageError(f"--run_dirs: expected <model in --models>=<dir with result.json>, got {item!r}")
    run_dirs[model_name] = run_dir
  if _QUICK.value:
    train_x, train_y = train_x[:5000], train_y[:5000]
    epochs = {name: 1 for name in _MODELS.value}

  rep = report.Report("Unit analysis (paper Section 3): natural basis vs random directions")
  rep.paragraph(
      f"Held-out set I: the first {test_x.shape[0]} MNIST test images. Per layer: {num_directions} natural-basis "
      f"units (a seeded random subset when the layer is wider; all units otherwise) and {num_directions} random "
      f"unit-norm Gaussian directions; top-{k} images by <phi(x), v>. Coherence of each direction's top-{k}: "
      "majority-label share (higher = more coherent), label entropy in bits (lower = more coherent), mean "
      "pairwise pixel cosine similarity (label-free, higher = more coherent). Chance: random "
      f"{k}-subsets of I. Tests: two-sided Mann-Whitney U and a permutation test on the difference of means "
      f"({num_permutations} permutations); 'distinguishable' needs both p-values, Holm-corrected over the "
      f"{len(units.MEASURES)} measures of the layer, below {_ALPHA.value}. Effect size: "
      "Vargha-Delaney A = P(natural > random) (0.5 = none; |A-0.5| < .06 negligible, < .14 small, < .21 "
      "medium, else large). Degenerate directions (all top-k scores equal, e.g. dead ReLU units) are excluded.")
  all_rows, claim_rows, verdicts, figures = [], [], [], []
  results_json = {"flags": {}, "models": {}}
  for fname in ("num_directions", "k", "num_images", "num_permutations", "seed", "alpha", "quick"):
    results_json["flags"][fname] = flags.FLAGS[fname].value
  results_json["flags"].update(num_images_used=int(test_x.shape[0]), num_directions_used=num_directions,
                               num_permutations_used=num_permutations)
  rng = np.random.default_rng(_SEED.value)
  for m_i, name in enumerate(_MODELS.value):
    with progress.Timer() as t_train:
      if name in run_dirs:
        recipe = train.RECIPES[name.lower()]
        model = models.get_model(recipe["model"], **recipe.get("model_kwargs", {}))
        variables, run_info = train.load_run(run_dirs[name], model)
        logging.info("%s: loaded %s (trained with %s)", name, run_dirs[name], run_info.get("config"))
      else:
        model, variables = train.get_or_train(name, train_x, train_y, workdir=models_dir, seed=_TRAIN_SEED.value,
                                              epochs=epochs.get(name), eval_data=(test_x, test_y))
    test_err = metrics.error_rate(lambda x, m=model, v=variables: m.apply(v, x), test_x, test_y)
    phi_all = units.model_feature_fn(model, variables)
    available = list(units.feature_dims(phi_all, test_x[:1]))
    layers = [l for l in _LAYERS.value if l in available] if _LAYERS.value else available
    if not layers:
      raise app.UsageError(f"--layers={_LAYERS.value}: none of them is a layer of {name} ({available})")
    skipped = [l for l in _LAYERS.value if l not in available]
    if skipped:
      logging.warning("%s has no layers %s; analysing %s", name, skipped, layers)
    phi = units.model_feature_fn(model, variables, layers=layers)
    with progress.Timer() as t_an:
      res = units.analyse(phi, test_x, test_y, key=jax.random.fold_in(jax.random.PRNGKey(_SEED.value), m_i),
                          num_directions=num_directions, k=k, batch_size=_BATCH_SIZE.value,
                          num_permutations=num_permutations, alpha=_ALPHA.value)
    logging.info("%s: test error %.4f; load/train %.1fs, analysis of %d layers %.1fs", name, test_err,
                 t_train.seconds, len(layers), t_an.seconds)
    all_rows += units.summary_rows(res, prefix={"model": name})
    claim_rows += units.verdict_rows(res, prefix={"model": name})
    model_json = {"test_error": test_err, "analysis_seconds": t_an.seconds, "layers": {}}
    for layer, r in res.items():
      verdicts.append(_verdict_line(name, layer, r))
      safe = f"{name}_{layer}".replace("/", "_")
      fig = f"fig_{safe}.png"
      _figure(name, layer, r, test_x, test_y, k, _NUM_SHOW.value, rng, os.path.join(workdir, fig))
      hist = f"hist_{safe}.png"
      plotting.save_histograms(
          {"natural": r.natural_coherence.majority_share[r.natural_valid],
           "random": r.random_coherence.majority_share[r.random_valid],
           "chance": r.chance_coherence.majority_share},
          os.path.join(workdir, hist), bins=10, xlabel=f"majority-label share of the top-{k}",
          title=f"{name} / {layer}")
      figures.append((name, layer, fig, hist))
      model_json["layers"][layer] = {
          "dim": r.dim, "units": r.units.tolist(), "natural_valid": r.natural_valid.tolist(),
          "random_valid": r.random_valid.tolist(),
          **{f"{kind}_{measure}": np.asarray(getattr(coh, measure)).tolist()
             for kind, coh in (("natural", r.natural_coherence), ("random", r.random_coherence),
                               ("chance", r.chance_coherence)) for measure in units.MEASURES},
          "comparisons": {m: c._asdict() for m, c in r.comparisons.items()},
          "vs_chance": {m: {s: c._asdict() for s, c in d.items()} for m, d in r.vs_chance.items()},
      }
    results_json["models"][name] = model_json
    rep.paragraph(f"{name}: test error {test_err:.2%} on the {test_x.shape[0]} images of I; analysis of "
                  f"{len(layers)} layers took {t_an.seconds:.1f} s.")

  total_seconds = time.perf_counter() - start
  rep.heading("The claim, measured: one row per layer")
  rep.paragraph(
      "above chance: which kind of direction beats random k-subsets of I on every measure (Holm-corrected); "
      "natural vs random: measures on which they differ and the more coherent side; claim: 'supported' when "
      "both beat chance and they are not distinguishable (the paper: 'the natural basis is not better than "
      "a random basis'). degenerate units: sampled natural units with all top-k scores equal (dead ReLU or "
      "saturated sigmoid units: their top-k is only the tie order), excluded from the statistics.")
  rep.table(claim_rows, floatfmt=".3g")
  rep.heading("Coherence: natural vs random vs chance")
  rep.table(all_rows, floatfmt=".3g", columns=[
      "model", "layer", "units n", "measure", "natural", "random", "chance", "#nat", "#rand", "p (MWU)",
      "p (perm)", "p (Holm)", "A nat>rand", "verdict", "A nat>chance", "A rand>chance"])
  rep.heading("Verdicts")
  rep.bullets(verdicts)
  rep.heading("Figures 1-2 analogues")
  for name, layer, fig, hist in figures:
    rep.image(fig, caption=f"{name} / {layer}: natural units (left) and random directions (right)")
    rep.image(hist, caption=f"{name} / {layer}: majority-label share per direction")
  rep.heading("Run")
  rep.code(" ".join(sys.argv) + f"\n# total wall time {total_seconds:.1f} s")
  results_json["summary"] = all_rows
  results_json["claim"] = claim_rows
  results_json["total_seconds"] = total_seconds
  checkpoint.atomic_write_json(os.path.join(workdir, "results.json"), results_json)
  md_path, html_path = rep.write(workdir, "report")
  logging.info("wrote %s and %s in %.1f s", md_path, html_path, total_seconds)
  print(plotting.markdown_table(all_rows, ["model", "layer", "measure", "natural", "random", "chance", "p (Holm)",
                                           "A nat>rand", "verdict"], floatfmt=".3g"))
  print(plotting.markdown_table(claim_rows, floatfmt=".3g"))
  print(f"report: {md_path}  ({total_seconds:.1f} s)")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
