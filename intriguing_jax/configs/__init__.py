"""Experiment configs: one ``get_config(arg=None) -> ml_collections.ConfigDict`` per experiment.

The convention of Flax's examples and big_vision. A script takes its config with
``--config=intriguing_jax/configs/<experiment>.py`` (the default) or ``...py:<preset>`` (``arg``), and any
field can be overridden on the command line, e.g. ``--config.attack.maxiter=50``; unknown fields and wrong
types are refused when the flags are parsed, and each experiment validates its whole config before it loads
data or trains anything.
"""
