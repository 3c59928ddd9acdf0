"""tools/compare_sgr.py (``make compare``) and the shared runner sgr_d2/engine/experiments.py:
the statistics against hand-computed values, the tables and files from known per-seed figures,
and (slow) one real baseline + SGR pair trained for two iterations."""
import importlib.util
import json
import math
import os

import pytest
from conftest import REPO
from PIL import Image

from sgr_d2.data.toy import TOY_CLASSES
from sgr_d2.engine import experiments


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


def _fake_run(path, miou, miou_tta, times, peak, ious, tokens=None):
    """A finished run's folder as train_and_evaluate leaves it."""
    os.makedirs(path)
    lines = [{"iteration": 19 + 20 * i, "time": t, "total_loss": 1.0} for i, t in enumerate(times)]
    ev = {"iteration": 299, "sem_seg/mIoU": miou, **{f"sem_seg/IoU-{c}": v for c, v in zip(TOY_CLASSES, ious)},
          **{f"sem_seg/ACC-{c}": v + 1 for c, v in zip(TOY_CLASSES, ious)}}
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
        _fake_run(str(root / "dil_fcn_r18" / "baseline" / f"seed{seed}"), base[seed], base[seed] + 1,
                  [1.0, 5.0, 0.9 + 0.1 * seed], 1000.0, [90, 80, 70, 60, 50, 10 * seed])
        _fake_run(str(root / "dil_fcn_r18" / "sgr" / f"seed{seed}"), sgr[seed], sgr[seed] + 2,
                  [1.2, 0.5, 1.1 + 0.1 * seed], 1100.0 + seed, [91, 81, 71, 61, 51, 5 * seed],
                  {"S_C": 0.5, "D_C": 0.9, "S_I": 0.6, "D_I": 0.7 + 0.1 * seed})
    results = tool.main(["--pairs", "dil_fcn_r18", "--output", str(root), "--skip-existing"])
    out = capsys.readouterr().out
    summary = results["dil_fcn_r18"]["variants"]
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
    assert f"Wall time of these 6 runs (training and evaluations, one after the other): {total:.1f} min." in out
    assert "scores at most" not in out  # the shape toy has no local-classifier ceiling
    saved = json.loads((root / "compare.json").read_text())
    assert saved["std"] == "sample (ddof=1)" and saved["seeds"] == [1, 2, 3]
    assert saved["pairs"]["dil_fcn_r18"]["variants"]["baseline"]["summary"]["S_C"] == [None, None]
    assert [r["mIoU"] for r in saved["pairs"]["dil_fcn_r18"]["variants"]["sgr"]["runs"]] == [60.6, 61.7, 61.2]
    assert saved["pairs"]["dil_fcn_r18"]["variants"]["baseline"]["summary"]["ACC-kite"] == pytest.approx([21.0, 10.0])
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
def test_compare_trains_a_pair_and_reads_back_both_evaluations(tmp_path, monkeypatch):
    """One seed, five iterations (the first three are not timed), evaluation at 32 px, the
    multi-scale test reduced to scale 1 without flip: its mIoU must then equal the single-scale
    one (the same model, read from results_TTA.json)."""
    tool = _tool()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children: no thread contention on a shared CPU
    results = tool.main(["--pairs", "dil_fcn_r18", "--seeds", "1", "--iters", "5", "--output", str(tmp_path),
                         "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
                         "INPUT.MIN_SIZE_TEST", "32", "TEST.AUG.SCALES", "[1.0]", "TEST.AUG.FLIP", "False",
                         "SOLVER.CHECKPOINT_PERIOD", "1000"])
    variants = results["dil_fcn_r18"]["variants"]
    for v in ("baseline", "sgr"):
        run = variants[v]["runs"][0]
        assert 0.0 <= run["mIoU"] <= 100.0
        assert run["mIoU_TTA"] == pytest.approx(run["mIoU"], abs=1e-6)
        assert run["step_time_s"] > 0 and run["peak_mib"] > 100
        assert os.path.isfile(tmp_path / "dil_fcn_r18" / v / "seed1" / "model_final.pth")
    assert all(math.isnan(variants["baseline"]["runs"][0][k]) for k in ("S_C", "D_I"))
    assert all(0.0 <= variants["sgr"]["runs"][0][k] <= 1.0 for k in ("S_C", "D_C", "S_I", "D_I"))
    log = (tmp_path / "dil_fcn_r18" / "sgr" / "seed1" / "train_stdout.log").read_text()
    assert "SEED 1" in log.splitlines()[0] and "TEST.AUG.ENABLED False" in log.splitlines()[0]


def test_make_compare_runs_both_toys_dilated_fcn_pairs_over_three_seeds():
    """What README / docs/evidence.md say `make compare` does."""
    args = _tool().get_parser().parse_args([])
    assert args.pairs == ["dil_fcn_r18", "dil_fcn_r18_context"] and args.seeds == 3 and not args.ablate
    with open(os.path.join(REPO, "Makefile")) as f:
        make = f.read()
    target = make[make.index("\ncompare: $(STAMP)\n"):].split("\n\n")[0]
    assert "$(PY) tools/compare_sgr.py --output $(COMPARE_OUT)" in target
    assert "COMPARE_OUT ?= output/compare" in make


def test_each_ablation_zeroes_its_own_term_of_the_sgr_config():
    from sgr_d2.engine import load_config

    tool = _tool()
    sgr_config = os.path.join(REPO, "configs", "toy", "dil_fcn_r18_context_sgr.yaml")
    keys = ("UNION_WEIGHT", "CLASS_WEIGHT", "DIVERSITY_WEIGHT", "LOSS_WEIGHT")
    zeroed = {}
    for name, (_, opts) in tool.ABLATIONS.items():
        sgr = load_config(sgr_config, opts).MODEL.SGR  # the overrides must merge (a float key)
        zeroed[name] = [k for k in keys if sgr[k] == 0.0]
        assert all(sgr[k] > 0 for k in keys if k not in zeroed[name])
    assert zeroed == {"no_union": ["UNION_WEIGHT"], "no_class": ["CLASS_WEIGHT"],
                      "no_diversity": ["DIVERSITY_WEIGHT"], "unsupervised": ["LOSS_WEIGHT"]}


def test_compare_quotes_the_local_ceiling_of_the_context_toy(tmp_path, capsys):
    tool = _tool()
    for v, miou in (("baseline", 50.0), ("sgr", 60.0)):
        _fake_run(str(tmp_path / "dil_fcn_r18_context" / v / "seed1"), miou, miou, [1.0], 900.0, [])
    results = tool.main(["--pairs", "dil_fcn_r18_context", "--seeds", "1", "--output", str(tmp_path),
                         "--skip-existing"])
    out = capsys.readouterr().out
    assert ("scores at most 73.3 mIoU on `sgr_toy_context_sem_seg_val`" in out
            and "| SGR | 60.0 ± – | 60.0 ± – |" in out)
    assert results["dil_fcn_r18_context"]["classes"] == ["ground", "flag", "rock", "red_team", "blue_team"]
