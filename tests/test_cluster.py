"""Past one machine (docs/multi_gpu.md#cluster): the cluster launchers (torchrun, srun) and the
refused mixes of launchers, preemption through the real launchers, the SLURM submitter on
submitit's local executor, and one run per output folder.

The agreement of several workers on a preemption boundary, the checkpoint it writes and the
bit-equal resume are tested under NCCL's rule in tests/test_nccl_rules.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TOY_SGR, start_script

from sgr_d2.engine.output_lock import LOCK_NAME, STALE_AFTER_S, OutputDirInUse, OutputLock
from sgr_d2.engine.workers import LaunchConflict, World, cluster_world, expand_nodelist

# the toy SGR config, smaller (64 px crops, output stride 16, 8 tokens), on the CPU, no evaluation
SMALL = ("MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
         "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "DATASETS.TEST", "()",
         "MODEL.RESNETS.OUTPUT_STRIDE", "16", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SGR.NUM_TOKENS", "8",
         "MODEL.SGR.NUM_MATCHED", "4", "MODEL.SGR.TOKEN_DIM", "32", "MODEL.SGR.FFN_DIM", "64",
         "SOLVER.CHECKPOINT_PERIOD", "1000")

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
# task 3 of an srun step of 2 nodes x 2 tasks
SRUN = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]"}


# ----------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("env, flags, expected", [
    (TORCHRUN, {}, World("torchrun", 3, 4, 1, 2, "node7", 29500)),
    (SRUN, {}, World("srun", 3, 4, 1, 2, "gpu07", 20000 + 123456 % 20000)),
    (dict(SRUN, MASTER_PORT="12345", MASTER_ADDR="10.0.0.1"), {}, World("srun", 3, 4, 1, 2, "10.0.0.1", 12345)),
    # one torchrun agent per srun task (2 tasks x 2 workers), joined into one group of 4
    (dict(SRUN, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)",
          **TORCHRUN), {}, World("torchrun", 3, 4, 1, 2, "node7", 29500)),
    # srun with one task per machine, detectron2's launcher starting each machine's workers
    (dict(SRUN, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)"),
     dict(num_gpus_per_machine=8, num_machines=2, machine_rank=1, dist_url="tcp://gpu07:29500"), None),
    ({}, dict(num_gpus_per_machine=2), None),  # no cluster launcher: detectron2's flags
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
     dict(num_gpus_per_machine=8), None),  # one srun task: its --num-gpus workers
    (dict(SRUN, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0"), {}, World("srun", 0, 4, 0, 2, "gpu07", 23456)),
], ids=["torchrun", "srun", "srun-master-set", "torchrun-per-srun-task", "srun-one-task-per-machine",
        "none", "srun-one-task", "srun-rank0"])
def test_cluster_world_reads_the_launchers_variables(env, flags, expected):
    assert cluster_world(environ=env, **flags) == expected


def test_a_batch_script_of_several_tasks_is_not_an_srun_task():
    """The batch script itself (SLURM_PROCID 0 of SLURM_NTASKS, no SLURM_STEP_ID) starts nothing
    of SLURM's: `python train_net.py --num-gpus 8` there is detectron2's launcher."""
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert cluster_world(num_gpus_per_machine=8, environ=env) is None


@pytest.mark.parametrize("env, flags, named", [
    (TORCHRUN, dict(num_gpus_per_machine=2), ("RANK=3", "WORLD_SIZE=4", "--num-gpus 2")),
    (TORCHRUN, dict(dist_url="tcp://10.0.0.1:1234"), ("LOCAL_RANK=1", "--dist-url tcp://10.0.0.1:1234")),
    (SRUN, dict(num_machines=2), ("SLURM_NTASKS=4", "SLURM_PROCID=3", "--num-machines 2")),
    (SRUN, dict(num_gpus_per_machine=2), ("SLURM_NTASKS=4", "--num-gpus 2")),
    # srun started 2 tasks, each a torchrun of 2 workers in a group of its own: 2 runs
    (dict(SRUN, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_STEP_TASKS_PER_NODE="1(x2)",
          **dict(TORCHRUN, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")),
     {}, ("SLURM_NTASKS=2", "WORLD_SIZE=2", "holds only 2 workers")),
    ({"RANK": "0", "WORLD_SIZE": "2"}, {}, ("RANK=0", "WORLD_SIZE=2", "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT")),
    (dict(SRUN, SLURM_STEP_TASKS_PER_NODE="3,1"), {}, ("SLURM_STEP_TASKS_PER_NODE=3,1", "--ntasks-per-node")),
    (dict(SRUN, SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="1"), {}, ("SLURM_PROCID=1", "SLURM_LOCALID=1")),
], ids=["torchrun+num-gpus", "torchrun+dist-url", "srun+num-machines", "srun+num-gpus", "torchrun-per-task-apart",
        "partial-env", "uneven-nodes", "cyclic-ranks"])
def test_mixed_launchers_are_refused_naming_the_variables_and_arguments(env, flags, named):
    with pytest.raises(LaunchConflict) as e:
        cluster_world(environ=env, **flags)
    assert all(n in str(e.value) for n in named), (named, str(e.value))


def test_expand_nodelist_with_and_without_scontrol(tmp_path, monkeypatch):
    assert expand_nodelist("gpu[07-09,11],login1,rack2-[8-10]-ib", use_scontrol=False) == [
        "gpu07", "gpu08", "gpu09", "gpu11", "login1", "rack2-8-ib", "rack2-9-ib", "rack2-10-ib"]
    with pytest.raises(ValueError, match="rack\\[1-2\\]-n\\[1-2\\]"):
        expand_nodelist("rack[1-2]-n[1-2]", use_scontrol=False)
    # where scontrol is on PATH, its expansion is used (here a stand-in that answers differently)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'a-%s\\nb\\n' \"$3\"\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert expand_nodelist("rack[1-2]-n[1-2]") == ["a-rack[1-2]-n[1-2]", "b"]


def test_submit_slurm_passes_train_net_arguments_with_resume_and_refuses_worker_flags():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import submit_slurm
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    args = submit_slurm.parse_args(["--nodes", "2", "--gpus-per-node", "4", "--partition", "p", "--time", "60", "--",
                                    "--config-file", "c.yaml", "SOLVER.MAX_ITER", "9"])
    assert args.train_args == ["--resume", "--config-file", "c.yaml", "SOLVER.MAX_ITER", "9"]
    assert (args.nodes, args.gpus_per_node, args.partition, args.time) == (2, 4, "p", 60)
    with pytest.raises(SystemExit):
        submit_slurm.parse_args(["--", "--config-file", "c.yaml", "--num-gpus", "8"])


def test_train_net_exits_with_the_launchers_error(monkeypatch):
    """torchrun's variables and --num-gpus 2: train_net.py exits (status 1) with the one error,
    before any process group exists."""
    import runpy

    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--config-file", TOY_SGR, "--num-gpus", "2"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="__main__")
    assert isinstance(e.value.code, str) and e.value.code.startswith("train_net.py: torchrun"), e.value.code
    assert "RANK=3" in e.value.code and "--num-gpus 2" in e.value.code
    assert not torch.distributed.is_initialized()


def test_one_process_stops_at_the_signals_iteration_but_completes_its_last(tmp_path, one_thread):
    """One process: a signal during iteration 0 stops training after it, with model_0000000.pth
    (its random states included) tagged and exit code 75; resumed, a signal during the last
    iteration lets the run complete (model_final.pth), and the handlers are given back."""
    from detectron2.engine import HookBase
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.config import load_config
    from sgr_d2.engine.trainer import Trainer

    class _SignalAt(HookBase):
        def __init__(self, iteration, signum):
            self.iteration, self.signum = iteration, signum

        def before_step(self):
            if self.trainer.iter == self.iteration:
                os.kill(os.getpid(), self.signum)

    def trainer(signal_at):
        cfg = load_config(TOY_SGR, [*SMALL, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path)])
        seed_all_rng(cfg.SEED)
        t = Trainer(cfg)
        t.register_hooks([_SignalAt(*signal_at)])
        return t

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    t = trainer((0, signal.SIGUSR1))
    t.resume_or_load(resume=False)
    with pytest.raises(SystemExit) as e:
        t.train()
    assert (e.value.code, e.value.iteration, e.value.signals) == (75, 0, (signal.SIGUSR1,))
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    saved = torch.load(tmp_path / "model_0000000.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 0 and "torch" in saved["trainer"]["rng"]
    for s in handlers:  # after a stop: ignored until the process exits
        signal.signal(s, handlers[s])
    t = trainer((2, signal.SIGTERM))
    t.resume_or_load(resume=True)
    t.train()
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 2
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_process_forked_during_training_dies_of_sigterm_and_the_trainer_records_nothing():
    """A process forked while the handlers are set (a DataLoader worker, panopticapi's PQ pool,
    which its parent ends with SIGTERM at exit) dies of the signal as without them; the training
    process itself records nothing. Before: the child only recorded it, and the training process
    waited at exit, after its final panoptic evaluation, forever."""
    import multiprocessing
    from types import SimpleNamespace

    from sgr_d2.engine import preemption

    hook = preemption.PreemptionHook()
    hook.trainer = SimpleNamespace(iter=0, max_iter=3)
    before = signal.getsignal(signal.SIGTERM)
    hook.before_train()
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.5)  # the child runs its sleep
        child.terminate()
        child.join(timeout=20)
        assert child.exitcode == -signal.SIGTERM
        assert not preemption.requested()
    finally:
        if child.is_alive():
            child.kill()
        hook.after_train()
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- one run per output folder
def _bytes_and_times(folder: Path):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _holder(folder, *, die=False):
    """A forked process that takes the lock of ``folder`` and waits (returns its pid and a pipe
    end to close to make it release and exit), or dies by SIGKILL holding it (``die``)."""
    read, write = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no exceptions past here
        try:
            os.close(write)
            lock = OutputLock(str(folder))
            lock.acquire()
            os.write(ready_w, b"1")
            if die:
                os.kill(os.getpid(), signal.SIGKILL)
            os.read(read, 1)
            lock.release()
        finally:
            os._exit(0)
    os.close(read)
    assert os.read(ready_r, 1) == b"1"
    if die:
        os.waitpid(pid, 0)
    return pid, write


def test_a_run_on_an_output_dir_a_live_run_holds_is_refused_and_writes_nothing(tmp_path):
    """A live holder (another process): train_net's body, training and --eval-only, is refused
    naming the holder's host and pid before anything is built, and the folder is byte-identical
    (mtimes too). Once the holder has ended, its lock file is gone and the lock can be taken."""
    from sgr_d2.engine.trainer import argument_parser, run

    out = tmp_path / "run"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"an earlier checkpoint")
    pid, release = _holder(out)
    try:
        before = _bytes_and_times(out)
        assert LOCK_NAME in before
        for flags in ([], ["--eval-only", "--allow-random-weights"]):
            args = argument_parser().parse_args(["--config-file", TOY_SGR, *flags, *SMALL, "OUTPUT_DIR", str(out)])
            with pytest.raises(OutputDirInUse) as e:
                run(args)
            assert f"OUTPUT_DIR {out} is in use by another run (host {socket.gethostname()}, pid {pid}" in str(e.value)
            assert _bytes_and_times(out) == before
    finally:
        os.close(release)
        os.waitpid(pid, 0)
    assert not (out / LOCK_NAME).exists()
    with OutputLock(str(out)) as lock:
        lock.check()
        lock.acquire()
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in out.iterdir()) == ["model_final.pth"]


def test_the_lock_is_taken_when_the_first_file_is_written_and_given_back_with_the_folder(tmp_path):
    """Two runs started together both pass the check; the first to write takes the lock and the
    other is refused then, its folder untouched; a run that created the folder and wrote nothing
    else leaves no folder behind."""
    out = tmp_path / "new"
    first, second = OutputLock(str(out)), OutputLock(str(out))
    first.check()
    second.check()
    assert not out.exists()  # checking writes nothing, not even the folder
    first.acquire()
    before = _bytes_and_times(out)
    with pytest.raises(OutputDirInUse, match=f"pid {os.getpid()}"):
        second.acquire()
    assert _bytes_and_times(out) == before
    first.release()
    assert not out.exists()


@pytest.mark.parametrize("case", ["pid gone", "other host, old heartbeat", "earlier run of this SLURM job"])
def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, monkeypatch, case):
    from conftest import log_records

    out = tmp_path / "run"
    pid, _ = _holder(out, die=True)  # killed holding the lock: the kernel dropped its flock
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == pid
    if case != "pid gone":
        record.update(host="another-node", slurm_job="77", slurm_restart="0")
        (out / LOCK_NAME).write_text(json.dumps(record))
    if case == "other host, old heartbeat":
        old = time.time() - STALE_AFTER_S - 60
        os.utime(out / LOCK_NAME, (old, old))
    if case == "earlier run of this SLURM job":  # requeued: same job id, the next restart
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    reason = {"pid gone": f"pid {pid} is not running on this host",
              "other host, old heartbeat": "s old (more than",
              "earlier run of this SLURM job": "it is an earlier run of this SLURM job 77"}[case]
    with log_records("sgr_d2.engine.output_lock") as logged, OutputLock(str(out)) as lock:
        lock.check()
        lock.acquire()
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(logged) == 1 and f"pid {pid}" in logged[0] and reason in logged[0], logged


def test_a_fresh_lock_of_another_host_is_honoured(tmp_path):
    """flock may be local to one machine on a network filesystem: a record of another host whose
    heartbeat is recent refuses the run although nothing holds the flock here."""
    out = tmp_path / "run"
    pid, _ = _holder(out, die=True)
    record = dict(json.loads((out / LOCK_NAME).read_text()), host="another-node")
    (out / LOCK_NAME).write_text(json.dumps(record))
    before = _bytes_and_times(out)
    for step in ("check", "acquire"):
        with pytest.raises(OutputDirInUse, match=f"host another-node, pid {pid}, .*heartbeat \\d+ s ago"):
            getattr(OutputLock(str(out)), step)()
    assert _bytes_and_times(out) == before


# ----------------------------------------------------------------------------- real launchers
def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    for k in list(env):  # this process's own launcher's variables, if any
        if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            del env[k]
    env.update(extra)
    return env


def _train_net(out, max_iter, *flags):
    return [os.path.join(REPO, "train_net.py"), "--config-file", TOY_SGR, *flags, *SMALL,
            "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out)]


def _holder_pid(out, not_pid=None, proc=None, timeout=600):
    """The pid in the lock record of ``out`` once a run holds it (after its first iteration)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = json.loads((out / LOCK_NAME).read_text())["pid"]
            if pid != not_pid:
                return pid
        except (OSError, ValueError, KeyError):
            pass
        assert proc is None or proc.poll() is None, "the run ended before it held its folder"
        time.sleep(0.05)
    raise AssertionError(f"no run held {out} within {timeout} s")


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_then_num_gpus_then_srun_continue_one_run_through_two_preemptions(tmp_path):
    """One run of 2 CPU workers, started by one launcher and continued by the next:

    1. ``torchrun --nproc_per_node 2``: one run of world size 2 (not two runs of 1: one events
       file, the rank-1 log in log.txt.rank1). While it runs, its folder refuses another run,
       naming the holder (torchrun's worker 0). SIGUSR1 to worker 1 alone: both workers stop at
       the same iteration, save it, and exit 75 (torchrun reports both).
    2. ``--num-gpus 2 --resume``: SIGTERM to the launcher, which passes it to its workers; they
       save and the launcher exits 75.
    3. two processes with an srun task's SLURM variables, ``--resume``: they join one group of 2
       and finish the run (model_final.pth).

    Every leg: gloo workers, DDP, naiveSyncBN; the lock is given back at each exit."""
    out = tmp_path / "run"
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 *_train_net(out, 100000)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        worker0 = _holder_pid(out, proc=torchrun)
        with pytest.raises(OutputDirInUse, match=f"host {socket.gethostname()}, pid {worker0}"):
            OutputLock(str(out)).check()
        worker1, = set(_children(torchrun.pid)) - {worker0}
        os.kill(worker1, signal.SIGUSR1)
        output = torchrun.communicate(timeout=300)[0]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    assert torchrun.returncode == 1  # torchrun reports its failed workers
    # torchrun's summary of its failed workers: both exited 75, none was killed
    assert len(re.findall(r"exitcode\s*: 75 \(pid: (\d+)\)", output)) == 2, output[-3000:]
    first = torch.load(out / (out / "last_checkpoint").read_text(),
                       map_location="cpu", weights_only=True)
    stopped = first["iteration"]
    log, log1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert log.count("Rank of current process: 0. World size: 2") == 1 and "World size: 1" not in log
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert f"Preempted (signals received by this worker: none here): stopped after iteration {stopped}" in log
    assert f"Preempted (signals received by this worker: SIGUSR1): stopped after iteration {stopped}" in log1
    assert not (out / LOCK_NAME).exists()

    launcher = subprocess.Popen([sys.executable, *_train_net(out, 100000, "--resume", "--num-gpus", "2",
                                                             "--dist-url", f"file://{tmp_path / 'init'}")],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _holder_pid(out, proc=launcher)
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 75, output[-3000:]
    second = torch.load(out / (out / "last_checkpoint").read_text(), map_location="cpu", weights_only=True)
    assert second["iteration"] > stopped and len(second["trainer"]["rng"]) == 2
    assert f"Starting training from iteration {stopped + 1}" in (out / "log.txt").read_text()

    # (srun's tasks: forked from a server that imported sgr_d2, conftest.start_script; torchrun's
    # and the launcher's workers above are fresh interpreters)
    port, end = _free_port(), second["iteration"] + 2
    tasks = [start_script(_train_net(out, end, "--resume"),
                          _env(SLURM_JOB_ID="42", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_PROCID=str(r),
                               SLURM_LOCALID=str(r), SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE="2",
                               SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port)), tmp_path / f"task{r}.log")
             for r in (0, 1)]
    codes = [t.wait(timeout=300) for t in tasks]
    assert codes == [0, 0], "".join((tmp_path / f"task{r}.log").read_text()[-2000:] for r in (0, 1))
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == end - 1
    log = (out / "log.txt").read_text()
    assert log.count("Rank of current process: 0. World size: 2") == 3
    assert f"Starting training from iteration {second['iteration'] + 1}" in log
    assert "NaiveSyncBatchNorm(" in log and "BatchNorm2d(" not in log
    assert (out / "log.txt.rank1").read_text().count("Rank of current process: 1. World size: 2") == 3
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_submit_slurm_on_the_local_executor_requeues_a_preempted_job_that_ends_like_an_uninterrupted_run(tmp_path):
    """tools/submit_slurm.py --cluster local: submitit's signal (SIGUSR2) to the job's task once it
    trains stops it at an iteration boundary with a checkpoint; submitit requeues the job, which
    continues with --resume and ends with model_final.pth equal, bit for bit, to a run that was
    never stopped (trained here, in this process, as train_net.py does)."""
    pytest.importorskip("submitit")
    out, max_iter = tmp_path / "run", 20
    submit = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "submit_slurm.py"), "--cluster", "local",
                               "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "30",
                               "--folder", str(tmp_path / "submitit"), "--wait", "--",
                               *_train_net(out, max_iter)[1:]],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        task = _holder_pid(out, proc=submit)
        os.kill(task, signal.SIGUSR2)
        reference = _uninterrupted(tmp_path / "reference", max_iter)  # meanwhile, here
        output = submit.communicate(timeout=600)[0]
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, output[-3000:]
    job_log = "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.out"))
    stop = re.search(r"Preempted \(signals received by this worker: SIGUSR2\): stopped after iteration (\d+)", job_log)
    assert stop and int(stop.group(1)) < max_iter - 1, job_log[-3000:]
    assert "Requeued job" in job_log and f"Starting training from iteration {int(stop.group(1)) + 1}" in job_log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == max_iter - 1
    assert final["model"].keys() == reference.keys()
    assert all(torch.equal(final["model"][k], reference[k]) for k in reference)


def _uninterrupted(out, max_iter):
    """The final weights of the run, trained in this process as train_net.py trains it."""
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.config import load_config
    from sgr_d2.engine.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job (OMP_NUM_THREADS=1)
    try:
        cfg = load_config(TOY_SGR, [*SMALL, "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out)])
        seed_all_rng(cfg.SEED)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
