"""The ablation tool: its plan, its tables from finished runs, and a two-run study that a rerun skips."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from sycoca_jax.tools import ablation
from tests import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sycoca_tiny.py")


def test_overrides_split_on_commas_that_start_a_new_key():
  assert ablation.split_overrides(["total_steps=5,optim.lr=1e-3", "data.crop_scale=(0.8,1.0)"]) == [
      "total_steps=5", "optim.lr=1e-3", "data.crop_scale=(0.8,1.0)"]
  assert ablation.split_overrides(["evals.zeroshot.datasets=[a,b],seed=3"]) == ["evals.zeroshot.datasets=[a,b]",
                                                                                 "seed=3"]


def test_sweep_and_run_names():
  assert ablation.parse_sweep("loss.mim_weight=0.1, 0.5,1") == ("loss.mim_weight", ["0.1", "0.5", "1"])
  assert ablation.parse_sweep("") == ("", [""])
  with pytest.raises(ValueError, match="KEY=V1,V2"):
    ablation.parse_sweep("loss.mim_weight")
  assert ablation.run_name("sycoca", 2) == "sycoca_seed2"
  assert ablation.run_name("sycoca", 0, "model.masking.mim_ratio", "0.25") == "sycoca_mim_ratio0.25_seed0"
  assert ablation.with_variant("configs/x.py:runlocal,variant=clip", "coca") == "configs/x.py:runlocal,variant=coca"
  assert ablation.with_variant("configs/x.py", "coca") == "configs/x.py:variant=coca"


def test_plan_is_seed_major_with_variant_sweep_and_overrides():
  runs = ablation.plan(f"{TINY}:runlocal", ["coca_tgmim_random", "sycoca"], [0, 1],
                       "model.masking.mim_ratio=0.25,0.75", ["total_steps=3,optim.lr=0.002"])
  assert [r.name for r in runs[:4]] == ["coca_tgmim_random_mim_ratio0.25_seed0", "sycoca_mim_ratio0.25_seed0",
                                        "coca_tgmim_random_mim_ratio0.75_seed0", "sycoca_mim_ratio0.75_seed0"]
  assert [r.seed for r in runs] == [0] * 4 + [1] * 4
  for r in runs:
    c = r.config
    assert (c.seed, c.total_steps, c.optim.lr) == (r.seed, 3, 0.002)
    assert c.model.masking.mim_ratio == float(r.sweep_value)
    assert c.model.masking.strategy == ("random" if r.variant == "coca_tgmim_random" else "attentive")
    assert c.model.vision.image_size == 32  # runlocal kept


def test_rows_come_from_the_config_files_variants(tmp_path):
  assert ablation.config_variants(f"{TINY}:runlocal") == ["clip", "coca", "coca_am", "coca_mim_image_only",
                                                          "coca_tgmim_random", "sycoca"]
  assert [r.variant for r in ablation.plan(f"{TINY}:runlocal", [], [0])] == ablation.config_variants(TINY)
  with pytest.raises(ValueError, match="declares no VARIANTS"):
    ablation.config_variants(os.path.join(ROOT, "configs", "eval_zeroshot.py"))
  for variant in ("sycoca", "coca", "zeta"):  # the table follows the given order; others after it, by name
    _fake_run(tmp_path, variant, 0, {"retrieval/i2t_r1": 0.1})
  assert [r["variant"] for r in ablation.finished_runs(str(tmp_path), ["sycoca", "coca"])] == ["sycoca", "coca",
                                                                                               "zeta"]


def test_plan_fails_before_training_on_bad_rows():
  with pytest.raises(ValueError, match="not among"):
    ablation.plan(TINY, ["cocaa"], [0])
  with pytest.raises(AttributeError, match="total_stepz"):
    ablation.plan(TINY, ["coca"], [0], overrides=["total_stepz=3"])
  # TG-MIM weight swept onto a row that hides no patch: refused here, not after a compile in a child.
  with pytest.raises(ValueError, match="clip_mim_weight0.5_seed0: config.loss.mim_weight"):
    ablation.plan(TINY, ["clip"], [0], "loss.mim_weight=0.5")


def test_sigmoid_contrastive_loss_on_every_row():
  runs = ablation.plan(f"{TINY}:runlocal", [], [0], overrides=["loss.contrastive=sigmoid"])
  assert [r.variant for r in runs] == ablation.config_variants(TINY)
  assert all(r.config.loss.contrastive == "sigmoid" for r in runs)
  with pytest.raises(ValueError, match="coca_seed0: config.loss.contrastive: 'sigmod'"):
    ablation.plan(TINY, ["coca"], [0], overrides=["loss.contrastive=sigmod"])


def test_extra_evals_skip_the_runs_own_and_rename_clashes():
  run, = ablation.plan(TINY, ["sycoca"], [0])
  evals = ablation.final_evals(run, os.path.join(ROOT, "configs", "eval_all.py"), TINY)
  assert set(evals) == {"retrieval", "zeroshot", "captioning", "masking", "captioning_extra", "retrieval_comp",
                        "probe", "vqa"}  # same-settings retrieval / zero-shot run once
  assert (evals.captioning.sampler, evals.captioning_extra.sampler) == ("greedy", "beam")
  assert evals.captioning_extra.prefix == "captioning_extra"


def _fake_run(workdir, variant, seed, metrics, heads=("itc", "ic")):
  run_dir = epath.Path(workdir) / ablation.run_name(variant, seed)
  run_dir.mkdir(parents=True)
  (run_dir / ablation.FINAL_EVAL).write_text(json.dumps(dict(
      name=run_dir.name, variant=variant, seed=seed, sweep_key="", sweep_value="", step=10, heads=list(heads),
      metrics=metrics)))


def test_tables_and_chart_from_finished_runs(tmp_path):
  for seed, r1 in enumerate((0.2, 0.4)):
    _fake_run(tmp_path, "sycoca", seed, {"retrieval/i2t_r1": r1, "captioning/cider": 0.5,
                                         "masking/ic_object_recall": 0.7, "masking/ic_object_recall_random": 0.5})
  _fake_run(tmp_path, "clip", 0, {"retrieval/i2t_r1": 0.1, "captioning/cider": 0.01}, heads=("itc",))
  summary = ablation.write_outputs(str(tmp_path))
  assert [g["label"] for g in summary["groups"]] == ["clip", "sycoca"]  # by name without the config's VARIANTS
  sycoca = summary["groups"][1]
  assert sycoca["seeds"] == [0, 1]
  np.testing.assert_allclose(sycoca["mean"]["retrieval/i2t_r1"], 0.3)
  np.testing.assert_allclose(sycoca["std"]["retrieval/i2t_r1"], np.std([0.2, 0.4], ddof=1))
  table = (tmp_path / "ablation.md").read_text()
  assert "| sycoca | 2 | 30.0 ± 14.1 |" in table
  clip_rows = [line for line in table.splitlines() if line.startswith("| clip |")]
  assert len(clip_rows) == 2 and "| 10.0 |" in clip_rows[0]
  assert "| – | – |" in clip_rows[0]  # CIDEr and SG F1: CLIP has no captioner
  stored = json.loads((tmp_path / "ablation.json").read_text())  # standard JSON: one seed's std is null
  assert stored["groups"][0]["std"]["retrieval/i2t_r1"] is None
  assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_welch_matches_the_textbook_formula():
  a, b = [14.7, 14.7, 13.8], [14.0, 13.9, 11.5]
  va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
  t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)  # Welch-Satterthwaite
  from scipy import stats  # pylint: disable=g-import-not-at-top
  diff, p = ablation.welch(a, b)
  np.testing.assert_allclose(diff, np.mean(a) - np.mean(b))
  np.testing.assert_allclose(p, 2 * stats.t.sf(abs(t), dof))
  assert 0.2 < p < 0.3  # a 1.3-point gap with these spreads is not significant
  assert np.isnan(ablation.welch([1.0], b)[1])
  assert ablation.welch([2.0, 2.0], [2.0, 2.0]) == (0.0, 1.0)


def test_holm_adjusts_for_the_number_of_comparisons():
  # m = 4 valid p-values: 0.01 * 4, then max(0.04, 0.02 * 3), max(0.06, 0.04 * 2), max(0.08, 0.5 * 1).
  np.testing.assert_allclose(ablation.holm([0.04, 0.01, float("nan"), 0.5, 0.02]),
                             [0.08, 0.04, np.nan, 0.5, 0.06])
  assert ablation.holm([0.3, 0.4]) == [0.6, 0.6]  # the running maximum keeps the order; capped at 1 otherwise
  assert ablation.holm([0.9, 0.8]) == [1.0, 1.0]


def test_rows_are_compared_with_the_baseline(tmp_path):
  for seed, (coca, sycoca) in enumerate(((0.10, 0.20), (0.12, 0.22), (0.11, 0.21))):
    _fake_run(tmp_path, "coca", seed, {"retrieval/i2t_r1": coca, "captioning/cider": 0.5})
    _fake_run(tmp_path, "sycoca", seed, {"retrieval/i2t_r1": sycoca, "captioning/cider": 0.5})
  _fake_run(tmp_path, "clip", 0, {"retrieval/i2t_r1": 0.3}, heads=("itc",))
  summary = ablation.write_outputs(str(tmp_path), baseline="coca")
  versus = summary["versus_baseline"]
  assert set(versus) == {"clip", "sycoca"}
  np.testing.assert_allclose(versus["sycoca"]["retrieval/i2t_r1"]["diff"], 10.0)
  assert versus["sycoca"]["retrieval/i2t_r1"]["p"] < 1e-3  # same spread, 10 points apart
  assert versus["sycoca"]["captioning/cider"] == {"diff": 0.0, "p": 1.0, "p_holm": 1.0}
  assert "captioning/cider" not in versus["clip"]  # no captioner
  table = (tmp_path / "ablation.md").read_text()
  assert "### Against coca" in table
  assert "| sycoca | 3 | +10.0 (p 0.00, Holm 0.00) | – | – | – | +0.0 (p 1.00, Holm 1.00) | – | – |" in table
  assert "| clip | 1 | +19.0 | – |" in table  # one seed: the difference, no p
  # A baseline with one seed, or none: no comparison.
  assert ablation.write_outputs(str(tmp_path), baseline="clip")["versus_baseline"] == {}
  assert "Against" not in ablation.markdown(summary["groups"])


def test_a_run_dir_trained_with_another_config_is_refused(tmp_path):
  run, = ablation.plan(f"{TINY}:runlocal", ["coca"], [0])
  ablation._check_same_config(epath.Path(tmp_path) / run.name, run, TINY)
  ablation._check_same_config(epath.Path(tmp_path) / run.name, run, TINY)  # same config: fine
  run.config.evals.retrieval.max_examples = 7  # bookkeeping: fine
  ablation._check_same_config(epath.Path(tmp_path) / run.name, run, TINY)
  other, = ablation.plan(f"{TINY}:runlocal", ["coca"], [0], overrides=["optim.lr=0.5"])
  with pytest.raises(ValueError, match=r"another config \(optim.lr: 0.001 -> 0.5\)"):
    ablation._check_same_config(epath.Path(tmp_path) / run.name, other, TINY)


def test_finished_runs_are_restored_from_an_earlier_summary(tmp_path):
  planned = ablation.plan(f"{TINY}:runlocal", ["clip", "coca"], [0, 1])
  steps = planned[0].num_steps
  earlier = {"runs": [{"name": "clip_seed0", "step": steps, "metrics": {"retrieval/i2t_r1": 0.25}},
                      {"name": "coca_seed0", "step": steps - 1, "metrics": {}},  # not at the plan's last step
                      {"name": "clip_seed7", "step": steps, "metrics": {}},  # not in the plan
                      {"name": "coca_seed1", "step": steps, "metrics": {"retrieval/i2t_r1": 0.5}}]}
  (tmp_path / "earlier.json").write_text(json.dumps(earlier))
  (tmp_path / "study" / "coca_seed1").mkdir(parents=True)
  (tmp_path / "study" / "coca_seed1" / "run.json").write_text("{}")  # a run already started here: left alone
  restored = ablation.restore_runs(str(tmp_path / "study"), planned, TINY, str(tmp_path / "earlier.json"))
  assert restored == ["clip_seed0"]
  run_dir = epath.Path(tmp_path / "study" / "clip_seed0")
  assert ablation.is_finished(run_dir, steps) and not ablation.is_finished(tmp_path / "study" / "coca_seed0", steps)
  assert json.loads((run_dir / "final_eval.json").read_text()) == earlier["runs"][0]
  ablation._check_same_config(run_dir, planned[0], TINY)  # its run.json is this plan's config
  assert ablation.restore_runs(str(tmp_path / "study"), planned, TINY, str(tmp_path / "earlier.json")) == []


# Two variants, one seed, two steps each, evaluators on a few examples: the whole study path in children.
_SMALL_EVALS = ("total_steps=2,evals.retrieval.max_examples=16,evals.zeroshot.max_examples=8,"
                "evals.captioning.max_examples=8,evals.masking.max_examples=8")


def _study(workdir):
  env = distributed.child_env()  # one CPU device per child: compiles faster than eight fake ones
  cmd = [sys.executable, "-m", "sycoca_jax.tools.ablation", f"--config={TINY}:runlocal", "--variants=clip,coca",
         "--seeds=0", f"--overrides={_SMALL_EVALS}", f"--workdir={workdir}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow(reason="two ablation studies in subprocesses, each training and evaluating two rows")
def test_study_trains_evaluates_tabulates_and_skips_finished_runs(tmp_path):
  log = _study(tmp_path)
  assert "clip_seed0: done" in log and "coca_seed0: done" in log
  summary = json.loads((tmp_path / "ablation.json").read_text())
  assert [g["label"] for g in summary["groups"]] == ["clip", "coca"] and summary["pending"] == []
  for g in summary["groups"]:
    for key in ("retrieval/i2t_r1", "retrieval/fg_object_itc", "zeroshot/scenes_shape_top1", "captioning/cider",
                "masking/ic_object_recall", "masking/ic_object_recall_random"):
      assert key in g["mean"], (g["label"], key)
  table = (tmp_path / "ablation.md").read_text()
  assert "| clip | 1 |" in table and "| coca | 1 |" in table
  assert (tmp_path / "ablation.png").stat().st_size > 0
  finals = {name: (tmp_path / name / "final_eval.json").read_text() for name in ("clip_seed0", "coca_seed0")}
  checkpoint = tmp_path / "coca_seed0" / "checkpoints" / "2"
  mtime = checkpoint.stat().st_mtime_ns
  shutil.rmtree(tmp_path / "clip_seed0" / "checkpoints")  # deleted to save disk: the run stays finished

  log = _study(tmp_path)
  assert "clip_seed0: finished already, skipped" in log and "coca_seed0: finished already, skipped" in log
  assert checkpoint.stat().st_mtime_ns == mtime and not (tmp_path / "clip_seed0" / "checkpoints").exists()
  assert {name: (tmp_path / name / "final_eval.json").read_text() for name in finals} == finals
