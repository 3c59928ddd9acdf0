#!/usr/bin/env python
"""What the per-iteration agreement on a preemption costs two CPU workers.

    python bench/preemption_agreement.py --calls 300 --iters 20

Every worker must learn, at the same iteration, whether any worker received a preemption signal
(``sgr_d2.engine.preemption``). The two ways measured, each a detectron2 object collective on
its gloo group (the NCCL rule), in two gloo workers started as ``sgr_d2.engine.workers.launch``
starts them on a CPU:

* a gather of its own: ``comm.all_gather(flag)`` once per iteration;
* riding on the NaN guard's gather, which every iteration already makes: ``comm.all_gather(bad)``
  becomes ``comm.all_gather((bad, flag))``; its cost is the difference between the two.

For scale, one training iteration of the toy SGR config shrunk as the tests shrink it (64 px
crops, 2 images per iteration, one image per worker), with the NaN guard and the agreement in
it. Calls alternate between the arms, so both see the same machine load. Prints a table
(median over the calls, microseconds; the iteration in milliseconds).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMALL = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
         "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "DATASETS.TEST", "()",
         "MODEL.RESNETS.OUTPUT_STRIDE", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SGR.NUM_TOKENS", "8",
         "MODEL.SGR.NUM_MATCHED", "4", "MODEL.SGR.TOKEN_DIM", "32", "MODEL.SGR.FFN_DIM", "64",
         "SOLVER.CHECKPOINT_PERIOD", "100000"]


def _measure(out_dir, calls, iters):
    import torch
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    torch.set_num_threads(1)
    arms = {"own": lambda: comm.all_gather(False), "piggyback": lambda: comm.all_gather((False, False))}
    times = {k: [] for k in arms}
    for _ in range(calls):
        for name, call in arms.items():
            comm.synchronize()
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    from sgr_d2.config import load_config, sync_norms
    from sgr_d2.engine.trainer import Trainer

    cfg = load_config(os.path.join(REPO, "configs", "toy", "dil_fcn_r18_sgr.yaml"),
                      SMALL + ["SOLVER.MAX_ITER", str(iters), "OUTPUT_DIR", os.path.join(out_dir, "run")])
    sync_norms(cfg, comm.get_world_size())
    seed_all_rng(cfg.SEED + comm.get_rank())
    trainer = Trainer(cfg)
    trainer.train()
    iteration = [v for v, _ in trainer.storage.history("time").values()][2:]  # the first ones warm up
    if comm.is_main_process():
        with open(os.path.join(out_dir, "result.txt"), "w") as f:
            f.write(repr({"own": statistics.median(times["own"]), "piggyback": statistics.median(times["piggyback"]),
                          "iteration": statistics.median(iteration)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300, help="calls of each gather")
    p.add_argument("--iters", type=int, default=20, help="training iterations")
    args = p.parse_args()
    import sgr_d2  # noqa: F401
    from sgr_d2.engine.workers import launch

    with tempfile.TemporaryDirectory() as d:
        launch(_measure, 2, dist_url=f"file://{d}/init", args=(d, args.calls, args.iters),
               timeout=timedelta(minutes=5))
        r = eval(open(os.path.join(d, "result.txt")).read())  # noqa: S307 (our own repr of floats)
    own, piggy = r["own"] * 1e6, r["piggyback"] * 1e6
    print(f"Two gloo workers on this CPU; median of {args.calls} calls each, {args.iters} toy iterations\n")
    print("| Agreement per iteration | Cost per iteration |")
    print("|---|---|")
    print(f"| a gather of its own, `comm.all_gather(flag)` | {own:.0f} µs |")
    print(f"| on the NaN guard's gather, `comm.all_gather((bad, flag))` instead of `comm.all_gather(bad)` | "
          f"{piggy - own:+.0f} µs ({piggy:.0f} µs against {own:.0f} µs) |")
    print(f"| for scale: one training iteration (toy SGR, 64 px, one image per worker) | "
          f"{r['iteration'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
