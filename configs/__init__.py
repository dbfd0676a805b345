"""Run configs: one file per experiment, each with a `get_config(arg)` and a docstring that says how to run it.

The helpers they share (typed arguments, the ablation variants, `runlocal`, the evaluation presets and the
start of an eval config) live in configs/common.py; config files import them as `from configs import common`,
so the repository root must be on the import path: main.py puts it there, and the tools
(`python -m sycoca_jax.tools...`) and pytest run from the root. The library (sycoca_jax/) never imports this
package.
"""
