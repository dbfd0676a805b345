r"""The paper's ablation at small scale: train each (variant, seed), evaluate its final checkpoint, tabulate.

  python -m sycoca_jax.tools.ablation --config=configs/sycoca_tiny.py \
      --variants=clip,coca,coca_am,coca_mim_image_only,coca_tgmim_random,sycoca --seeds=0,1,2 --workdir=DIR
  python -m sycoca_jax.tools.ablation ... --variants=sycoca --sweep=model.masking.mim_ratio=0.25,0.5,0.75  (Table 6)
  python -m sycoca_jax.tools.ablation ... --variants=sycoca --sweep=loss.mim_weight=0.1,0.5,1,2            (Table 7)
  python -m sycoca_jax.tools.ablation ... --overrides=total_steps=500,log_steps=100   (any --config.KEY=VALUE)
  python -m sycoca_jax.tools.ablation --workdir=DIR --table_only                       (rebuild the outputs)

The rows are the config file's VARIANTS (configs/sycoca_tiny.py and sycoca_base.py offer the paper's six; a
config without VARIANTS takes no `variant=`). Every run is the config file loaded as main.py loads it
(ml_collections config_flags), with `variant=NAME` added to its argument, `seed` set, then the sweep value and
the overrides applied as --config.KEY=VALUE would be. Each run trains with the trainer main.py calls (sycoca_jax.train), in a child process by default (memory
and compile caches go away with it), in DIR/<variant>[_<key><value>]_seed<k>/, and is then evaluated on its
final checkpoint with the run's own evaluators (config.evals: on the built-in scenes, retrieval with
fine-grained negatives, zero-shot, greedy captioning and mask quality) plus, with --extra_evals, those of
another eval config (e.g. configs/eval_all.py). Evaluators the trainer already ran at the last step are read
back from the run's metrics.jsonl rather than run twice.

Resumable: a run with DIR/<run>/final_eval.json at its last step is skipped (its checkpoints may be deleted to
save disk once that file is written), and --restore_from=ablation.json writes an earlier study's finished runs
into a new DIR (a study moved to another machine); an interrupted run resumes from its latest checkpoint (the
trainer does that); a run dir trained with a different config is refused rather than mixed in. Runs go
seed-major (every variant's seed 0 first, then seed 1, ...), so an interrupted study has the widest comparison
finished. After every run DIR/ablation.json, DIR/ablation.md (mean +- std over seeds) and DIR/ablation.png are
rewritten from every finished run found in DIR.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import app, flags, logging
from etils import epath
import ml_collections
from ml_collections import config_flags
import numpy as np

from sycoca_jax import config_lib
from sycoca_jax import evaluators

FLAGS = flags.FLAGS


def define_flags():
  """The command line, defined when the tool runs (not on import: several tools in one process, e.g. a test
  session, would define --config twice)."""
  flags.DEFINE_string("config", None, "Config file with optional ':args', as for main.py; `variant=` is added.")
  flags.DEFINE_string("workdir", None, "Study folder: one sub-folder per run, plus ablation.{json,md,png}.")
  flags.DEFINE_list("variants", [], "Rows to train, of the config file's VARIANTS (default: all of them).")
  flags.DEFINE_list("seeds", ["0"], "config.seed of each repeat (init, data order, masking draws).")
  flags.DEFINE_string("sweep", "", "KEY=V1,V2,...: one dotted config key swept over values, on top of each variant.")
  flags.DEFINE_multi_string("overrides", [], "KEY=VALUE[,KEY=VALUE...] applied to every run, as --config.KEY=VALUE "
                            "would be (e.g. total_steps=500). A tuple value keeps its commas: data.crop_scale=(0.8,1).")
  flags.DEFINE_string("extra_evals", "", "An eval config file (e.g. configs/eval_all.py) whose evaluators also run "
                      "on each final checkpoint; its `runlocal` follows --config's.")
  flags.DEFINE_string("baseline", "coca", "The row every other row is compared with (difference of means and Welch's "
                      "t-test over seeds), when it has 2+ seeds; '' for none.")
  flags.DEFINE_bool("table_only", False, "Only rebuild ablation.json / .md / .png from the finished runs in workdir.")
  flags.DEFINE_string("restore_from", "", "An ablation.json of an earlier study of the same config (e.g. one kept "
                      "beside the docs): its finished runs are written into workdir as finished, so that a study "
                      "moved to a new machine goes on from there. Their results are taken as recorded.")
  flags.DEFINE_bool("subprocess", True, "Train each run in a child process (false: all in this process).")
  flags.DEFINE_bool("child", False, "Internal: this process is one run of a study; its parent writes the tables.")
  flags.mark_flags_as_required(["workdir"])


FINAL_EVAL = "final_eval.json"
RUN_CONFIG = "run.json"
# Keys that change what a run logs or keeps, not what it learns: a run dir may be resumed with other values.
_BOOKKEEPING = ("evals", "log_steps", "image_log_steps", "ckpt_steps", "keep_ckpts", "async_checkpointing")


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Run:
  name: str
  variant: str
  seed: int
  sweep_key: str
  sweep_value: str  # '' without a sweep
  config: ml_collections.ConfigDict

  @property
  def num_steps(self) -> int:
    return config_lib.total_steps(self.config)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path[:arg]` loaded exactly as main.py's --config flag loads it, with --config.KEY=VALUE overrides."""
  argv = ["ablation", f"--config={spec}", *(f"--config.{o}" for o in overrides)]
  holder = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=holder, lock_config=True, sys_argv=argv)
  holder(argv)
  return holder.config


def config_variants(spec: str) -> list[str]:
  """The ablation rows the config file of `spec` ('path[:arg]') offers through `variant=`: its VARIANTS, in table
  order."""
  path = spec.partition(":")[0]
  module_spec = importlib.util.spec_from_file_location("_ablation_config", path)
  if module_spec is None:
    raise ValueError(f"--config={spec}: {path!r} is not a Python config file.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "VARIANTS"):
    raise ValueError(f"--config={spec}: {path} declares no VARIANTS, so it takes no variant= to ablate.")
  return list(module.VARIANTS)


def with_variant(spec: str, variant: str) -> str:
  """'configs/x.py:runlocal' + 'coca' -> 'configs/x.py:runlocal,variant=coca' (a given variant= is replaced)."""
  path, _, arg = spec.partition(":")
  args = config_lib.split_arg(arg)
  args["variant"] = variant
  return path + ":" + ",".join(k if v is None else f"{k}={v}" for k, v in args.items())


def split_overrides(values: Sequence[str]) -> list[str]:
  """['a=1,b.c=(1,2)', 'd=x'] -> ['a=1', 'b.c=(1,2)', 'd=x']: a comma inside brackets or before a token without
  '=' continues the value."""
  out: list[str] = []
  for value in values:
    for token in value.split(","):
      open_brackets = out and sum(out[-1].count(a) - out[-1].count(b) for a, b in ("()", "[]")) > 0
      if out and (open_brackets or (token and "=" not in token)):
        out[-1] += "," + token
      elif token:
        out.append(token)
  return out


def parse_sweep(sweep: str) -> tuple[str, list[str]]:
  """'loss.mim_weight=0.1,0.5' -> ('loss.mim_weight', ['0.1', '0.5']); '' -> ('', [''])."""
  if not sweep:
    return "", [""]
  key, sep, values = sweep.partition("=")
  values = [v.strip() for v in values.split(",") if v.strip()]
  if not sep or not key or not values:
    raise ValueError(f"--sweep={sweep!r}: use KEY=V1,V2,... (e.g. loss.mim_weight=0.1,0.5,1,2).")
  return key.strip(), values


def run_name(variant: str, seed: int, sweep_key: str = "", sweep_value: str = "") -> str:
  sweep = f"_{sweep_key.rsplit('.', 1)[-1]}{re.sub(r'[^A-Za-z0-9.+-]', '_', sweep_value)}" if sweep_key else ""
  return f"{variant}{sweep}_seed{seed}"


def plan(spec: str, variants: Sequence[str], seeds: Sequence[int], sweep: str = "",
         overrides: Sequence[str] = ()) -> list[Run]:
  """Every run, seed-major: all variants (and sweep values) of seed 0 before any of seed 1.

  variants: of the config file's VARIANTS (config_variants); empty: all of them.
  overrides: 'KEY=VALUE[,KEY=VALUE...]' strings (split_overrides).
  Each config is loaded and validated here, so a bad variant, sweep key or override fails before any training.
  """
  offered = config_variants(spec)
  variants = list(variants) or offered
  unknown = [v for v in variants if v not in offered]
  if unknown:
    raise ValueError(f"--variants: {unknown} not among {sorted(offered)}.")
  sweep_key, sweep_values = parse_sweep(sweep)
  overrides = split_overrides(overrides)
  runs = []
  for seed in seeds:
    for value in sweep_values:
      for variant in variants:
        extra = [f"seed={seed}"] + ([f"{sweep_key}={value}"] if sweep_key else []) + list(overrides)
        config = load_config(with_variant(spec, variant), extra)
        try:
          config_lib.validate(config)
        except ValueError as e:
          raise ValueError(f"Run {run_name(variant, seed, sweep_key, value)}: {e}") from e
        runs.append(Run(run_name(variant, seed, sweep_key, value), variant, int(seed), sweep_key, value, config))
  return runs


# ------------------------------------------------------------------------------------------------ one run


def _read_json(path: epath.Path) -> Optional[dict]:
  return json.loads(path.read_text()) if path.exists() else None


def _no_nan(obj: Any) -> Any:
  """NaN -> None everywhere, so the files are standard JSON."""
  if isinstance(obj, dict):
    return {k: _no_nan(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_no_nan(v) for v in obj]
  return None if isinstance(obj, float) and math.isnan(obj) else obj


def _write_json(path: epath.Path, obj: Any) -> None:
  """Whole or not at all: a temporary file, then a rename (a reader never sees half a file)."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(_no_nan(obj), indent=1, sort_keys=True))
  tmp.replace(path)


def training_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a run learns from, as flat JSON values (bookkeeping keys left out)."""
  tree = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
  return json.loads(json.dumps(config_lib.flatten(tree), default=str))


def is_finished(run_dir: epath.Path, num_steps: int) -> bool:
  # final_eval.json is written last, after training and evaluation, and only for the run's last step.
  result = _read_json(run_dir / FINAL_EVAL)
  return result is not None and result.get("step") == num_steps


def _check_same_config(run_dir: epath.Path, run: Run, spec: str) -> None:
  """Records the run's config at its first start; refuses to continue a dir trained with another one."""
  wanted = training_config(run.config)
  recorded = _read_json(run_dir / RUN_CONFIG)
  if recorded is None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / RUN_CONFIG, {"config_spec": spec, "variant": run.variant, "seed": run.seed,
                                       "sweep_key": run.sweep_key, "sweep_value": run.sweep_value,
                                       "training_config": wanted})
    return
  recorded_config = recorded["training_config"]
  added = config_lib.keys_added_at_default(recorded_config, wanted)  # newer code, same behaviour
  diff = sorted(k for k in set(wanted) | set(recorded_config)
                if wanted.get(k) != recorded_config.get(k) and k not in added)
  if diff:
    shown = ", ".join(f"{k}: {recorded_config.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:5])
    raise ValueError(f"{run_dir} was trained with another config ({shown}{', ...' if len(diff) > 5 else ''}). "
                     "Use a new --workdir, or delete that run to retrain it.")


def restore_runs(workdir: str, planned: Sequence[Run], spec: str, summary_path: str) -> list[str]:
  """Writes the finished runs of an earlier study's ablation.json into workdir; returns their names.

  Only runs of this plan at its step count are taken, and none whose folder holds a result or a config already.
  Each gets this plan's config as its run.json: the results are trusted to come from the same config (the
  summary does not record the configs, so that cannot be checked here).
  """
  summary = json.loads(epath.Path(summary_path).read_text())
  recorded = {r["name"]: r for r in summary.get("runs", [])}
  restored = []
  for run in planned:
    result, run_dir = recorded.get(run.name), epath.Path(workdir) / run.name
    if (result is None or result.get("step") != run.num_steps or (run_dir / FINAL_EVAL).exists()
        or (run_dir / RUN_CONFIG).exists()):
      continue
    _check_same_config(run_dir, run, spec)
    _write_json(run_dir / FINAL_EVAL, result)
    restored.append(run.name)
  return restored


def final_evals(run: Run, extra_evals: str, spec: str) -> ml_collections.ConfigDict:
  """The run's evaluators plus those of --extra_evals (renamed where a same-named one differs)."""
  evals = ml_collections.ConfigDict(copy.deepcopy(run.config.evals.to_dict()))
  if not extra_evals:
    return evals
  args = config_lib.split_arg(spec.partition(":")[2])
  runlocal = "runlocal" in args and config_lib.to_bool(args["runlocal"], "runlocal")
  extra = load_config(extra_evals + (":runlocal" if runlocal else "")).evals
  settings = lambda ev: {k: v for k, v in ev.to_dict().items() if k != "log_steps"}
  for name, ev in extra.items():
    ev = ml_collections.ConfigDict(copy.deepcopy(ev.to_dict()))
    mine = evals.get(name)
    if mine is not None and settings(mine) == settings(ev):
      continue  # the run's own evaluator, with the same settings
    prefix = evaluators.metric_prefix(ev)
    if mine is not None or any(evaluators.metric_prefix(e) == prefix for e in evals.values()):
      ev.prefix = f"{prefix}_extra"
      name = f"{name}_extra"
    evals[name] = ev
  return evals


def train_and_evaluate_run(run: Run, workdir: str, spec: str, extra_evals: str = "") -> dict[str, Any]:
  """Trains one run to its last step (resuming), evaluates the final checkpoint, writes final_eval.json."""
  # Imported here: the parent process of a study only plans, spawns and tabulates.
  from sycoca_jax import evaluate, losses, metrics, train  # pylint: disable=g-import-not-at-top

  run_dir = epath.Path(workdir) / run.name
  _check_same_config(run_dir, run, spec)
  num_steps = run.num_steps
  t0 = time.time()
  train.train_and_evaluate(run.config, os.fspath(run_dir))
  train_seconds = time.time() - t0

  evals = final_evals(run, extra_evals, spec)
  # Evaluators the trainer ran at the last step: their results are in metrics.jsonl already.
  last = {}
  rows = metrics.read_jsonl(os.fspath(run_dir)) if (run_dir / "metrics.jsonl").exists() else []
  for row in rows:
    if row.get("step") == num_steps:
      last.update({k: v for k, v in row.items() if k != "step"})
  prefixes = {name: evaluators.metric_prefix(ev) for name, ev in evals.items()}
  done = {p for p in prefixes.values() if any(k.startswith(p + "/") for k in last)}
  todo = {name: ev for name, ev in evals.items() if prefixes[name] not in done}
  results = {k: v for k, v in last.items() if k.split("/")[0] in done}
  t0 = time.time()
  if todo:
    config = copy.deepcopy(run.config)
    with config.unlocked():
      config.evals = ml_collections.ConfigDict(todo)
    results.update(evaluate.evaluate_checkpoint(config, os.fspath(run_dir), num_steps))
  eval_seconds = time.time() - t0
  result = {"name": run.name, "variant": run.variant, "seed": run.seed, "sweep_key": run.sweep_key,
            "sweep_value": run.sweep_value, "step": num_steps, "heads": list(losses.enabled_heads(run.config.loss)),
            "metrics": {k: float(v) for k, v in sorted(results.items())}, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "evaluated": sorted(todo), "reused_from_training": sorted(done)}
  _write_json(run_dir / FINAL_EVAL, result)
  logging.info("%s: evaluated in %.1f s (%s; reused from training: %s).", run.name, eval_seconds,
               ", ".join(sorted(todo)) or "nothing", ", ".join(sorted(done)) or "nothing")
  return result


def _child_command(run: Run) -> list[str]:
  cmd = [sys.executable, "-m", "sycoca_jax.tools.ablation", f"--config={FLAGS.config}", f"--workdir={FLAGS.workdir}",
         f"--variants={run.variant}", f"--seeds={run.seed}", "--nosubprocess", "--child"]
  if run.sweep_key:
    cmd.append(f"--sweep={run.sweep_key}={run.sweep_value}")
  cmd += [f"--overrides={o}" for o in FLAGS.overrides]
  if FLAGS.extra_evals:
    cmd.append(f"--extra_evals={FLAGS.extra_evals}")
  return cmd


def _run_child(run: Run, run_dir: epath.Path) -> int:
  """Trains and evaluates `run` in a child process; its log goes to <run>/log.txt (local workdirs)."""
  run_dir.mkdir(parents=True, exist_ok=True)
  log = open(os.fspath(run_dir / "log.txt"), "a") if not re.match(r"^\w+://", os.fspath(run_dir)) else None
  child = subprocess.Popen(_child_command(run), stdout=log, stderr=subprocess.STDOUT if log else None)
  try:
    return child.wait()
  except KeyboardInterrupt:
    child.send_signal(signal.SIGTERM)  # the trainer checkpoints the current step and stops
    child.wait()
    raise
  finally:
    if log:
      log.close()


# ------------------------------------------------------------------------------------------------ the table

# (column, metric, objective the metric needs): shown as percentages, mean +- std over seeds.
TABLES = {
    "Retrieval, zero-shot, captioning": [
        ("i2t R@1", "retrieval/i2t_r1", None), ("t2i R@1", "retrieval/t2i_r1", None),
        ("mTR", "retrieval/mTR", None), ("mIR", "retrieval/mIR", None),
        ("zs colour", "zeroshot/scenes_colour_top1", None), ("zs shape", "zeroshot/scenes_shape_top1", None),
        ("zs digit", "zeroshot/scenes_digit_top1", None),
        ("CIDEr", "captioning/cider", "ic"), ("SG F1", "captioning/sg_f1", "ic"),
    ],
    "Fine-grained negatives and mask quality": [
        ("attr ITC", "retrieval/fg_attribute_itc", None), ("count ITC", "retrieval/fg_count_itc", None),
        ("object ITC", "retrieval/fg_object_itc", None), ("relation ITC", "retrieval/fg_relation_itc", None),
        ("attr LL", "retrieval/fg_attribute_loglik", "ic"), ("count LL", "retrieval/fg_count_loglik", "ic"),
        ("object LL", "retrieval/fg_object_loglik", "ic"), ("relation LL", "retrieval/fg_relation_loglik", "ic"),
        ("IC obj. recall", "masking/ic_object_recall", None),
        ("random", "masking/ic_object_recall_random", None),
    ],
}
CHART = ["retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/fg_object_itc", "retrieval/fg_relation_itc",
         "zeroshot/scenes_shape_top1", "captioning/cider", "captioning/sg_f1", "masking/ic_object_recall"]
# Chance level (%) drawn as a dashed line: a pair of captions, 8 shapes, 10 digits.
_CHANCE = {"retrieval/fg_object_itc": 50.0, "retrieval/fg_relation_itc": 50.0, "zeroshot/scenes_shape_top1": 12.5}
# Compared with the baseline row (difference of means, Welch's t-test): the paper's claims, retrieval and
# fine-grained alignment.
COMPARED = ["retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/mTR", "retrieval/mIR", "captioning/cider",
            "retrieval/fg_object_itc", "retrieval/fg_relation_itc"]
_TITLES = {metric: column for rows in TABLES.values() for column, metric, _ in rows}
_NEEDS = {metric: needs for rows in TABLES.values() for _, metric, needs in rows}


def finished_runs(workdir: str, variants: Sequence[str] = ()) -> list[dict]:
  """Every final_eval.json under workdir, in table order: variants as in `variants` (the config's VARIANTS; by
  name when not given, which is the same order for the paper's rows), then sweep values, then seeds."""
  runs = [json.loads(p.read_text()) for p in epath.Path(workdir).glob(f"*/{FINAL_EVAL}")]
  order = {v: i for i, v in enumerate(variants)}
  return sorted(runs, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["sweep_key"],
                                     _num(r["sweep_value"]), r["seed"]))


def _num(value: str) -> tuple:
  try:
    return (0, float(value), "")
  except ValueError:
    return (1, 0.0, value)


def _group_key(run_or_group: dict) -> tuple:
  """What makes runs one row of the table: everything but the seed."""
  return tuple(run_or_group[k] for k in ("variant", "sweep_key", "sweep_value", "step"))


def summarise(runs: Sequence[dict]) -> list[dict]:
  """One group per (variant, sweep value): seeds, and mean / std (ddof 1; NaN for one seed) of every metric."""
  groups: dict[tuple, list[dict]] = collections.OrderedDict()
  for r in runs:
    groups.setdefault(_group_key(r), []).append(r)
  out = []
  for (variant, key, value, step), members in groups.items():
    label = variant + (f" {key.rsplit('.', 1)[-1]}={value}" if key else "")
    names = sorted({k for m in members for k in m["metrics"]})
    mean, std = {}, {}
    for k in names:
      values = np.asarray([m["metrics"][k] for m in members if m["metrics"].get(k) is not None], np.float64)
      mean[k] = float(np.mean(values)) if len(values) else float("nan")
      std[k] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    out.append({"label": label, "variant": variant, "sweep_key": key, "sweep_value": value, "step": step,
                "seeds": sorted(m["seed"] for m in members), "heads": members[0]["heads"], "mean": mean, "std": std})
  return out


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """Difference of means mean(a) - mean(b) and the two-sided p-value of Welch's t-test (unequal variances).

  NaN p with fewer than two values on a side; p = 1 for two constant, equal samples, 0 for constant, unequal ones.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (scipy comes with scikit-learn)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
  if len(a) < 2 or len(b) < 2:
    return diff, float("nan")
  if a.var() == 0 and b.var() == 0:
    return diff, 1.0 if diff == 0 else 0.0
  return diff, float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjustment of p-values for the number of comparisons (NaN ones are not counted).

  The i-th smallest of m p-values is multiplied by m - i (i from 0), a running maximum keeps the order, and 1
  caps it: rejecting where the adjusted p < alpha keeps the chance of any false rejection under alpha.
  """
  p = np.asarray(p_values, np.float64)
  out = np.full(p.shape, np.nan)
  valid = np.flatnonzero(~np.isnan(p))
  order = valid[np.argsort(p[valid], kind="stable")]
  running = 0.0
  for i, index in enumerate(order):
    running = max(running, min(1.0, (len(order) - i) * p[index]))
    out[index] = running
  return out.tolist()


def compare(runs: Sequence[dict], groups: Sequence[dict], baseline: str) -> dict[str, dict]:
  """Each group against the baseline variant's unswept group: {label: {metric: {"diff", "p", "p_holm"}}}, in
  percent; p_holm is Holm-adjusted over every comparison of the table (all groups and metrics).

  Empty when the baseline has fewer than two seeds; groups with one seed get a difference and a NaN p.
  """
  def values(group, metric):
    return [100 * r["metrics"][metric] for r in runs
            if _group_key(r) == _group_key(group) and r["metrics"].get(metric) is not None]
  base = [g for g in groups if g["variant"] == baseline and not g["sweep_key"]]
  if not base or len(base[0]["seeds"]) < 2:
    return {}
  out = {}
  for g in groups:
    if g is base[0]:
      continue
    out[g["label"]] = {}
    for metric in COMPARED:
      needs = _NEEDS.get(metric)
      if needs and (needs not in g["heads"] or needs not in base[0]["heads"]):
        continue
      a, b = values(g, metric), values(base[0], metric)
      if a and b:  # a metric either side never logged is left out, as the tables leave it
        diff, p = welch(a, b)
        out[g["label"]][metric] = {"diff": diff, "p": p}
  cells = [c for row in out.values() for c in row.values()]
  for c, adjusted in zip(cells, holm([c["p"] for c in cells])):
    c["p_holm"] = adjusted
  return out


def _cell(group: dict, metric: str, needs: Optional[str]) -> str:
  if needs and needs not in group["heads"] or metric not in group["mean"]:
    return "–"
  mean, std = 100 * group["mean"][metric], 100 * group["std"][metric]
  return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def markdown(groups: Sequence[dict], comparison: Optional[dict] = None, baseline: str = "") -> str:
  """The Markdown tables: one row per group, cells 'mean ± std' in percent (CIDEr x 100); with a comparison,
  a table of each row against the baseline."""
  lines = ["<!-- Written by sycoca_jax.tools.ablation; rebuilt after every finished run. -->", ""]
  steps = sorted({g["step"] for g in groups})
  lines.append(f"Mean ± std over seeds (sample std; one seed: mean only), in percent; CIDEr-D x 100. "
               f"Steps: {', '.join(map(str, steps)) or '-'}. '–': the run has no captioner (no IC objective).")
  for title, columns in TABLES.items():
    lines += ["", f"### {title}", "", "| run | seeds | " + " | ".join(c for c, _, _ in columns) + " |",
              "|---|---|" + "---:|" * len(columns)]
    for g in groups:
      cells = [_cell(g, metric, needs) for _, metric, needs in columns]
      lines.append(f"| {g['label']} | {len(g['seeds'])} | " + " | ".join(cells) + " |")
  if comparison:
    lines += ["", f"### Against {baseline}", "",
              f"Difference of means from the `{baseline}` row, in points, the two-sided p-value of Welch's t-test "
              "over seeds, and that p adjusted by Holm's method for every comparison in this table (one seed: no "
              "p). Read a gap as beyond the seed spread only where the adjusted p is below 0.05.", "",
              "| run | seeds | " + " | ".join(_TITLES[m] for m in COMPARED) + " |",
              "|---|---|" + "---:|" * len(COMPARED)]
    for g in groups:
      if g["label"] not in comparison:
        continue
      cells = []
      for metric in COMPARED:
        c = comparison[g["label"]].get(metric)
        cells.append("–" if c is None else f"{c['diff']:+.1f}" + (
            "" if math.isnan(c["p"]) else f" (p {c['p']:.2f}, Holm {c['p_holm']:.2f})"))
      lines.append(f"| {g['label']} | {len(g['seeds'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def chart(groups: Sequence[dict], path: epath.Path) -> bool:
  """Bar charts (mean, std error bars) of the CHART metrics; mask quality with its random baseline hatched.

  Returns False (and writes nothing) when matplotlib is missing: pip install 'sycoca_jax[ablation]'.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib is not installed (pip install 'sycoca_jax[ablation]'): no %s.", path)
    return False
  labels = [g["label"] for g in groups]
  x = np.arange(len(groups))
  cols = 4
  rows = -(-len(CHART) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, CHART):
    def values(m):
      mean = [100 * g["mean"].get(m, np.nan) if not (_NEEDS.get(m) and _NEEDS[m] not in g["heads"]) else np.nan
              for g in groups]
      std = [100 * g["std"].get(m, np.nan) for g in groups]
      return np.asarray(mean), np.nan_to_num(np.asarray(std))
    mean, std = values(metric)
    if metric == "masking/ic_object_recall":
      base, base_std = values("masking/ic_object_recall_random")
      ax.bar(x - 0.2, mean, 0.4, yerr=std, capsize=3, label="attentive")
      ax.bar(x + 0.2, base, 0.4, yerr=base_std, capsize=3, hatch="//", fill=False, label="random")
      ax.legend(fontsize=7)
    else:
      ax.bar(x, mean, 0.6, yerr=std, capsize=3, color=[f"C{i % 10}" for i in range(len(groups))])
    if metric in _CHANCE:
      ax.axhline(_CHANCE[metric], color="grey", linestyle="--", linewidth=1)
    ax.set_title(_TITLES.get(metric, metric), fontsize=9)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
  for ax in list(axes.flat)[len(CHART):]:
    ax.axis("off")
  fig.suptitle("Ablation: mean ± std over seeds (%)", fontsize=10)
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
  return True


def write_outputs(workdir: str, planned: Sequence[Run] = (), failed: Sequence[str] = (),
                  variants: Sequence[str] = (), baseline: str = "coca") -> dict:
  """DIR/ablation.json, ablation.md and ablation.png from every finished run in DIR (rows in `variants` order),
  each row compared with the `baseline` variant's when it has two or more seeds."""
  runs = finished_runs(workdir, variants)
  groups = summarise(runs)
  comparison = compare(runs, groups, baseline) if baseline else {}
  done = {r["name"] for r in runs}
  summary = {"runs": runs, "groups": groups, "pending": [r.name for r in planned if r.name not in done],
             "failed": list(failed), "columns": {t: [[c, m] for c, m, _ in cols] for t, cols in TABLES.items()},
             "baseline": baseline, "versus_baseline": comparison}
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  _write_json(root / "ablation.json", summary)
  (root / "ablation.md").write_text(markdown(groups, comparison, baseline))
  chart(groups, root / "ablation.png")
  return summary


# ------------------------------------------------------------------------------------------------ main


def main(argv):
  del argv
  from sycoca_jax import metrics  # pylint: disable=g-import-not-at-top  (loads TF: only once the tool runs)
  logging.get_absl_handler().addFilter(metrics.QuietLibraries())
  workdir = FLAGS.workdir
  order = config_variants(FLAGS.config) if FLAGS.config else []
  if FLAGS.table_only:
    planned = plan(FLAGS.config, FLAGS.variants, [int(s) for s in FLAGS.seeds], FLAGS.sweep,
                   FLAGS.overrides) if FLAGS.config else []
    summary = write_outputs(workdir, planned, variants=order, baseline=FLAGS.baseline)
    print(f"{len(summary['runs'])} finished runs -> {workdir}/ablation.{{json,md,png}}")
    return
  if not FLAGS.config:
    raise app.UsageError("--config is required (except with --table_only).")
  runs = plan(FLAGS.config, FLAGS.variants, [int(s) for s in FLAGS.seeds], FLAGS.sweep, FLAGS.overrides)
  if FLAGS.restore_from and not FLAGS.child:
    restored = restore_runs(workdir, runs, FLAGS.config, FLAGS.restore_from)
    print(f"{len(restored)} finished runs restored from {FLAGS.restore_from}: {', '.join(restored) or 'none'}.")
  failed = []
  if not FLAGS.child:
    write_outputs(workdir, runs, failed, order, FLAGS.baseline)  # what an earlier, interrupted study finished
  for i, run in enumerate(runs, 1):
    run_dir = epath.Path(workdir) / run.name
    if is_finished(run_dir, run.num_steps):
      print(f"[{i}/{len(runs)}] {run.name}: finished already, skipped.", flush=True)
      continue
    print(f"[{i}/{len(runs)}] {run.name}: training {run.num_steps} steps ...", flush=True)
    t0 = time.time()
    if FLAGS.subprocess:
      rc = _run_child(run, run_dir)
    else:
      train_and_evaluate_run(run, workdir, FLAGS.config, FLAGS.extra_evals)
      rc = 0
    if rc != 0 or not is_finished(run_dir, run.num_steps):
      failed.append(run.name)
      print(f"[{i}/{len(runs)}] {run.name}: FAILED (exit {rc}); see {run_dir}/log.txt.", flush=True)
    else:
      print(f"[{i}/{len(runs)}] {run.name}: done in {time.time() - t0:.0f} s.", flush=True)
    if not FLAGS.child:  # partial results on disk after every run
      write_outputs(workdir, runs, failed, order, FLAGS.baseline)
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
