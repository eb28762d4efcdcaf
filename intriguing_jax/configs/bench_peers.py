"""Our attack against Foolbox 3's DDN, FMN and C&W L2 (``scripts/bench/peers.py``, ``attack.peers.run``).

Presets (``--config=intriguing_jax/configs/bench_peers.py:<preset>``): (none) the measured setting, 200
images, every budget and peer below; ``tiny``: 10 images, one timed call each, the peers at Foolbox's
defaults only (checks the wiring; no figures to quote).

Fields: ``model`` (a ``models.SigmoidMLP`` name, trained by ``train.get_or_train`` in the workdir with its
recipe); ``seed`` (random targets); ``num_examples`` (the first correctly classified test images);
``repeats`` (timed calls of every method, in rounds, median); ``repeat_below_s`` (a peer whose
first timed call takes longer is timed once); ``budgets`` (name -> ``AttackOptions`` overrides;
"default" is the reference of the distortion ratios, ``attack.peers.reference_budget``); ``peers``
(name -> ``method``, one of ``attack.peers.METHODS`` ("ddn", "fmn", "cw"), plus the attack's keyword
arguments). The config is validated (``attack.peers.validate``, ValueError naming the entry) here and
again before any work.
"""

import ml_collections

from intriguing_jax.attack import peers


def get_config(arg=None):
  """The config of preset ``arg`` (None or "tiny")."""
  c = ml_collections.ConfigDict(dict(model="fc100-100-10", seed=0, num_examples=200, repeats=5,
                                     repeat_below_s=2.0))
  c.budgets = {"default": {}, "refine=False": {"refine": False}, "num_bisection=0": {"num_bisection": 0},
               "num_bisection=6": {"num_bisection": 6}, "maxiter=20": {"maxiter": 20}}
  c.peers = {"ddn (defaults)": {"method": "ddn"}, "ddn 1000 steps": {"method": "ddn", "steps": 1000},
             "fmn (defaults)": {"method": "fmn"},
             "cw 9x1000": {"method": "cw", "binary_search_steps": 9, "steps": 1000}}
  if arg == "tiny":
    c.num_examples, c.repeats = 10, 1
    c.peers = {"ddn (defaults)": {"method": "ddn"}, "fmn (defaults)": {"method": "fmn"}}
  elif arg is not None:
    raise ValueError(f"bench_peers config: unknown preset {arg!r} (tiny)")
  peers.validate(c)
  return c
