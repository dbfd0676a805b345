"""Run configs: one file per experiment, each with a `get_config(arg)` and a docstring that says how to run it.

The helpers they share (argument parsing, the ablation variants, `runlocal`, the evaluation presets and loading
another config file's run) live in configs/common.py. Config files import them as `from configs import common`,
so they are run from the repository root (`python main.py --config=configs/...`, `python -m sycoca_jax.tools...`),
as its README shows. The library (sycoca_jax/) never imports this package.
"""
