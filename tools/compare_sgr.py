#!/usr/bin/env python
"""What SGR buys: each toy model with and without SGR, same recipe, several seeds and budgets.

    python tools/compare_sgr.py --iters 1000 --control                  # make compare
    python tools/compare_sgr.py --pairs dil_fcn_r18_context --iters 300 600 1000 1500 --control
    python tools/compare_sgr.py --pairs dil_fcn_r18_context --iters 1000 --ablate --skip-existing
    python tools/compare_sgr.py --pairs dil_fcn_r18 --seeds 1 --iters 20 --output output/compare_quick

A pair ``P`` is ``configs/toy/P.yaml`` (the baseline) and ``configs/toy/P_sgr.yaml`` (the same
recipe with SGR). Each model is trained with ``SEED`` 1..N (``--seeds N``, default 3) by
``tools/experiments.py::train_and_evaluate`` (a child process running the body of
``train_net.py``, log in ``<run>/train_stdout.log``), then evaluated on the config's test set
single-scale (with the token metrics S_C, D_C, S_I, D_I for SGR) and, for a semantic pair, with
the config's multi-scale + flip. A **panoptic pair** (a ``MaskFormer`` config with
``MODEL.MASK_FORMER.TEST.PANOPTIC_ON``, e.g. ``mask2former_r18_panoptic``) is judged by PQ, with
PQ of things and stuff, mask AP and mIoU beside it, and no multi-scale evaluation (Mask2Former
has none for panoptic):

    python tools/compare_sgr.py --pairs mask2former_r18_panoptic --iters 300 600 --instances

Variants besides ``baseline`` and ``sgr``:

* ``--control``: the baseline with DeepLabV3's head (``MODEL.SEM_SEG_HEAD.NAME DeepLabV3Head``:
  ASPP, whose image-pooling branch sees the whole image) instead of Dilated-FCN: global context
  by ordinary means, without SGR. Pairs whose baseline head is Dilated-FCN only.
* ``--instances``: SGR supervised by the true instances (``configs/toy/P_sgr_instances.yaml``,
  ``MODEL.SGR.COMPONENTS instances``) beside SGR on the connected components.
* ``--ablate``: SGR without the union loss (``MODEL.SGR.UNION_WEIGHT 0``), without the class term
  (``CLASS_WEIGHT 0``), without the diversity term (``DIVERSITY_WEIGHT 0``) and with the regions
  unsupervised (``LOSS_WEIGHT`` β = 0: a plain token transformer).

**Budgets.** ``--iters N [N ...]`` sets ``SOLVER.MAX_ITER`` of every run (default: the config's).
Each budget is a complete run of its own, with its own poly schedule that decays to zero at its
last iteration: a learning curve made of finished trainings, not of the intermediate checkpoints
of one long run (whose learning rate has not decayed yet). Only the number of iterations varies,
identically for every model. With several budgets the tool adds the learning-curve tables and
figure (``compare_curve.png``): mIoU (PQ for a panoptic pair) and, on a test set whose metadata names ``context_classes``
(the context toy's two teams), each of those classes' pixel accuracy, with the local-classifier
ceilings as lines.

**Determinism.** Every child runs with ``--threads`` intra-op threads (default 1); with a fixed
thread count a run's figures are the same on every call (torch's CPU kernels split their
reductions by thread count, so another count gives other figures). ``--jobs`` runs that many
children at once (default: the CPU count divided by ``--threads``); it changes the wall time and
the step times, never the accuracies.

Every figure is reported as mean ± std over the seeds, the **sample** standard deviation
(n − 1 in the denominator; undefined, shown "–", for one seed). A variant's gap to the baseline
*exceeds three standard deviations* when mean(variant) − mean(baseline) > 3 · max(std(variant),
std(baseline)). Step time: the median training step of a run (``median_step_time``); peak
memory: the training process's peak resident memory (its GPU peak on a GPU); both also as
ratios of the means, model / baseline.

Writes ``<output>/compare.json`` (every run and the summaries, with each class's accuracy
``ACC-<class>`` too), ``<output>/compare.md`` (the tables, with the command; also printed),
``<output>/compare.png`` (mIoU, or PQ, per seed at the largest budget) and, with several budgets,
``<output>/compare_curve.png``. Runs live in ``<output>/<pair>/it<N>/<variant>/seed<S>``.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # experiments.py

from sgr_d2.evaluation.token_semantics import METRIC_KEYS  # noqa: E402

DEFAULT_PAIRS = ["dil_fcn_r18", "dil_fcn_r18_context"]
# variant: (label, config of the pair it starts from, its overrides)
CONTROL = {"aspp": ("DeepLabV3 head, no SGR", "baseline",
                    ["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3Head"])}
ABLATIONS = {
    "no_union": ("SGR w/o union loss", "sgr", ["MODEL.SGR.UNION_WEIGHT", "0.0"]),
    "no_class": ("SGR w/o class term", "sgr", ["MODEL.SGR.CLASS_WEIGHT", "0.0"]),
    "no_diversity": ("SGR w/o diversity term", "sgr", ["MODEL.SGR.DIVERSITY_WEIGHT", "0.0"]),
    "unsupervised": ("SGR, regions unsupervised (β = 0)", "sgr", ["MODEL.SGR.LOSS_WEIGHT", "0.0"]),
}
INSTANCES = {"sgr_instances": ("SGR, true instances", "sgr_instances", [])}
VARIANTS = {"baseline": ("baseline", "baseline", []), "sgr": ("SGR", "sgr", []), **INSTANCES, **CONTROL,
            **ABLATIONS}
LABELS = {k: v[0] for k, v in VARIANTS.items()}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS,
                   help="names P of configs/toy/P.yaml + P_sgr.yaml (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: SEED 1..N (default 3)")
    p.add_argument("--iters", type=int, nargs="+", default=None,
                   help="SOLVER.MAX_ITER of every run; several values: one complete run per budget, and the "
                        "learning curve (default: the config's)")
    p.add_argument("--control", action="store_true",
                   help="also the baseline with DeepLabV3's head (ASPP + image pooling) instead of Dilated-FCN")
    p.add_argument("--instances", action="store_true",
                   help="also SGR supervised by the true instances (configs/toy/P_sgr_instances.yaml)")
    p.add_argument("--ablate", action="store_true", help="also SGR without each loss term, and with β = 0")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run (default 1)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default: CPU count // --threads)")
    p.add_argument("--output", default="output/compare", help="root folder of the runs and tables")
    p.add_argument("--skip-existing", action="store_true", help="reuse runs that finished their evaluations")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more config overrides for every run")
    return p


def mean_std(values):
    """(mean, sample standard deviation) of ``values``; the std is NaN for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def format_mean_std(mean, std, digits):
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f} ± –"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def gap_exceeds_3_std(variant, baseline):
    """Whether mean(variant) − mean(baseline) > 3 · max of the two sample stds ((mean, std)
    pairs); False when a std is undefined (one seed)."""
    sigma = max(variant[1], baseline[1])
    return not math.isnan(sigma) and variant[0] - baseline[0] > 3 * sigma


# the figures of each task's main table: (column, key in the run record, decimals); the first
# is the one the per-seed tables, learning curves and plots follow
COLUMNS = {"semantic": [("mIoU", "mIoU", 1), ("mIoU ms+flip", "mIoU_TTA", 1)],
           "panoptic": [("PQ", "PQ", 1), ("PQ_th", "PQ_th", 1), ("PQ_st", "PQ_st", 1), ("mask AP", "AP", 1),
                        ("mIoU", "mIoU", 1)]}
PANOPTIC_KEYS = {"PQ": "panoptic_seg/PQ", "PQ_th": "panoptic_seg/PQ_th", "PQ_st": "panoptic_seg/PQ_st",
                 "SQ": "panoptic_seg/SQ", "RQ": "panoptic_seg/RQ", "AP": "segm/AP"}


def main_metric(task):
    """The run-record key a task's pairs are judged by (mIoU, or PQ)."""
    return COLUMNS[task][0][1]


def resolve_pair(name, instances=False):
    """(configs, test dataset, class names, task "semantic" or "panoptic") of pair ``name``;
    with ``instances`` also ``configs/toy/<name>_sgr_instances.yaml``."""
    from detectron2.data import MetadataCatalog

    from sgr_d2.config import load_config

    suffixes = ("", "_sgr") + (("_sgr_instances",) if instances else ())
    paths = [os.path.join(REPO, "configs", "toy", f"{name}{s}.yaml") for s in suffixes]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pair {name!r}: {path} does not exist; expected "
                                    + " and ".join(f"configs/toy/{name}{s}.yaml" for s in suffixes))
    base, sgr = (load_config(p) for p in paths[:2])
    if base.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" or not base.DATASETS.TEST:
        raise ValueError(f"pair {name!r}: {paths[0]} is not a semantic-segmentation config "
                         f"(MODEL.META_ARCHITECTURE {base.MODEL.META_ARCHITECTURE!r}); compare_sgr "
                         "compares mIoU")
    if sgr.MODEL.BACKBONE.NAME != "build_sgr_backbone" or base.MODEL.BACKBONE.NAME == "build_sgr_backbone":
        raise ValueError(f"pair {name!r}: expected {paths[1]} with MODEL.BACKBONE.NAME 'build_sgr_backbone' "
                         f"and {paths[0]} without (got {sgr.MODEL.BACKBONE.NAME!r}, {base.MODEL.BACKBONE.NAME!r})")
    dataset = base.DATASETS.TEST[0]
    panoptic = base.MODEL.META_ARCHITECTURE == "MaskFormer" and base.MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    return {"configs": dict(zip(["baseline", "sgr", "sgr_instances"], paths)), "dataset": dataset,
            "classes": list(MetadataCatalog.get(dataset).stuff_classes), "head": base.MODEL.SEM_SEG_HEAD.NAME,
            "max_iter": base.SOLVER.MAX_ITER, "task": "panoptic" if panoptic else "semantic"}


def run_record(run, seed, classes):
    """The figures of one finished run (``train_and_evaluate``'s result) that the tables use."""
    m, t = run["metrics"], run["metrics_TTA"] or {}
    rec = {"seed": seed, "mIoU": m["sem_seg/mIoU"], "mIoU_TTA": t.get("sem_seg_TTA/mIoU", math.nan),
           "step_time_s": run["step_time_s"],
           "peak_mib": run["peak_cuda_mib"] if run["peak_cuda_mib"] is not None else run["peak_rss_mib"],
           "wall_s": run["wall_s"]}
    for c in classes:
        rec[f"IoU-{c}"] = m.get(f"sem_seg/IoU-{c}", math.nan)
        rec[f"ACC-{c}"] = m.get(f"sem_seg/ACC-{c}", math.nan)  # the class's pixel accuracy (recall)
    for k in METRIC_KEYS:
        rec[k] = m.get(f"token_semantics/{k}", math.nan)
    for k, logged in PANOPTIC_KEYS.items():
        rec[k] = m.get(logged, math.nan)
    return rec


def summarize(records, keys):
    """{key: (mean, std)} over the runs of one model; NaN figures (absent metrics) stay NaN."""
    out = {}
    for k in keys:
        vals = [r[k] for r in records if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = mean_std(vals) if vals else (math.nan, math.nan)
    return out


def tables(title, classes, variants, task="semantic"):
    """Markdown tables of one pair at one budget: the main figures (``COLUMNS[task]``), per-class
    IoU and pixel accuracy, the main figure per seed. ``variants``: {variant: {"runs": [...],
    "summary": {...}}}, the baseline first."""
    base = variants["baseline"]["summary"]
    columns = COLUMNS[task]
    head = [c for c, _, _ in columns] + list(METRIC_KEYS) + ["step (s)", "peak mem (MiB)", "step ratio", "mem ratio"]
    lines = [title, "", "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for v, data in variants.items():
        s = data["summary"]
        time_ratio = s["step_time_s"][0] / base["step_time_s"][0]
        mem_ratio = s["peak_mib"][0] / base["peak_mib"][0]
        cells = [LABELS[v]] + [format_mean_std(*s[k], d) for _, k, d in columns]
        cells += [format_mean_std(*s[k], 3) for k in METRIC_KEYS]
        cells += [format_mean_std(*s["step_time_s"], 2), format_mean_std(*s["peak_mib"], 0),
                  f"{time_ratio:.2f}", f"{mem_ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for what, key in (("Per-class IoU (single-scale):", "IoU"),
                      ("Per-class pixel accuracy (recall, single-scale):", "ACC")):
        lines += ["", what, "", "| model | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for v, data in variants.items():
            s = data["summary"]
            lines.append("| " + " | ".join([LABELS[v]] + [format_mean_std(*s[f"{key}-{c}"], 1)
                                                           for c in classes]) + " |")
    seeds = [r["seed"] for r in variants["baseline"]["runs"]]
    shown = [k for _, k, _ in columns[:2]]
    lines += ["", f"{' / '.join(c for c, _, _ in columns[:2])} per seed:", "",
              "| model | " + " | ".join(f"SEED {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for v, data in variants.items():
        by_seed = {r["seed"]: r for r in data["runs"]}
        lines.append("| " + " | ".join([LABELS[v]] + [" / ".join(f"{by_seed[s][k]:.1f}" for k in shown)
                                                       for s in seeds]) + " |")
    walls = [r.get("wall_s") for data in variants.values() for r in data["runs"]]
    if walls and all(w is not None and not math.isnan(w) for w in walls):
        lines += ["", f"Wall time of these {len(walls)} runs (training and evaluations, summed over the runs): "
                  f"{sum(walls) / 60:.1f} min."]
    return "\n".join(lines)


def curve_tables(pair, budgets, by_budget, context_classes, metric="mIoU"):
    """The learning curve of one pair: ``metric`` (mIoU, or PQ) per budget and variant, the gap
    of each variant to the baseline and whether it exceeds three standard deviations; then each
    context class's pixel accuracy per budget."""
    variants = list(by_budget[budgets[0]])
    others = [v for v in variants if v != "baseline"]
    lines = [f"#### `{pair}`: learning curve ({metric} single-scale, mean ± std over the seeds)", "",
             "| iterations | " + " | ".join(LABELS[v] for v in variants) + " | "
             + " | ".join(f"{LABELS[v]} − baseline" for v in others) + " |",
             "|---|" + "---|" * (len(variants) + len(others))]
    first = {}
    for b in budgets:
        s = {v: by_budget[b][v]["summary"][metric] for v in variants}
        cells = [str(b)] + [format_mean_std(*s[v], 1) for v in variants]
        for v in others:
            exceeds = gap_exceeds_3_std(s[v], s["baseline"])
            if exceeds:
                first.setdefault(v, b)
            cells.append(f"{s[v][0] - s['baseline'][0]:+.1f}{' (> 3σ)' if exceeds else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for v in others:
        where = f"from {first[v]} iterations on" if v in first else "at no budget"
        lines.append(f"- {LABELS[v]} − baseline exceeds three standard deviations {where}.")
    if context_classes:
        lines += ["", f"Pixel accuracy of {' / '.join(context_classes)} (single-scale, mean ± std):", "",
                  "| iterations | " + " | ".join(LABELS[v] for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for b in budgets:
            cells = [str(b)]
            for v in variants:
                s = by_budget[b][v]["summary"]
                cells.append(" / ".join(format_mean_std(*s[f"ACC-{c}"], 1) for c in context_classes))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(x):
    """NaN (an undefined std, an absent metric) as null: JSON has no NaN."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def plot(results, budget, path):
    """mIoU, or PQ for a panoptic pair (single-scale), per seed at ``budget``, one panel per pair,
    one series per model."""
    from sgr_d2.visualization import plt

    pairs = list(results)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), dpi=100, squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        variants = results[pair]["budgets"][str(budget)]
        metric = main_metric(results[pair]["task"])
        for i, (v, data) in enumerate(variants.items()):
            seeds = [r["seed"] for r in data["runs"]]
            offset = (i - (len(variants) - 1) / 2) * 0.06
            ax.plot([s + offset for s in seeds], [r[metric] for r in data["runs"]], "o", label=LABELS[v])
            mean = data["summary"][metric][0]
            ax.hlines(mean, min(seeds) - 0.3, max(seeds) + 0.3, colors=ax.lines[-1].get_color(), linewidth=0.8)
        ax.set_title(f"{pair}, {budget} it (lines: means)")
        ax.set_xlabel("SEED")
        ax.set_ylabel(f"{metric}, single-scale")
        ax.set_xticks(sorted({r["seed"] for d in variants.values() for r in d["runs"]}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curve(pair, result, path):
    """One row per pair's learning curve: mIoU (PQ), then each context class's pixel accuracy,
    mean ± std against the budget, with the local-classifier ceilings as dashed lines."""
    from sgr_d2.visualization import plt

    budgets = [int(b) for b in result["budgets"]]
    classes = result["context_classes"]
    metric = main_metric(result["task"])
    panels = [(metric, f"{metric}, single-scale", result["miou_ceiling"] if metric == "mIoU" else None)]
    panels += [(f"ACC-{c}", f"pixel accuracy of {c} (%)", result["accuracy_ceiling"]) for c in classes]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100, squeeze=False)
    variants = list(result["budgets"][str(budgets[0])])
    for ax, (key, ylabel, ceiling) in zip(axes[0], panels):
        for i, v in enumerate(variants):
            stats = [result["budgets"][str(b)][v]["summary"][key] for b in budgets]
            means = [m for m, _ in stats]
            stds = [0.0 if s is None or math.isnan(s) else s for _, s in stats]
            ax.errorbar([b * (1 + 0.015 * (i - (len(variants) - 1) / 2)) for b in budgets], means, yerr=stds,
                        marker="o", capsize=3, label=LABELS[v])
        if ceiling is not None:
            ax.axhline(ceiling, color="k", linestyle="--", linewidth=0.8, label=f"local ceiling ({ceiling:.1f})")
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.minorticks_off()  # only the budgets are labelled
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("iterations (one complete run each)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{pair}: mean ± std over the seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plan_runs(args, pairs, seeds, budgets, variants):
    """Every run to make, as (budget, seed, pair, variant, config, opts, run_dir), budget by
    budget, then seed by seed, the models of a seed one after the other (a change of machine
    load spreads over all models)."""
    out_root = os.path.abspath(args.output)
    runs = []
    for budget in budgets:
        for seed in seeds:
            for pair, info in pairs.items():
                for v in variants:
                    _, start, overrides = VARIANTS[v]
                    opts = ["SEED", str(seed), "SOLVER.MAX_ITER", str(budget)]
                    if start.startswith("sgr"):
                        opts += ["TEST.TOKEN_SEMANTICS", "True"]
                    opts += overrides + list(args.opts)
                    run_dir = os.path.join(out_root, pair, f"it{budget}", v, f"seed{seed}")
                    runs.append((budget, seed, pair, v, info["configs"][start], opts, run_dir))
    return runs


def main(argv=None):
    args = get_parser().parse_args(argv)
    import sgr_d2  # noqa: F401
    from detectron2.data import MetadataCatalog

    from experiments import read_run, train_and_evaluate

    if args.seeds < 1:
        raise ValueError(f"--seeds is {args.seeds}; expected at least 1")
    if args.iters is not None and min(args.iters) < 1:
        raise ValueError(f"--iters is {args.iters}; expected positive numbers of iterations")
    if args.threads < 1 or (args.jobs is not None and args.jobs < 1):
        raise ValueError(f"--threads {args.threads} / --jobs {args.jobs}: expected at least 1")
    seeds = list(range(1, args.seeds + 1))
    pairs = {name: resolve_pair(name, args.instances) for name in args.pairs}
    if args.control:
        for name, info in pairs.items():
            if info["head"] != "DilatedFCNHead":
                raise ValueError(f"--control replaces the baseline's Dilated-FCN head by DeepLabV3's; pair "
                                 f"{name!r} has MODEL.SEM_SEG_HEAD.NAME {info['head']!r}")
    if args.iters is not None:
        budgets = sorted(set(args.iters))
    else:
        budgets = sorted({info["max_iter"] for info in pairs.values()})
        if len(budgets) > 1:
            raise ValueError(f"the pairs' configs have different SOLVER.MAX_ITER {budgets}; give --iters")
    variants = ["baseline", "sgr"] + (list(INSTANCES) if args.instances else []) \
        + (list(CONTROL) if args.control else []) + (list(ABLATIONS) if args.ablate else [])
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)

    def one(run):
        budget, seed, pair, v, config, opts, run_dir = run
        tta = pairs[pair]["task"] == "semantic"
        metric = main_metric(pairs[pair]["task"])
        logged = PANOPTIC_KEYS.get(metric, "sem_seg/mIoU")
        if args.skip_existing:
            try:
                found = read_run(run_dir, tta=tta)
                print(f"[compare] {pair} {budget} it {v} SEED {seed}: reusing {run_dir}", flush=True)
                return found
            except (FileNotFoundError, ValueError):
                pass
        print(f"[compare] {pair} {budget} it {v} SEED {seed}: training {os.path.relpath(config, REPO)} "
              f"{' '.join(opts)} (log: {run_dir}/train_stdout.log)", flush=True)
        done = train_and_evaluate(config, opts, run_dir, tta=tta, cwd=REPO, threads=args.threads)
        print(f"[compare]   {pair} {budget} it {v} SEED {seed} done in {done['wall_s']:.0f}s: "
              f"{metric} {done['metrics'][logged]:.1f}", flush=True)
        return done

    runs = plan_runs(args, pairs, seeds, budgets, variants)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        finished = list(pool.map(one, runs))
    records = {(b, p, v): [] for b in budgets for p in pairs for v in variants}
    for (budget, seed, pair, v, *_), run in zip(runs, finished):
        records[(budget, pair, v)].append(run_record(run, seed, pairs[pair]["classes"]))

    results = {}
    for pair, info in pairs.items():
        classes = info["classes"]
        keys = ["mIoU", "mIoU_TTA", "step_time_s", "peak_mib", "wall_s", *METRIC_KEYS, *PANOPTIC_KEYS,
                *(f"IoU-{c}" for c in classes), *(f"ACC-{c}" for c in classes)]
        meta = MetadataCatalog.get(info["dataset"])
        results[pair] = {
            "configs": [os.path.relpath(c, REPO) for c in info["configs"].values()],
            "dataset": info["dataset"], "classes": classes, "task": info["task"],
            "context_classes": list(meta.get("context_classes", [])),
            "miou_ceiling": meta.get("local_miou_ceiling", None),
            "accuracy_ceiling": meta.get("local_context_accuracy_ceiling", None),
            "budgets": {str(b): {v: {"runs": records[(b, pair, v)],
                                     "summary": summarize(records[(b, pair, v)], keys)} for v in variants}
                        for b in budgets},
        }
    shown = argv if argv is not None else sys.argv[1:]
    command = "python tools/compare_sgr.py " + " ".join(shlex.quote(a) for a in shown)
    md = [f"`{command.strip()}` (mean ± sample std over SEED {', '.join(map(str, seeds))}; {args.threads} "
          f"thread(s) a run, {jobs} run(s) at once; step and memory ratios: model / baseline, of the means)", ""]
    for pair, res in results.items():
        for b in budgets:
            md += [tables(f"#### `{pair}` vs `{pair}_sgr`, {b} iterations", res["classes"], res["budgets"][str(b)],
                          res["task"]), ""]
        if res["miou_ceiling"] is not None:
            md += [f"A classifier that sees only a window around each pixel as wide as the baseline's reach "
                   f"scores at most {res['miou_ceiling']:.1f} mIoU on `{res['dataset']}`"
                   + (f", and {res['accuracy_ceiling']:.1f}% on the pixels of {' and '.join(res['context_classes'])}"
                      if res["accuracy_ceiling"] is not None else "") + " (docs/method.md).", ""]
        if len(budgets) > 1:
            md += [curve_tables(pair, budgets, {b: res["budgets"][str(b)] for b in budgets},
                                res["context_classes"], main_metric(res["task"])), ""]
    text = "\n".join(md)
    print(text)
    out_root = os.path.abspath(args.output)
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_root, "compare.json"), "w") as f:
        json.dump(_json_safe({"command": command, "seeds": seeds, "budgets": budgets, "threads": args.threads,
                              "std": "sample (ddof=1)", "pairs": results}), f, indent=1)
    plot(results, budgets[-1], os.path.join(out_root, "compare.png"))
    written = ["compare.md", "compare.json", "compare.png"]
    if len(budgets) > 1:
        for pair in results:
            name = "compare_curve.png" if len(results) == 1 else f"compare_curve_{pair}.png"
            plot_curve(pair, results[pair], os.path.join(out_root, name))
            written.append(name)
    print(f"\nwritten: {', '.join(os.path.join(out_root, w) for w in written)}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    main()
