#!/usr/bin/env python
"""How often objects touch in the panoptic toy (``sgr_d2/data/toy_panoptic.py``), and its trivial baseline.

    python tools/panoptic_toy_stats.py

Generates the toy if needed (under ``$DETECTRON2_DATASETS``, default ``./datasets``) and prints,
per split, the objects (thing instances), how many of them share an 8-connected component of the
semantic map with another object of their class (SGR's ``connected`` components merge them) and
the components of thing classes; then the trivial panoptic baseline on the validation split
(every pixel one segment of the stuff class with the most training pixels): PQ, SQ, RQ, the
things' and stuff's PQ, mask AP (0: no instances) and mIoU.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    import sgr_d2  # noqa: F401  (registers the datasets)
    from sgr_d2.data.toy_panoptic import PANOPTIC_SPLITS, touching_statistics, trivial_baseline

    print("| split | images | objects | merged objects | thing components |")
    print("|---|---|---|---|---|")
    stats = {}
    for split, (count, _seed) in PANOPTIC_SPLITS.items():
        s = stats[split] = touching_statistics(f"sgr_toy_panoptic_{split}_with_sem_seg")
        print(f"| {split} | {count} | {s['instances']} | {s['merged']} ({100 * s['merged_fraction']:.1f}%) "
              f"| {s['thing_components']} |")
    base = trivial_baseline()
    print(f"trivial baseline on val: every pixel {base['stuff_class']} (the stuff class with the most training pixels)")
    print("| PQ | SQ | RQ | PQ_th | PQ_st | mask AP | mIoU |")
    print("|---|---|---|---|---|---|---|")
    print("| " + " | ".join(f"{base[k]:.2f}" for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"))
          + f" | 0.00 | {base['mIoU']:.2f} |")
    return stats, base


if __name__ == "__main__":
    main()
