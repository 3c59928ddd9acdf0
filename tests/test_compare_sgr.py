"""tools/compare_sgr.py (``make compare``) and the shared runner tools/experiments.py:
the statistics against hand-computed values, the tables, the learning curve and the files from
known per-seed figures, and (slow) a real pair trained at two budgets."""
import importlib.util
import json
import math
import os
import sys

import pytest
from conftest import REPO, forked_subprocess
from PIL import Image

from sgr_d2.data.toy import TOY_CLASSES
from sgr_d2.evaluation import METRIC_KEYS

sys.path.insert(0, os.path.join(REPO, "tools"))
import experiments  # noqa: E402

COMPARE_BUDGET = 1000  # make compare's SOLVER.MAX_ITER: the first budget where SGR's gap exceeds 3 std (docs/evidence.md)


def _tool():
    spec = importlib.util.spec_from_file_location("_compare_sgr", os.path.join(REPO, "tools", "compare_sgr.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mean_std_is_the_sample_standard_deviation():
    tool = _tool()
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    mean, std = tool.mean_std([1, 2, 4])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(7 / 3))
    assert std != pytest.approx(math.sqrt(14 / 9))  # the population std (over n)
    mean, std = tool.mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)
    assert tool.format_mean_std(mean, std, 1) == "5.0 ± –"
    assert tool.format_mean_std(61.7, 1.0583, 1) == "61.7 ± 1.1"
    with pytest.raises(ValueError, match="no values"):
        tool.mean_std([])


def _fake_run(path, miou, miou_tta, times, peak, ious, tokens=None, classes=TOY_CLASSES, accs=None):
    """A finished run's folder as train_and_evaluate leaves it (class accuracies: ``accs``, or
    each IoU + 1)."""
    os.makedirs(path)
    lines = [{"iteration": 19 + 20 * i, "time": t, "total_loss": 1.0} for i, t in enumerate(times)]
    accs = accs if accs is not None else [v + 1 for v in ious]
    ev = {"iteration": 299, "sem_seg/mIoU": miou, **{f"sem_seg/IoU-{c}": v for c, v in zip(classes, ious)},
          **{f"sem_seg/ACC-{c}": v for c, v in zip(classes, accs)}}
    ev.update({f"token_semantics/{k}": v for k, v in (tokens or {}).items()})
    lines.append(ev)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    with open(os.path.join(path, "peak_memory.json"), "w") as f:
        json.dump({"peak_rss_mib": peak, "peak_cuda_mib": None}, f)
    with open(os.path.join(path, "results_TTA.json"), "w") as f:
        json.dump({"sem_seg_TTA/mIoU": miou_tta}, f)
    with open(os.path.join(path, "wall_time.json"), "w") as f:
        json.dump({"wall_s": 60.0 * miou_tta}, f)  # minutes = the TTA mIoU: a known sum


def test_compare_tables_from_known_per_seed_figures(tmp_path, capsys):
    """The issue's figures: baseline 61.3 / 62.9 / 60.9 (61.7 ± 1.1 with the sample std; the
    population std would give ± 0.9), SGR 60.6 / 61.7 / 61.2 (61.2 ± 0.6, population ± 0.4)."""
    tool = _tool()
    root = tmp_path / "cmp"
    base = {1: 61.3, 2: 62.9, 3: 60.9}
    sgr = {1: 60.6, 2: 61.7, 3: 61.2}
    for seed in (1, 2, 3):
        # step times: the median of the logged values, not their mean (1.0 < mean 2.33)
        _fake_run(str(root / "dil_fcn_r18" / "it300" / "baseline" / f"seed{seed}"), base[seed], base[seed] + 1,
                  [1.0, 5.0, 0.9 + 0.1 * seed], 1000.0, [90, 80, 70, 60, 50, 10 * seed])
        _fake_run(str(root / "dil_fcn_r18" / "it300" / "sgr" / f"seed{seed}"), sgr[seed], sgr[seed] + 2,
                  [1.2, 0.5, 1.1 + 0.1 * seed], 1100.0 + seed, [91, 81, 71, 61, 51, 5 * seed],
                  {"S_C": 0.5, "D_C": 0.9, "S_I": 0.6, "D_I": 0.7 + 0.1 * seed})
    results = tool.main(["--pairs", "dil_fcn_r18", "--output", str(root), "--skip-existing"])
    out = capsys.readouterr().out
    summary = results["dil_fcn_r18"]["budgets"]["300"]
    assert summary["baseline"]["summary"]["mIoU"] == pytest.approx((61.7, math.sqrt(1.12)))
    assert summary["sgr"]["summary"]["mIoU"][0] == pytest.approx(183.5 / 3)
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| model | mIoU |")))
    main_table = lines[start + 2:lines.index("", start)]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in main_table}
    assert list(rows) == ["baseline", "SGR"]
    # mIoU, ms+flip, S_C, D_C, S_I, D_I, step (medians 1.0, 1.1, 1.2), memory, step ratio, memory ratio
    assert rows["baseline"] == ["61.7 ± 1.1", "62.7 ± 1.1", "–", "–", "–", "–", "1.10 ± 0.10", "1000 ± 0",
                                "1.00", "1.00"]
    assert rows["SGR"] == ["61.2 ± 0.6", "63.2 ± 0.6", "0.500 ± 0.000", "0.900 ± 0.000", "0.600 ± 0.000",
                           "0.900 ± 0.100", "1.20 ± 0.00", "1102 ± 1", "1.09", "1.10"]
    assert "| model | " + " | ".join(TOY_CLASSES) + " |" in lines
    assert "| baseline | 90.0 ± 0.0 | 80.0 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 20.0 ± 10.0 |" in out
    assert "| SGR | 60.6 / 62.6 | 61.7 / 63.7 | 61.2 / 63.2 |" in out
    # pixel accuracy per class (the fake runs' IoU + 1)
    assert "Per-class pixel accuracy (recall, single-scale):" in out
    assert "| baseline | 91.0 ± 0.0 | 81.0 ± 0.0 | 71.0 ± 0.0 | 61.0 ± 0.0 | 51.0 ± 0.0 | 21.0 ± 10.0 |" in out
    assert "| SGR | 92.0 ± 0.0 | 82.0 ± 0.0 | 72.0 ± 0.0 | 62.0 ± 0.0 | 52.0 ± 0.0 | 11.0 ± 5.0 |" in out
    # wall time: the sum of the six runs' recorded wall times
    total = sum(base.values()) + 3 + sum(sgr.values()) + 6
    assert f"Wall time of these 6 runs (training and evaluations, summed over the runs): {total:.1f} min." in out
    assert "scores at most" not in out  # the shape toy has no local-classifier ceiling
    saved = json.loads((root / "compare.json").read_text())
    assert saved["std"] == "sample (ddof=1)" and saved["seeds"] == [1, 2, 3]
    at300 = saved["pairs"]["dil_fcn_r18"]["budgets"]["300"]
    assert at300["baseline"]["summary"]["S_C"] == [None, None]
    assert [r["mIoU"] for r in at300["sgr"]["runs"]] == [60.6, 61.7, 61.2]
    assert at300["baseline"]["summary"]["ACC-kite"] == pytest.approx([21.0, 10.0])
    assert not (root / "compare_curve.png").exists()  # one budget: no learning curve
    assert (root / "compare.md").read_text().startswith("`python tools/compare_sgr.py --pairs dil_fcn_r18")
    with Image.open(root / "compare.png") as im:
        assert im.size == (500, 400)  # figsize (5, 4) per pair at dpi 100


def test_compare_rejects_pairs_it_cannot_compare():
    tool = _tool()
    with pytest.raises(FileNotFoundError, match="configs/toy/nope_sgr.yaml"):
        tool.resolve_pair("nope")
    with pytest.raises(ValueError, match="not a semantic-segmentation config"):
        tool.resolve_pair("mask_rcnn_r18_fpn")
    with pytest.raises(ValueError, match="--seeds is 0"):
        tool.main(["--seeds", "0", "--pairs", "dil_fcn_r18"])


def test_runner_reads_the_last_evaluation_and_the_median_step(tmp_path):
    lines = [{"iteration": 19, "time": 3.0}, {"iteration": 20, "sem_seg/mIoU": 10.0},
             {"iteration": 39, "time": 1.0}, {"iteration": 59, "time": 2.5},
             {"iteration": 60, "sem_seg/mIoU": 40.0, "sem_seg/IoU-sky": 70.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert experiments.median_step_time(str(tmp_path)) == 2.5
    assert experiments.read_last_evaluation(str(tmp_path)) == {"sem_seg/mIoU": 40.0, "sem_seg/IoU-sky": 70.0}
    with pytest.raises(FileNotFoundError, match="peak_memory.json"):
        experiments.read_run(str(tmp_path))
    (tmp_path / "metrics.json").write_text(json.dumps(lines[-1]) + "\n")
    assert math.isnan(experiments.median_step_time(str(tmp_path)))  # too short a run to be timed
    (tmp_path / "metrics.json").write_text('{"iteration": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        experiments.read_last_evaluation(str(tmp_path))


@pytest.mark.slow
def test_compare_trains_a_pair_at_two_budgets(tmp_path, monkeypatch):
    """One seed, budgets of 2 and 3 iterations, evaluation at 32 px, the multi-scale test reduced
    to scale 1 without flip (its mIoU must then equal the single-scale one: the same model, read
    from results_TTA.json). Each budget is a complete run of its own (its final checkpoint records
    that budget's last iteration) and each run's figures are those its folder holds. (The control's
    config: test_each_variant_changes_only_its_own_keys.) The runner's children are forked from a
    server that imported sgr_d2 once (conftest.forked_subprocess), with the commands it builds."""
    tool = _tool()
    monkeypatch.setattr(experiments, "subprocess", forked_subprocess())
    opts = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.MIN_SIZE_TEST", "32", "TEST.AUG.SCALES", "[1.0]", "TEST.AUG.FLIP", "False",
            "SOLVER.CHECKPOINT_PERIOD", "1000"]
    results = tool.main(["--pairs", "dil_fcn_r18", "--seeds", "1", "--iters", "3", "2", "--jobs", "2",
                         "--output", str(tmp_path), *opts])
    budgets = results["dil_fcn_r18"]["budgets"]
    assert list(budgets) == ["2", "3"] and list(budgets["2"]) == ["baseline", "sgr"]
    import torch

    for b in (2, 3):
        for v in ("baseline", "sgr"):
            run_dir = tmp_path / "dil_fcn_r18" / f"it{b}" / v / "seed1"
            run = budgets[str(b)][v]["runs"][0]
            assert run["mIoU"] == experiments.read_last_evaluation(str(run_dir))["sem_seg/mIoU"]
            assert run["mIoU_TTA"] == pytest.approx(run["mIoU"], abs=1e-6)
            final = torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=True)
            assert final["iteration"] == b - 1
            assert any(".sgr." in k for k in final["model"]) == (v == "sgr"), [k for k in final["model"]][:5]
    sgr = budgets["3"]["sgr"]["runs"][0]
    assert all(0.0 <= sgr[k] <= 1.0 for k in METRIC_KEYS)
    assert all(math.isnan(budgets["3"]["baseline"]["runs"][0][k]) for k in ("S_C", "D_I"))
    log = (tmp_path / "dil_fcn_r18" / "it3" / "sgr" / "seed1" / "train_stdout.log").read_text().splitlines()[0]
    assert "SEED 1" in log and "SOLVER.MAX_ITER 3" in log and "TEST.TOKEN_SEMANTICS True" in log
    assert (tmp_path / "compare_curve.png").is_file()


def test_make_compare_runs_both_toys_at_the_chosen_budget_with_the_control():
    """What README / docs/evidence.md say `make compare` does."""
    args = _tool().get_parser().parse_args([])
    assert args.pairs == ["dil_fcn_r18", "dil_fcn_r18_context"] and args.seeds == 3 and not args.ablate
    with open(os.path.join(REPO, "Makefile")) as f:
        make = f.read()
    target = make[make.index("\ncompare: $(STAMP)\n"):].split("\n\n")[0]
    assert "$(PY) tools/compare_sgr.py --iters $(COMPARE_ITERS) --control --output $(COMPARE_OUT)" in target
    assert "COMPARE_OUT ?= output/compare" in make and f"COMPARE_ITERS ?= {COMPARE_BUDGET}" in make


def test_each_variant_changes_only_its_own_keys():
    from sgr_d2.config import load_config

    tool = _tool()
    configs = {k: os.path.join(REPO, "configs", "toy", f"dil_fcn_r18_context{s}.yaml") for k, s in
               (("baseline", ""), ("sgr", "_sgr"))}
    keys = ("UNION_WEIGHT", "CLASS_WEIGHT", "DIVERSITY_WEIGHT", "LOSS_WEIGHT")
    zeroed = {}
    for name, (_, start, opts) in tool.ABLATIONS.items():
        assert start == "sgr"
        sgr = load_config(configs[start], opts).MODEL.SGR  # the overrides must merge (a float key)
        zeroed[name] = [k for k in keys if sgr[k] == 0.0]
        assert all(sgr[k] > 0 for k in keys if k not in zeroed[name])
    assert zeroed == {"no_union": ["UNION_WEIGHT"], "no_class": ["CLASS_WEIGHT"],
                      "no_diversity": ["DIVERSITY_WEIGHT"], "unsupervised": ["LOSS_WEIGHT"]}
    _, start, opts = tool.CONTROL["aspp"]
    base, control = load_config(configs["baseline"]), load_config(configs[start], opts)
    assert start == "baseline" and control.MODEL.SEM_SEG_HEAD.NAME == "DeepLabV3Head"
    control.defrost()
    control.MODEL.SEM_SEG_HEAD.NAME = base.MODEL.SEM_SEG_HEAD.NAME
    assert control == base  # the head is the only difference


def _context_runs(root, budget, figures):
    """Fake context-toy runs: ``figures`` {variant: [(mIoU, red acc, blue acc) per seed]}."""
    for v, per_seed in figures.items():
        for seed, (miou, red, blue) in enumerate(per_seed, 1):
            _fake_run(str(root / "dil_fcn_r18_context" / f"it{budget}" / v / f"seed{seed}"), miou, miou, [1.0],
                      900.0, [90, 70, 50, 30, 30], classes=CONTEXT, accs=[99, 80, 60, red, blue])


CONTEXT = ["ground", "flag", "rock", "red_team", "blue_team"]


def test_learning_curve_tables_and_the_three_sigma_rule(tmp_path, capsys):
    """At 300 iterations SGR leads by 4.0 with stds 2.0 / 1.0: not beyond 3 sigma (6.0); at
    1000 it leads by 20.0 with stds 1.0 / 2.0: beyond (6.0). The control's 1000-iteration gap,
    5.0 with stds 1.0 / 2.0 (threshold 6.0), is not: the larger of the two stds sets the
    threshold (the smaller, 1.0, would call it)."""
    tool = _tool()
    _context_runs(tmp_path, 300, {"baseline": [(50, 40, 60), (52, 41, 61), (54, 42, 62)],
                                  "sgr": [(55, 50, 50), (56, 51, 51), (57, 52, 52)],
                                  "aspp": [(50, 45, 55), (51, 45, 55), (52, 45, 55)]})
    _context_runs(tmp_path, 1000, {"baseline": [(54, 45, 55), (55, 45, 55), (56, 45, 55)],
                                   "sgr": [(73, 90, 91), (75, 92, 93), (77, 94, 95)],
                                   "aspp": [(58, 60, 40), (60, 61, 41), (62, 62, 42)]})
    results = tool.main(["--pairs", "dil_fcn_r18_context", "--iters", "1000", "300", "--control",
                         "--output", str(tmp_path), "--skip-existing"])
    out = capsys.readouterr().out
    assert "| iterations | baseline | SGR | DeepLabV3 head, no SGR | SGR − baseline | DeepLabV3 head, no SGR − baseline |" in out
    assert "| 300 | 52.0 ± 2.0 | 56.0 ± 1.0 | 51.0 ± 1.0 | +4.0 | -1.0 |" in out
    assert "| 1000 | 55.0 ± 1.0 | 75.0 ± 2.0 | 60.0 ± 2.0 | +20.0 (> 3σ) | +5.0 |" in out
    assert "- SGR − baseline exceeds three standard deviations from 1000 iterations on." in out
    assert "- DeepLabV3 head, no SGR − baseline exceeds three standard deviations at no budget." in out
    assert "Pixel accuracy of red_team / blue_team (single-scale, mean ± std):" in out
    assert "| 1000 | 45.0 ± 0.0 / 55.0 ± 0.0 | 92.0 ± 2.0 / 93.0 ± 2.0 | 61.0 ± 1.0 / 41.0 ± 1.0 |" in out
    assert ("scores at most 73.3 mIoU on `sgr_toy_context_sem_seg_val`, and 50.0% on the pixels of red_team "
            "and blue_team") in out
    assert "#### `dil_fcn_r18_context` vs `dil_fcn_r18_context_sgr`, 300 iterations" in out
    assert results["dil_fcn_r18_context"]["accuracy_ceiling"] == 50.0
    with Image.open(tmp_path / "compare_curve.png") as im:
        assert im.size == (1500, 400)  # mIoU and the two teams' accuracies, (5, 4) each at dpi 100
    with Image.open(tmp_path / "compare.png") as im:
        assert im.size == (500, 400)
    assert json.loads((tmp_path / "compare.json").read_text())["budgets"] == [300, 1000]


PANOPTIC_CLASSES = ["ball", "box", "kite", "sky", "grass", "wall"]


def test_a_panoptic_pair_is_judged_by_pq_with_the_true_instance_variant(tmp_path, capsys):
    """The panoptic toy's pair with --instances: three variants, PQ first (PQ 40 / 44 / 42 over
    the seeds for the baseline: 42.0 ± 2.0), PQ of things and stuff, mask AP and mIoU beside it,
    no multi-scale evaluation (no results_TTA.json), the learning curve in PQ, the SGR variants'
    token metrics asked for."""
    tool = _tool()
    pq = {"baseline": [40, 44, 42], "sgr": [50, 51, 52], "sgr_instances": [45, 47, 49]}
    for budget in (300, 600):
        for v, per_seed in pq.items():
            for seed, value in enumerate(per_seed, 1):
                path = tmp_path / "mask2former_r18_panoptic" / f"it{budget}" / v / f"seed{seed}"
                _fake_run(str(path), 30.0 + seed, 0, [1.0], 800.0, [10] * 6, classes=PANOPTIC_CLASSES)
                (path / "results_TTA.json").unlink()  # a panoptic run evaluates single-scale only
                ev = json.loads((path / "metrics.json").read_text().splitlines()[-1])
                ev.update({"panoptic_seg/PQ": value + budget / 100, "panoptic_seg/PQ_th": value - 10,
                           "panoptic_seg/PQ_st": value + 10, "segm/AP": value / 2})
                with open(path / "metrics.json", "a") as f:
                    f.write(json.dumps(ev) + "\n")
    results = tool.main(["--pairs", "mask2former_r18_panoptic", "--iters", "300", "600", "--instances",
                         "--output", str(tmp_path), "--skip-existing"])
    out = capsys.readouterr().out
    assert results["mask2former_r18_panoptic"]["task"] == "panoptic"
    assert ("| model | PQ | PQ_th | PQ_st | mask AP | mIoU | S_C | D_C | S_I | D_I | step (s) | peak mem (MiB) "
            "| step ratio | mem ratio |") in out
    assert "| baseline | 48.0 ± 2.0 | 32.0 ± 2.0 | 52.0 ± 2.0 | 21.0 ± 1.0 | 32.0 ± 1.0 |" in out  # 600 it
    assert "| SGR, true instances | 53.0 ± 2.0 | 37.0 ± 2.0 | 57.0 ± 2.0 | 23.5 ± 1.0 | 32.0 ± 1.0 |" in out
    assert "| SGR | 53.0 / 40.0 | 54.0 / 41.0 | 55.0 / 42.0 |" in out  # PQ / PQ_th per seed, 300 it
    assert "#### `mask2former_r18_panoptic`: learning curve (PQ single-scale, mean ± std over the seeds)" in out
    # SGR − baseline: +9.0 with stds 1.0 / 2.0 (> 6.0); the instances' +5.0 is not
    assert "| 600 | 48.0 ± 2.0 | 57.0 ± 1.0 | 53.0 ± 2.0 | +9.0 (> 3σ) | +5.0 |" in out
    runs = tool.plan_runs(tool.get_parser().parse_args(["--instances"]), {"p": {"configs": {
        "baseline": "b.yaml", "sgr": "s.yaml", "sgr_instances": "i.yaml"}}}, [1], [300],
        ["baseline", "sgr", "sgr_instances"])
    assert [(r[3], r[4], "TEST.TOKEN_SEMANTICS" in r[5]) for r in runs] == [
        ("baseline", "b.yaml", False), ("sgr", "s.yaml", True), ("sgr_instances", "i.yaml", True)]
    info = tool.resolve_pair("mask2former_r18_panoptic", instances=True)
    assert info["configs"]["sgr_instances"].endswith("configs/toy/mask2former_r18_panoptic_sgr_instances.yaml")
    with pytest.raises(FileNotFoundError, match="configs/toy/dil_fcn_r18_sgr_instances.yaml"):
        tool.resolve_pair("dil_fcn_r18", instances=True)


def test_compare_refuses_what_it_cannot_run(tmp_path):
    tool = _tool()
    with pytest.raises(ValueError, match="--control replaces the baseline's Dilated-FCN head.*'maskformer_r18'"):
        tool.main(["--pairs", "maskformer_r18", "--control", "--output", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--iters is \[300, 0\]"):
        tool.main(["--pairs", "dil_fcn_r18", "--iters", "300", "0", "--output", str(tmp_path)])
