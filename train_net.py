#!/usr/bin/env python
"""Train or evaluate an sgr_d2 model (detectron2's ``DefaultTrainer``).

    python train_net.py --config-file configs/toy/dil_fcn_r18_sgr.yaml --num-gpus 1
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --eval-only --allow-random-weights   # untrained model
    python train_net.py --config-file ... --resume          # continue a stopped run
    torchrun --nproc_per_node 8 train_net.py --config-file ...   # or srun: docs/multi_gpu.md#cluster

Exits 75 when a preemption signal stopped training after a checkpoint (run it again with --resume).
"""
import sys

import sgr_d2  # noqa: F401  (compat shims + registrations, before any detectron2 import)
from sgr_d2.engine.trainer import argument_parser, run
from sgr_d2.engine.workers import LaunchConflict, launch


def main(args):
    return run(args)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except LaunchConflict as e:
        sys.exit(f"train_net.py: {e}")
