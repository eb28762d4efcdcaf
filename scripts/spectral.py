r"""Table 5 (paper §4.3): per-layer upper Lipschitz bounds and their product, for AlexNet and our MNIST nets.

Commands (CPU, 2 shared cores):

  # AlexNet, random He initialisation (Flax default init), input 227x227x3:
  OPENBLAS_NUM_THREADS=1 python -m scripts.spectral --model=alexnet --out=runs/spectral
  # AlexNet with your weights (see "Weights file" below):
  python -m scripts.spectral --model=alexnet --weights=/path/alexnet.npz
  # Trained MNIST models restored from runs/models (scripts/train.py); missing ones are skipped; finished
  # runs under another directory name (e.g. the 2-epoch ConvNet) are named with --run_dirs:
  python -m scripts.spectral --model=mnist --data_dir=/work/shared/data/mnist \
      --run_dirs=mnist_conv=runs/models/mnist_conv_577e613e
  python -m scripts.spectral --model=fc100-100-10 --method=lanczos --num_empirical=200

Writes <out>/<model>.md (table + products) and <out>/<model>.json; prints the table.

Columns: ``upper`` is the certified per-layer bound used in the product (exact circular FFT norm embedded
in N' ≥ N + pads for zero-padded convs, exact σ_max for dense layers, ⌈k/s⌉ for overlapping max-pools,
the certified LRN interval's top); ``lower`` is a certified lower bound on the same layer's constant;
``circular`` the exact norm with periodic boundary at the layer's own N (the paper's setting; n/a when
the stride does not divide N, e.g. AlexNet conv1 on 227); ``paper`` the paper's formula (Δ⁻² for convs,
1 for max-pool); ``paper_table5`` the printed Table 5 value. Products: ``product_upper`` (all layers,
certified), ``product_paper_style`` (conv + dense rows with the paper's formula, as Table 5), and the
empirical lower bound (largest Jacobian norm over --num_empirical inputs, and ‖f(x')−f(x)‖/‖x'−x‖ over
the pairs in --adv_file).

Weights file (--weights): either
  * a .npz whose keys are "<layer>/kernel" and "<layer>/bias" for layer in conv1..conv5, fc1, fc2, output,
    in Flax layout: conv kernels (kh, kw, C_in, C_out), dense kernels (in, out); e.g. from PyTorch
    ``w.permute(2, 3, 1, 0)`` for convs and ``w.T`` for linears; or
  * a checkpoint directory written by ``intriguing_jax.checkpoint.save_checkpoint`` holding the Flax
    variables ({"params": ...}) of ``models.get_model("alexnet")``.

Measured runtime (2 shared cores, see notes/spectral.md): AlexNet 53.5 s wall at load average 3, 484 s
at load 20+ (init of 61 M parameters, eight norms incl. Lanczos on FC1/FC2, two Jacobian norms); each
MNIST model 1-17 s;
all seven MNIST models (with --run_dirs for the ConvNet) 35 s wall at load average 4 (16:51 UTC).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see scripts/bench_spectral.py

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from intriguing_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from intriguing_jax import spectral  # pylint: disable=g-import-not-at-top,wrong-import-position

_MNIST_MODELS = ("fc10-1e-4", "fc10-1e-2", "fc10-1", "fc100-100-10", "fc200-200-10", "ae400-10", "mnist_conv")

_MODEL = flags.DEFINE_enum("model", "alexnet", ("alexnet", "mnist") + _MNIST_MODELS,
                           "alexnet, one trained MNIST model, or 'mnist' for all of them.")
_WEIGHTS = flags.DEFINE_string("weights", None, "AlexNet weights (.npz or checkpoint dir); default random init.")
_MODELS_DIR = flags.DEFINE_string("models_dir", "runs/models", "Workdir of train.get_or_train (MNIST models).")
_RUN_DIRS = flags.DEFINE_list(
    "run_dirs", [], "Finished runs as name=dir (a get_or_train run directory holding final.msgpack and "
    "result.json), e.g. mnist_conv=runs/models/mnist_conv_577e613e; loaded as is with train.load_run. "
    "Models not listed come from --models_dir/<name>.")
_TRAIN_MISSING = flags.DEFINE_bool("train_missing", False, "Train MNIST models that are not in --models_dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "MNIST IDX directory (default $INTRIGUING_JAX_MNIST_DIR).")
_METHOD = flags.DEFINE_enum("method", "fft", ["fft", "power", "lanczos"], "Conv norm method.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 100, "Iterations for power/lanczos.", lower_bound=1)
_NUM_EMPIRICAL = flags.DEFINE_integer("num_empirical", None,
                                      "Inputs for the empirical Jacobian norm (default 2 AlexNet, 256 MNIST; 0: skip).",
                                      lower_bound=0)
_EMPIRICAL_STEPS = flags.DEFINE_integer("empirical_steps", 20, "Power steps per Jacobian norm.", lower_bound=1)
_ADV_FILE = flags.DEFINE_string("adv_file", None, "Optional .npz with arrays x and x_adv (pairs for the ratio).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random init and of the empirical inputs.")
_OUT = flags.DEFINE_string("out", "runs/spectral", "Output directory for <model>.md / .json.")

_TABLE5_BY_NAME = dict(zip(("conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2", "output"),
                           (s["paper"] for s in spectral.TABLE5)))


def _load_alexnet_weights(path, variables):
  if os.path.isdir(path):
    tree, step = checkpoint.restore_checkpoint(path, target=variables)
    logging.info("restored AlexNet checkpoint %s (step %s)", path, step)
    return tree
  if not path.endswith(".npz"):
    raise app.UsageError(f"--weights must be a .npz file or a checkpoint directory, got {path!r}")
  arrays = np.load(path)
  params = jax.tree_util.tree_map(lambda v: v, dict(variables["params"]))
  for layer, leaves in variables["params"].items():
    new = {}
    for leaf, ref in leaves.items():
      key = f"{layer}/{leaf}"
      if key not in arrays:
        raise app.UsageError(f"--weights {path}: missing key {key!r} (expected keys: <layer>/kernel, <layer>/bias)")
      if arrays[key].shape != ref.shape:
        raise app.UsageError(f"--weights {path}: {key} has shape {arrays[key].shape}, expected {ref.shape} "
                             "(Flax layout: conv (kh, kw, C_in, C_out), dense (in, out))")
      new[leaf] = jnp.asarray(arrays[key], ref.dtype)
    params[layer] = new
  return {"params": params}


def _empirical(model, variables, x, adv_file):
  x_adv = None
  if adv_file:
    pairs = np.load(adv_file)
    x, x_adv = jnp.asarray(pairs["x"]), jnp.asarray(pairs["x_adv"])
  return spectral.empirical_lipschitz(model.apply, x, params=variables, x_adv=x_adv,
                                      num_steps=_EMPIRICAL_STEPS.value,
                                      batch_size=min(64, x.shape[0]))


def _report(name, rows, summary, emp, seconds):
  for row in rows:
    if row["layer"] in _TABLE5_BY_NAME and name == "alexnet":
      row["paper_table5"] = _TABLE5_BY_NAME[row["layer"]]
  if emp is not None:
    summary["empirical_lower_bound"] = emp.lower_bound
    summary["empirical_max_jacobian_norm"] = float(emp.jacobian_norms.max())
    if emp.pair_ratios.size:
      summary["empirical_max_pair_ratio"] = float(emp.pair_ratios.max())
    summary["gap_upper_over_empirical"] = summary["product_upper"] / max(emp.lower_bound, 1e-30)
  summary["seconds"] = seconds
  text = f"# Lipschitz bounds: {name} (method {_METHOD.value})\n\n" + spectral.format_table(rows, summary)
  print(text, flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  checkpoint.atomic_write_bytes(os.path.join(_OUT.value, f"{name}.md"), text.encode())
  checkpoint.atomic_write_json(os.path.join(_OUT.value, f"{name}.json"), dict(rows=rows, summary=summary))


def _run_alexnet():
  t0 = time.time()
  model = models.get_model("alexnet")
  shape = tuple(model.image_shape)
  variables = jax.jit(model.init)(jax.random.PRNGKey(_SEED.value), jnp.zeros((1,) + shape))
  if _WEIGHTS.value:
    variables = _load_alexnet_weights(_WEIGHTS.value, variables)
  rows, summary = spectral.lipschitz_table(model, variables, shape, method=_METHOD.value,
                                           num_steps=_NUM_STEPS.value)
  emp = None
  num = 2 if _NUM_EMPIRICAL.value is None else _NUM_EMPIRICAL.value
  if num or _ADV_FILE.value:
    x = jax.random.uniform(jax.random.PRNGKey(_SEED.value + 1), (max(num, 1),) + shape)
    emp = _empirical(model, variables, x, _ADV_FILE.value)
  _report("alexnet", rows, summary, emp, time.time() - t0)


def _parse_run_dirs():
  run_dirs = {}
  for item in _RUN_DIRS.value:
    name, _, run_dir = item.partition("=")
    if name not in _MNIST_MODELS or not os.path.isfile(os.path.join(run_dir, "result.json")):
      raise app.UsageError(f"--run_dirs: expected <name in {', '.join(_MNIST_MODELS)}>=<finished run directory "
                           f"with result.json and final.msgpack>, got {item!r}")
    run_dirs[name] = run_dir
  return run_dirs


def _run_mnist(name, run_dirs):
  from intriguing_jax import data, train  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  if name in run_dirs:
    recipe = train.RECIPES[name]
    model = models.get_model(recipe["model"], **recipe.get("model_kwargs", {}))
    variables, run_info = train.load_run(run_dirs[name], model)
    logging.info("%s: loaded %s (trained with %s)", name, run_dirs[name], run_info.get("config"))
    shape = (28, 28, 1)
  else:
    if not _TRAIN_MISSING.value and not os.path.isdir(os.path.join(_MODELS_DIR.value, name)):
      logging.warning("skipping %s: no run in %s (train it with scripts/train.py, pass --run_dirs=%s=DIR or "
                      "--train_missing)", name, _MODELS_DIR.value, name)
      return
    images, labels = data.load_mnist("train", _DATA_DIR.value)
    model, variables = train.get_or_train(name, images, labels, workdir=_MODELS_DIR.value)
    shape = images.shape[1:]
  rows, summary = spectral.lipschitz_table(model, variables, shape, method=_METHOD.value,
                                           num_steps=_NUM_STEPS.value)
  emp = None
  num = 256 if _NUM_EMPIRICAL.value is None else _NUM_EMPIRICAL.value
  if num or _ADV_FILE.value:
    test_x, _ = data.load_mnist("test", _DATA_DIR.value)
    emp = _empirical(model, variables, jnp.asarray(test_x[:max(num, 1)]), _ADV_FILE.value)
  _report(name, rows, summary, emp, time.time() - t0)


def main(argv):
  del argv
  run_dirs = _parse_run_dirs()
  if _MODEL.value == "alexnet":
    _run_alexnet()
  else:
    for name in (_MNIST_MODELS if _MODEL.value == "mnist" else (_MODEL.value,)):
      _run_mnist(name, run_dirs)


if __name__ == "__main__":
  app.run(main)
