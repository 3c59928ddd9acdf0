#!/usr/bin/env python
"""What SGR buys: each toy model with and without SGR, same recipe, several seeds (``make compare``).

    python tools/compare_sgr.py                                   # both toys' Dilated-FCN pairs, seeds 1-3
    python tools/compare_sgr.py --pairs dil_fcn_r18_context --ablate --skip-existing
    python tools/compare_sgr.py --pairs dil_fcn_r18 --seeds 1 --iters 20 --output output/compare_quick

A pair ``P`` is ``configs/toy/P.yaml`` (the baseline) and ``configs/toy/P_sgr.yaml`` (the same
recipe with SGR); semantic-segmentation pairs only. Each model is trained with ``SEED`` 1..N
(``--seeds N``, default 3) by ``sgr_d2.engine.experiments.train_and_evaluate`` (a child process
running the body of ``train_net.py``, log in ``<run>/train_stdout.log``), then evaluated on the
config's test set single-scale (with the token metrics S_C, D_C, S_I, D_I for SGR) and with the
config's multi-scale + flip. ``--ablate`` adds, for each pair, SGR without the union loss
(``MODEL.SGR.UNION_WEIGHT 0``), without the class term (``CLASS_WEIGHT 0``), without the
diversity term (``DIVERSITY_WEIGHT 0``) and with the regions unsupervised (``LOSS_WEIGHT`` β = 0).
Runs are ordered seed by seed, the models of a seed one after the other, so that a change of
machine load spreads over all models.

Every figure is reported as mean ± std over the seeds, the **sample** standard deviation
(n − 1 in the denominator; undefined, shown "–", for one seed). Step time: the median training
step of a run (``median_step_time``); peak memory: the training process's peak resident memory
(its GPU peak on a GPU); both also as ratios of the means, model / baseline.

Under a pair whose test set carries a ``local_miou_ceiling`` (the context toy), the table is
followed by that ceiling: the best mIoU of a classifier that sees only a window around each pixel.

Writes ``<output>/compare.json`` (every run and the summaries, with each class's accuracy
``ACC-<class>`` too), ``<output>/compare.md`` (the
tables, with the command and date; also printed) and ``<output>/compare.png`` (mIoU per seed).
"""
import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_PAIRS = ["dil_fcn_r18", "dil_fcn_r18_context"]
# variant: (label, the SGR config's overrides); "baseline" is the config without SGR
ABLATIONS = {
    "no_union": ("SGR w/o union loss", ["MODEL.SGR.UNION_WEIGHT", "0.0"]),
    "no_class": ("SGR w/o class term", ["MODEL.SGR.CLASS_WEIGHT", "0.0"]),
    "no_diversity": ("SGR w/o diversity term", ["MODEL.SGR.DIVERSITY_WEIGHT", "0.0"]),
    "unsupervised": ("SGR, regions unsupervised (β = 0)", ["MODEL.SGR.LOSS_WEIGHT", "0.0"]),
}
LABELS = {"baseline": "baseline", "sgr": "SGR", **{k: v[0] for k, v in ABLATIONS.items()}}
TOKEN_METRICS = ("S_C", "D_C", "S_I", "D_I")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS,
                   help="names P of configs/toy/P.yaml + P_sgr.yaml (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: SEED 1..N (default 3)")
    p.add_argument("--ablate", action="store_true", help="also SGR without each loss term, and with β = 0")
    p.add_argument("--iters", type=int, default=None, help="SOLVER.MAX_ITER for every run (default: the config's)")
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


def resolve_pair(name):
    """(baseline config, SGR config, test dataset, class names) of pair ``name``."""
    from detectron2.data import MetadataCatalog

    from sgr_d2.engine import load_config

    paths = [os.path.join(REPO, "configs", "toy", f"{name}{s}.yaml") for s in ("", "_sgr")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pair {name!r}: {path} does not exist; expected configs/toy/{name}.yaml "
                                    f"and configs/toy/{name}_sgr.yaml")
    base, sgr = (load_config(p) for p in paths)
    if base.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" or not base.DATASETS.TEST:
        raise ValueError(f"pair {name!r}: {paths[0]} is not a semantic-segmentation config "
                         f"(MODEL.META_ARCHITECTURE {base.MODEL.META_ARCHITECTURE!r}); compare_sgr "
                         "compares mIoU")
    if sgr.MODEL.BACKBONE.NAME != "build_sgr_backbone" or base.MODEL.BACKBONE.NAME == "build_sgr_backbone":
        raise ValueError(f"pair {name!r}: expected {paths[1]} with MODEL.BACKBONE.NAME 'build_sgr_backbone' "
                         f"and {paths[0]} without (got {sgr.MODEL.BACKBONE.NAME!r}, {base.MODEL.BACKBONE.NAME!r})")
    dataset = base.DATASETS.TEST[0]
    return paths[0], paths[1], dataset, list(MetadataCatalog.get(dataset).stuff_classes)


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
    for k in TOKEN_METRICS:
        rec[k] = m.get(f"token_semantics/{k}", math.nan)
    return rec


def summarize(records, keys):
    """{key: (mean, std)} over the runs of one model; NaN figures (absent metrics) stay NaN."""
    out = {}
    for k in keys:
        vals = [r[k] for r in records if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = mean_std(vals) if vals else (math.nan, math.nan)
    return out


def tables(pair, classes, variants):
    """Markdown tables of one pair: the main figures, per-class IoU, mIoU per seed.
    ``variants``: {variant: {"runs": [...], "summary": {...}}}, the baseline first."""
    base = variants["baseline"]["summary"]
    lines = [f"#### `{pair}` vs `{pair}_sgr`", "",
             "| model | mIoU | mIoU ms+flip | S_C | D_C | S_I | D_I | step (s) | peak mem (MiB) | step ratio | mem ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, data in variants.items():
        s = data["summary"]
        time_ratio = s["step_time_s"][0] / base["step_time_s"][0]
        mem_ratio = s["peak_mib"][0] / base["peak_mib"][0]
        cells = [LABELS[v], format_mean_std(*s["mIoU"], 1), format_mean_std(*s["mIoU_TTA"], 1)]
        cells += [format_mean_std(*s[k], 3) for k in TOKEN_METRICS]
        cells += [format_mean_std(*s["step_time_s"], 2), format_mean_std(*s["peak_mib"], 0),
                  f"{time_ratio:.2f}", f"{mem_ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-class IoU (single-scale):", "",
              "| model | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for v, data in variants.items():
        s = data["summary"]
        lines.append("| " + " | ".join([LABELS[v]] + [format_mean_std(*s[f"IoU-{c}"], 1) for c in classes]) + " |")
    lines += ["", "Per-class pixel accuracy (recall, single-scale):", "",
              "| model | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for v, data in variants.items():
        s = data["summary"]
        lines.append("| " + " | ".join([LABELS[v]] + [format_mean_std(*s[f"ACC-{c}"], 1) for c in classes]) + " |")
    seeds = [r["seed"] for r in variants["baseline"]["runs"]]
    lines += ["", "mIoU per seed (single-scale / multi-scale + flip):", "",
              "| model | " + " | ".join(f"SEED {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for v, data in variants.items():
        by_seed = {r["seed"]: r for r in data["runs"]}
        lines.append("| " + " | ".join([LABELS[v]] + [f"{by_seed[s]['mIoU']:.1f} / {by_seed[s]['mIoU_TTA']:.1f}"
                                                       for s in seeds]) + " |")
    walls = [r.get("wall_s") for data in variants.values() for r in data["runs"]]
    if walls and all(w is not None and not math.isnan(w) for w in walls):
        lines += ["", f"Wall time of these {len(walls)} runs (training and evaluations, one after the "
                  f"other): {sum(walls) / 60:.1f} min."]
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


def plot(results, path):
    """mIoU (single-scale) per seed, one panel per pair, one series per model."""
    from sgr_d2.visualization import plt

    pairs = list(results)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), dpi=100, squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        variants = results[pair]["variants"]
        for i, (v, data) in enumerate(variants.items()):
            seeds = [r["seed"] for r in data["runs"]]
            offset = (i - (len(variants) - 1) / 2) * 0.06
            ax.plot([s + offset for s in seeds], [r["mIoU"] for r in data["runs"]], "o", label=LABELS[v])
            mean = data["summary"]["mIoU"][0]
            ax.hlines(mean, min(seeds) - 0.3, max(seeds) + 0.3, colors=ax.lines[-1].get_color(), linewidth=0.8)
        ax.set_title(f"{pair} (lines: means)")
        ax.set_xlabel("SEED")
        ax.set_ylabel("mIoU, single-scale")
        ax.set_xticks(sorted({r["seed"] for d in variants.values() for r in d["runs"]}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = get_parser().parse_args(argv)
    import sgr_d2  # noqa: F401
    from detectron2.data import MetadataCatalog

    from sgr_d2.engine.experiments import read_run, train_and_evaluate

    if args.seeds < 1:
        raise ValueError(f"--seeds is {args.seeds}; expected at least 1")
    seeds = list(range(1, args.seeds + 1))
    pairs = {name: resolve_pair(name) for name in args.pairs}
    variants = ["baseline", "sgr"] + (list(ABLATIONS) if args.ablate else [])
    out_root = os.path.abspath(args.output)
    records = {p: {v: [] for v in variants} for p in pairs}
    for seed in seeds:
        for pair, (base_cfg, sgr_cfg, _, classes) in pairs.items():
            for v in variants:
                config = base_cfg if v == "baseline" else sgr_cfg
                opts = ["SEED", str(seed)]
                if args.iters is not None:
                    opts += ["SOLVER.MAX_ITER", str(args.iters)]
                if v != "baseline":
                    opts += ["TEST.TOKEN_SEMANTICS", "True", *ABLATIONS.get(v, ("", []))[1]]
                opts += list(args.opts)
                run_dir = os.path.join(out_root, pair, v, f"seed{seed}")
                run = None
                if args.skip_existing:
                    try:
                        run = read_run(run_dir, tta=True)
                        print(f"[compare] {pair} {v} SEED {seed}: reusing {run_dir}", flush=True)
                    except (FileNotFoundError, ValueError):
                        run = None
                if run is None:
                    print(f"[compare] {pair} {v} SEED {seed}: training {os.path.relpath(config, REPO)} "
                          f"{' '.join(opts)} (log: {run_dir}/train_stdout.log)", flush=True)
                    run = train_and_evaluate(config, opts, run_dir, tta=True, cwd=REPO)
                    print(f"[compare]   done in {run['wall_s']:.0f}s: mIoU {run['metrics']['sem_seg/mIoU']:.1f}",
                          flush=True)
                records[pair][v].append(run_record(run, seed, classes))

    keys_of = lambda classes: ["mIoU", "mIoU_TTA", "step_time_s", "peak_mib", "wall_s", *TOKEN_METRICS,  # noqa: E731
                               *(f"IoU-{c}" for c in classes), *(f"ACC-{c}" for c in classes)]
    results = {}
    for pair, (base_cfg, sgr_cfg, dataset, classes) in pairs.items():
        results[pair] = {
            "configs": [os.path.relpath(base_cfg, REPO), os.path.relpath(sgr_cfg, REPO)],
            "dataset": dataset, "classes": classes,
            "variants": {v: {"runs": records[pair][v], "summary": summarize(records[pair][v], keys_of(classes))}
                         for v in variants},
        }
    command = "python tools/compare_sgr.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = [f"`{command.strip()}` ({date}; mean ± sample std over SEED {', '.join(map(str, seeds))}; "
          "step and memory ratios: model / baseline, of the means)", ""]
    for pair in results:
        md += [tables(pair, results[pair]["classes"], results[pair]["variants"]), ""]
        ceiling = MetadataCatalog.get(results[pair]["dataset"]).get("local_miou_ceiling", None)
        if ceiling is not None:
            md += [f"A classifier that sees only a window around each pixel as wide as the baseline's reach "
                   f"scores at most {ceiling:.1f} mIoU on `{results[pair]['dataset']}` (docs/method.md).", ""]
    text = "\n".join(md)
    print(text)
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_root, "compare.json"), "w") as f:
        json.dump(_json_safe({"command": command, "date": date, "seeds": seeds, "std": "sample (ddof=1)",
                              "pairs": results}), f, indent=1)
    plot(results, os.path.join(out_root, "compare.png"))
    print(f"\nwritten: {out_root}/compare.md, compare.json, compare.png")
    return results


if __name__ == "__main__":
    os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    main()
