#!/usr/bin/env python
"""What a local classifier can reach on the context toy (``sgr_d2/data/toy_context.py``).

    python tools/context_toy_ceiling.py                       # the validation split, a few radii
    python tools/context_toy_ceiling.py --radii 16 324 344 400 511 --split train

Prints, for each window radius r, the ceiling on the pixel accuracy of any classifier that sees
only the (2r + 1)-wide window around a pixel (overall and on the team pixels), computed on the
split's scenes drawn in both worlds (red and blue flag); then the mIoU ceiling of such a
classifier, and the reach of the per-pixel configs given with ``--config-files`` (how far an
output pixel sees; ``KEY VALUE`` overrides after ``--opts`` apply to each, e.g.
``--opts MODEL.SEM_SEG_HEAD.NAME DeepLabV3Head`` for the control of ``tools/compare_sgr.py``).
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="val", help="train or val")
    p.add_argument("--radii", type=int, nargs="+", default=[8, 64, 324, 344, 400, 511])
    p.add_argument("--config-files", nargs="*",
                   default=[os.path.join(REPO, "configs/toy/dil_fcn_r18_context.yaml")])
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config")
    args = p.parse_args(argv)

    import sgr_d2  # noqa: F401
    from sgr_d2.data.toy_context import (FLAG_ZONE, TEAM_START, head_reach, local_accuracy_ceiling,
                                         local_miou_ceiling, split_scenes, team_iou_ceiling)
    from sgr_d2.config import load_config

    seeds = sorted({seed for seed, _ in split_scenes(args.split)})
    print(f"sgr_toy_context {args.split}: {len(seeds)} scenes, each drawn with a red and a blue flag; "
          f"flag columns < {FLAG_ZONE}, team columns >= {TEAM_START} (mirrored half of the time)")
    print("| window radius r | ceiling, all pixels | ceiling, team pixels |")
    print("|---|---|---|")
    rows = []
    for r in args.radii:
        c = local_accuracy_ceiling(r, seeds)
        rows.append((r, c))
        print(f"| {r} | {100 * c['all']:.2f}% | {100 * c['team']:.2f}% |")
    teams, q = team_iou_ceiling()
    print(f"team IoU ceiling: IoU(red) + IoU(blue) <= {teams:.4f} (at q = {q:.3f}); "
          f"mIoU of a local classifier <= {local_miou_ceiling():.1f}")
    for cf in args.config_files:
        reach, whole = head_reach(load_config(cf, args.opts))
        extra = f" {' '.join(args.opts)}" if args.opts else ""
        print(f"reach of {os.path.relpath(cf, REPO)}{extra}: {reach} px"
              + (" through its convolutions; its image pooling sees the whole image" if whole else ""))
    return rows


if __name__ == "__main__":
    main()
