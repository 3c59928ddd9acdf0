#!/usr/bin/env python
"""Submit a ``train_net.py`` run to SLURM with submitit, requeued after a preemption or a timeout.

    pip install -e ".[cluster]"        # submitit
    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition learnfair --time 4320 \\
        -- --config-file configs/ade20k/dil_fcn_r101_sgr.yaml OUTPUT_DIR output/ade20k/dil_fcn_r101_sgr
    # the same on this machine, through submitit's local executor (a try before submitting)
    python tools/submit_slurm.py --cluster local --gpus-per-node 1 --wait -- --config-file ...

Everything after ``--`` is passed to ``train_net.py`` as it is, plus ``--resume``: a job that
SLURM or submitit starts again continues from ``OUTPUT_DIR/last_checkpoint`` (a first start, with
no checkpoint there, starts from ``MODEL.WEIGHTS``). Each GPU is a task of its own (``srun``
starts ``--gpus-per-node`` tasks on each of ``--nodes`` nodes), and the tasks join one process
group from SLURM's variables (``sgr_d2.engine.workers``, docs/multi_gpu.md#cluster), so the
workers arguments ``--num-gpus``, ``--num-machines``, ``--machine-rank`` and ``--dist-url`` are
refused here.

**Requeue.** submitit asks SLURM for its signal (SIGUSR2, ``--signal-delay`` seconds before the
time limit; on preemption where the cluster sends it). Training stops at the next iteration
boundary with a checkpoint (``sgr_d2.engine.preemption``); then submitit's own handler requeues
the job (``TrainNetJob.checkpoint``): up to ``--max-timeouts`` times after timeouts, any number
of times after preemptions. Stopped by SIGTERM or SIGUSR1 only, the job saves the same way and
ends with exit code 75, without requeueing itself (a cancelled job stays cancelled).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")


class TrainNetJob:
    """What each task of the job runs: ``train_net.py``'s body with ``argv``, in the process group
    that the job's tasks form."""

    def __init__(self, argv, repo: str = REPO):
        self.argv = list(argv)
        self.repo = repo

    def __call__(self):
        if self.repo not in sys.path:
            sys.path.insert(0, self.repo)
        import submitit

        import sgr_d2  # noqa: F401  (compat shims and registrations first)
        from sgr_d2.engine.preemption import Preempted
        from sgr_d2.engine.trainer import argument_parser, run
        from sgr_d2.engine.workers import launch

        env = submitit.JobEnvironment()
        requeue_signal = env._usr_sig()
        requeue = signal.getsignal(requeue_signal)  # submitit's: calls checkpoint(), then requeues
        if env.num_tasks > 1 and "SLURM_PROCID" not in os.environ:  # the local executor's tasks
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        args = argument_parser().parse_args(self.argv)
        try:
            return launch(run, 1, args=(args,))
        except Preempted as stop:
            if requeue_signal in stop.signals and callable(requeue):
                requeue(requeue_signal, None)  # the main task requeues the job and exits
            raise

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook: the same job again (its ``--resume`` continues the run)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainNetJob(self.argv, self.repo))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s [options] -- <train_net.py arguments>")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks, workers) per node")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--time", type=int, default=4320, help="time limit of each job, minutes")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: SLURM's)")
    parser.add_argument("--job-name", default="sgr_d2")
    parser.add_argument("--folder", default="output/submitit/%j",
                        help="submitit's logs and pickles (%%j: the job id)")
    parser.add_argument("--max-timeouts", type=int, default=3,
                        help="how many times a job that reached its time limit is requeued")
    parser.add_argument("--signal-delay", type=int, default=120,
                        help="seconds before the time limit at which SLURM sends submitit's signal")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                        help="submitit's executor (default: SLURM where sbatch exists, else local)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with its outcome")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train_net.py's arguments")
    args = parser.parse_args(argv)
    train = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train:
        parser.error("give train_net.py's arguments after --, e.g. -- --config-file configs/...yaml")
    given = [f for f in WORKER_FLAGS if any(a == f or a.startswith(f + "=") for a in train)]
    if given:
        parser.error(f"{', '.join(given)}: the job's workers are its tasks; give --nodes and --gpus-per-node "
                     "to submit_slurm.py instead")
    if args.nodes < 1 or args.gpus_per_node < 0:
        parser.error("--nodes must be at least 1 and --gpus-per-node at least 0 (0: CPU workers, one per node)")
    args.train_args = train if "--resume" in train else ["--resume", *train]
    return args


def make_executor(args):
    import submitit

    executor = submitit.AutoExecutor(folder=args.folder, cluster=args.cluster,
                                      slurm_max_num_timeout=args.max_timeouts)
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=max(args.gpus_per_node, 1),
                  gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.time,
                  slurm_signal_delay_s=args.signal_delay)
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    executor.update_parameters(**params)
    return executor


def main(argv=None) -> int:
    args = parse_args(argv)
    executor = make_executor(args)
    job = executor.submit(TrainNetJob(args.train_args))
    print(f"submitted job {job.job_id} ({executor.cluster}): train_net.py {' '.join(args.train_args)}; "
          f"logs in {job.paths.stdout.parent}", flush=True)
    if not args.wait:
        return 0
    job.result()
    print(f"job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
