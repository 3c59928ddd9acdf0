"""Multi-GPU rules checked on the CPU (docs/multi_gpu.md).

On a cluster the default process group is NCCL, which has no CPU backend: a tensor collective
on a CPU tensor crashes there and works here on gloo. These tests make the CPU obey NCCL's rule:

* the trainer's host-side bookkeeping (every hook, the evaluators, the NaN guard, the monitors,
  the checkpointer, the writers) runs in two CPU workers whose default group refuses CPU tensors
  as NCCL does (``init_process_group("cuda:gloo")``, seen by detectron2's ``comm`` as "nccl", so
  its object collectives use a gloo group of their own, as on a cluster). Only the model's own
  collectives (DDP's gradient all-reduce, the loss normalisers), whose tensors live on the GPU on
  a cluster, are given a gloo group;
* two static rules over the package's source: tensor collectives only where their tensor is on
  the model's device, and no tensor created without a device in the code that runs on it;
* the host syncs of a training step are counted.
"""
from __future__ import annotations

import ast
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import REPO, TOY_SGR, preloaded_context, tiny_toy_cfg, toy_batch
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = Path(REPO) / "sgr_d2"

# ----------------------------------------------------------------------------- static rules
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                      "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
                      "scatter", "gather", "send", "recv", "isend", "irecv", "reduce_dict"}
# (file, function) -> why its tensor lives on the model's device
ALLOWED_TENSOR_COLLECTIVES = {
    ("sgr/losses.py", "world_mean_count"): "the loss normalisers, created on the losses' device",
}


def _calls(tree):
    """(function name, call node) of every call, with the name of the function around it."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    yield fn.name, node


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_host_side_code_uses_only_object_collectives():
    """A tensor collective (torch.distributed's, or detectron2's comm.reduce_dict) anywhere in the
    package but the allowed places fails this test: host-side code uses detectron2's object
    collectives (comm.all_gather / gather), which run on a gloo group. Catches exactly the bug of
    UnlabelledImagesMonitor, which all-reduced a CPU tensor on the default (NCCL) group."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for fn, call in _calls(ast.parse(path.read_text())):
            name = _dotted(call.func)
            head, _, attr = name.rpartition(".")
            if attr in TENSOR_COLLECTIVES and head in ("dist", "torch.distributed") \
                    or name == "comm.reduce_dict":
                found[(rel, fn)] = name
    assert set(found) == set(ALLOWED_TENSOR_COLLECTIVES), found


FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
             "linspace", "eye"}
# (file, function) -> why a tensor made there without a device is right
HOST_TENSORS = {
    ("sgr/components.py", "connected_components"): "the data loader's side: components are made on the host",
    ("modeling/maskformer/ms_deform_attn.py", "reset_parameters"): "initialisation (the module then moves)",
    ("modeling/maskformer/pixel_decoder.py", "__init__"): "a parameter's initialisation",
    ("modeling/maskformer/criterion.py", "__init__"): "a buffer, which moves with the module",
    ("modeling/maskformer/meta_arch.py", "__init__"): "buffers, which move with the module",
    ("modeling/heads/upernet_head.py", "_pooling_matrix"): "ONNX export only: built on the CPU, then moved",
}


def test_tensors_of_the_forward_pass_are_made_on_a_device():
    """In the code that runs on the model's device (the SGR core, the models), a tensor factory
    without ``device=`` (and not moved at once, ``torch.as_tensor(host).to(device)``) is allowed
    only where it is listed (initialisation, buffers, the host side). Catches a ``torch.zeros(n)``
    in a forward pass, which is a CPU tensor next to CUDA ones on a GPU."""
    found = set()
    for sub in ("sgr", "modeling"):
        for path in (PACKAGE / sub).rglob("*.py"):
            rel = path.relative_to(PACKAGE).as_posix()
            tree = ast.parse(path.read_text())
            moved = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute) and n.func.attr == "to"}
            for fn, call in _calls(tree):
                name = _dotted(call.func)
                if name.startswith("torch.") and name.rsplit(".", 1)[-1] in FACTORIES and id(call) not in moved \
                        and not any(k.arg == "device" for k in call.keywords):
                    found.add((rel, fn))
    assert found == set(HOST_TENSORS), sorted(found)


# ----------------------------------------------------------------------------- host syncs
SYNCS = {"item", "cpu", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
         "unique_consecutive", "bincount", "masked_select", "argwhere"}


class _CountSyncs(TorchFunctionMode):
    """Counts the calls that read a tensor back to the host (a GPU sync), made by sgr_d2's code;
    boolean-mask indexing counts too (it needs the mask's count)."""

    def __init__(self):
        super().__init__()
        self.where = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
            and args[1].dtype == torch.bool
        if name in SYNCS or bool_index:
            import inspect

            for frame in inspect.stack()[1:]:
                if "site-packages" not in frame.filename and "/torch/" not in frame.filename:
                    if "/sgr_d2/" in frame.filename:
                        self.where.append(f"{Path(frame.filename).name}:{frame.lineno} {name}")
                    break
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config, per_output", [
    ("dil_fcn_r18_sgr.yaml", 0),
    ("mask2former_r18_sgr.yaml", 1),
], ids=["per_pixel", "mask2former"])
def test_a_training_step_reads_the_device_back_once_for_sgr_and_once_per_decoder_output(config, per_output):
    """The SGR loss reads all its cost matrices back in one transfer whatever the batch size; the
    MaskFormer matching one per decoder output (Mask2Former: its layers + 1); the loss
    normalisers, the per-pixel loss and the deformable attention none. Counted over the model's
    training forward pass for batches of 1 and 3 images (the counts must not grow with it)."""
    cfg = tiny_toy_cfg(os.path.join(REPO, "configs", "toy", config))
    from detectron2.modeling import build_model

    model = build_model(cfg).train()
    outputs = cfg.MODEL.MASK_FORMER.DEC_LAYERS if per_output else 0
    for n in (1, 3):
        batch = toy_batch(cfg, n=n)
        with _CountSyncs() as counted:
            model(batch)
        assert len(counted.where) == 1 + per_output * outputs, counted.where


# ----------------------------------------------------------------------------- two workers, NCCL's rule
_MODEL_GROUP = None


def _nccl_rule_worker(rank, world, init_file, out_dir, data_dir):
    """One worker: the default group refuses CPU tensors (NCCL's rule); detectron2's comm sees
    "nccl" and builds its own gloo group for object collectives; the model's collectives (DDP's,
    the loss normalisers', synchronised BatchNorm's) get a gloo group (on a cluster their tensors
    are on the GPU). Then the trainer's whole loop:
    training on two images, one of them without a labelled pixel (each worker gets one per
    iteration), with checkpoints and the final evaluation with the token metrics; then a resumed
    run that a NaN on worker 1 stops on both workers. Between them, two runs stopped by a
    preemption signal (engine/preemption.py) and resumed."""
    global _MODEL_GROUP
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import HookBase, hooks
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from sgr_d2.config import sync_norms
    from sgr_d2.engine import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("cuda:gloo", init_method=f"file://{init_file}", world_size=world, rank=rank,
                            timeout=timedelta(seconds=60))
    _MODEL_GROUP = dist.new_group(backend="gloo")
    comm._LOCAL_PROCESS_GROUP = _MODEL_GROUP
    get_backend, barrier, all_reduce = dist.get_backend, dist.barrier, dist.all_reduce
    default = (None, dist.group.WORLD)
    dist.get_backend = lambda group=None: "nccl" if group in default else get_backend(group)
    torch.cuda.current_device = lambda: 0  # what detectron2's barrier names on NCCL (ignored below)
    # a barrier carries no tensor of the caller: NCCL's works on a cluster
    dist.barrier = lambda group=None, async_op=False, device_ids=None: barrier(
        group=_MODEL_GROUP if group in default else group, async_op=async_op)
    inside = []

    def model_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if inside and group in default:
            group = _MODEL_GROUP  # a collective of the model's forward pass: its tensors are on the GPU
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = model_all_reduce

    class _OnModelGroup:  # naiveSyncBN's collectives (fvcore's), forward and backward: the model's
        def __getattr__(self, name):
            return getattr(dist, name)

        def all_gather(self, tensors, tensor, async_op=False):
            return all_gather(tensors, tensor, group=_MODEL_GROUP, async_op=async_op)

        def all_reduce(self, tensor, op=dist.ReduceOp.SUM, async_op=False):
            return all_reduce(tensor, op=op, group=_MODEL_GROUP, async_op=async_op)

    import fvcore.nn.distributed

    all_gather = dist.all_gather
    fvcore.nn.distributed.dist = _OnModelGroup()
    ddp_init = DistributedDataParallel.__init__

    def ddp_on_model_group(self, module, *args, **kwargs):
        kwargs["process_group"] = kwargs.get("process_group") or _MODEL_GROUP
        ddp_init(self, module, *args, **kwargs)

    DistributedDataParallel.__init__ = ddp_on_model_group
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        all_reduce(torch.zeros(1))  # the emulation refuses a CPU tensor on the default group

    train, val = "sgr_nccl_rule_train", "sgr_nccl_rule_val"
    dicts = [{"file_name": f"{data_dir}/{stem}.jpg", "sem_seg_file_name": f"{data_dir}/{stem}.png",
              "height": 40, "width": 40} for stem in ("labelled", "unlabelled")]
    DatasetCatalog.register(train, lambda: list(dicts))
    MetadataCatalog.get(train).set(ignore_label=255, stuff_classes=[str(i) for i in range(6)])
    val_dicts = DatasetCatalog.get("sgr_toy_sem_seg_val")[:2]
    DatasetCatalog.register(val, lambda: val_dicts)
    MetadataCatalog.get(val).set(**{k: v for k, v in MetadataCatalog.get("sgr_toy_sem_seg_val").as_dict().items()
                                    if k != "name"})

    def trainer(max_iter, out=out_dir, eval_period=0):
        cfg = tiny_toy_cfg(TOY_SGR, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(max_iter),
                           "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TRAIN", f"('{train}',)",
                           "DATASETS.TEST", f"('{val}',)", "TEST.TOKEN_SEMANTICS", "True",
                           "INPUT.MIN_SIZE_TEST", "64", "TEST.EVAL_PERIOD", str(eval_period))
        sync_norms(cfg, world)  # as train_net.py's setup_cfg: the workers' BatchNorm statistics agree
        seed_all_rng(cfg.SEED + rank)
        t = Trainer(cfg)
        t.model.module.register_forward_pre_hook(lambda *a: inside.append(1))
        t.model.module.register_forward_hook(lambda *a: inside.clear())
        return t

    def weights(t):
        return {k: v.clone() for k, v in t.model.module.state_dict().items()}

    first = trainer(3, eval_period=1)
    first.resume_or_load(resume=False)
    first.train()
    outcome = [f"trained to {first.iter}"]
    reference = weights(first)

    # Preemption (engine/preemption.py): a signal to one worker stops both at the same boundary
    # with a checkpoint; --resume then ends with the uninterrupted run's weights, bit for bit.
    class _SignalAt(HookBase):
        def __init__(self, worker, iteration, signum):
            self.worker, self.iteration, self.signum = worker, iteration, signum

        def before_step(self):
            if comm.get_rank() == self.worker and self.trainer.iter == self.iteration:
                os.kill(os.getpid(), self.signum)

    def preempted_then_resumed(name, signal_hook=None, signal_in_eval=None, signal_in_save=None):
        out = Path(out_dir) / name
        t = trainer(3, out, eval_period=1)
        t.resume_or_load(resume=False)
        if signal_hook:
            t.register_hooks([signal_hook])
        if signal_in_eval is not None and comm.get_rank() == signal_in_eval[0]:
            evaluation = next(h for h in t._hooks if isinstance(h, hooks.EvalHook))
            evaluate, at = evaluation._func, signal_in_eval[1]

            def evaluate_after_a_signal():
                if t.iter == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return evaluate()

            evaluation._func = evaluate_after_a_signal
        if signal_in_save is not None and comm.get_rank() == signal_in_save:
            checkpoint = t.checkpointer.save

            def checkpoint_during_a_signal(*args, **kwargs):
                save = torch.save

                def save_after_a_signal(*a, **k):  # the temporary file is open: mid-write
                    os.kill(os.getpid(), signal.SIGTERM)
                    return save(*a, **k)

                torch.save = save_after_a_signal
                try:
                    return checkpoint(*args, **kwargs)
                finally:
                    torch.save = save

            t.checkpointer.save = checkpoint_during_a_signal
        try:
            t.train()
            return f"{name}: not stopped"
        except SystemExit as e:
            stop = f"{name}: exit {e.code} after iteration {e.iteration}, signals here: " + \
                   ",".join(signal.Signals(x).name for x in e.signals)
        again = trainer(3, out, eval_period=1)
        again.resume_or_load(resume=True)
        again.train()
        final = weights(again)
        equal = all(torch.equal(final[k], reference[k]) for k in reference)
        return f"{stop}; resumed to {again.iter}, weights equal: {equal}"

    outcome.append(preempted_then_resumed("preempt", signal_hook=_SignalAt(1, 0, signal.SIGUSR1), signal_in_save=0))
    outcome.append(preempted_then_resumed("preempt_in_eval", signal_in_eval=(0, 0)))

    class _NaNOnWorker1(HookBase):
        def before_step(self):
            if comm.get_rank() == 1 and self.trainer.iter == 4:
                with torch.no_grad():
                    # NaN region maps: the SGR terms are NaN whichever image the worker has
                    self.trainer.model.module.backbone.sgr.region_conv.weight.fill_(float("nan"))

    second = trainer(6)
    second.resume_or_load(resume=True)
    second.register_hooks([_NaNOnWorker1()])
    try:
        second.train()
        outcome.append("no stop")
    except FloatingPointError as e:
        outcome.append(str(e))
    Path(out_dir, f"rank{rank}.txt").write_text("\n".join(outcome))
    from sgr_d2.engine.workers import release_process_groups

    release_process_groups()


@pytest.mark.slow
def test_the_trainer_obeys_ncclS_rule_on_two_workers(tmp_path):
    """Fails on a host-side tensor collective (the unlabelled-images monitor's all-reduce of a CPU
    tensor, the NaN guard's flag on the losses' device) with NCCL's error; passes when everything
    outside the model's forward and backward uses object collectives. Also: DDP trains although
    one worker has no labelled pixel at every iteration (every parameter is in the graph; else
    the other worker waits in the gradient all-reduce until the timeout); a NaN on worker 1 stops
    both workers at the same iteration (none waits in the next collective) with each worker's
    terms, and the last good state is saved once and tagged. Preemption: a signal on one worker
    stops both at the same iteration boundary (agreed through the NaN guard's object gather),
    with one checkpoint holding both workers' random states, and exit code 75; a second signal
    during the save changes nothing; a signal during an evaluation lets it finish and stops at the
    next boundary, its results kept; each run resumed with --resume ends with the weights of the
    run that was never stopped, bit for bit (it fails when the workers' random states are not
    restored: the crops, flips and dropout differ)."""
    import re

    import numpy as np
    import torch.multiprocessing as mp
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for stem, label in (("labelled", np.arange(1600).reshape(40, 40) % 3), ("unlabelled", np.full((40, 40), 255))):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{stem}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(data / f"{stem}.png")
    out = tmp_path / "run"
    preloaded_context()  # its workers: forked from a server that imported sgr_d2 once (conftest.py)
    mp.start_processes(_nccl_rule_worker, args=(2, str(tmp_path / "init"), str(out), str(data)), nprocs=2,
                       start_method="forkserver")
    reports = [(out / f"rank{r}.txt").read_text().split("\n", 3) for r in (0, 1)]
    msg = reports[0][3]
    assert [r[0] for r in reports] == ["trained to 3"] * 2
    # a signal to worker 1 before iteration 0 (and a SIGTERM to worker 0 while it writes the
    # checkpoint): both stop after iteration 0, exit 75, and the resumed run ends bit-equal
    assert reports[0][1] == "preempt: exit 75 after iteration 0, signals here: SIGTERM; resumed to 3, " \
                            "weights equal: True", reports[0][1]
    assert reports[1][1] == "preempt: exit 75 after iteration 0, signals here: SIGUSR1; resumed to 3, " \
                            "weights equal: True", reports[1][1]
    saved = torch.load(out / "preempt" / "model_0000000.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 0 and len(saved["trainer"]["rng"]) == 2  # both workers' random states
    periodic = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=True)["trainer"]["rng"]
    assert len(periodic) == 2 and not torch.equal(periodic[0]["torch"], periodic[1]["torch"])  # seeds SEED + rank
    # a SIGTERM to worker 0 while it evaluates after iteration 0: the evaluation finishes, both
    # stop after iteration 1 (the next boundary all workers know of), and the resumed run ends
    # bit-equal, its metrics.json holding the evaluations the uninterrupted run's holds (the
    # one after iteration 1 written by the stopped run), with the same results
    assert reports[0][2] == "preempt_in_eval: exit 75 after iteration 1, signals here: SIGTERM; resumed to 3, " \
                            "weights equal: True", reports[0][2]
    assert reports[1][2] == "preempt_in_eval: exit 75 after iteration 1, signals here: ; resumed to 3, " \
                            "weights equal: True", reports[1][2]
    import json

    def evaluations(folder):
        return [{k: v for k, v in json.loads(line).items() if "/" in k or k == "iteration"}
                for line in (folder / "metrics.json").read_text().splitlines() if "sem_seg/mIoU" in line]

    # (metrics.json gets the latest evaluation at each write: after iteration 1, and the final one)
    assert len(evaluations(out)) == 2 and evaluations(out)[0]["iteration"] == 1
    assert evaluations(out / "preempt_in_eval") == evaluations(out)
    assert reports[0][3] == reports[1][3], reports  # the same NaN stop, with the same message, on both workers
    assert msg.startswith("Loss became infinite or NaN at iteration 4 (non-finite: "), msg
    non_finite = re.search(r"\(non-finite: ([^)]*)\)", msg).group(1)  # worker 1's image may have no label
    assert non_finite in ("loss_sgr_cls, loss_sgr_div, loss_sgr_union",
                          "loss_sem_seg, loss_sgr_cls, loss_sgr_div, loss_sgr_union"), msg
    worker0 = re.search(r"worker 0: (.*?); worker 1: ", msg).group(1)
    worker1 = re.search(r"; worker 1: (.*?)\. The update", msg).group(1)
    # worker 0's own SGR terms are finite (its loss_sem_seg is not: synchronised BatchNorm in the
    # head averages worker 1's NaN statistics in)
    assert re.search(r"loss_sgr_union=\d", worker0) and re.search(r"loss_sgr_cls=\d", worker0), worker0
    assert "loss_sgr_union=nan" in worker1 and "loss_sem_seg=" in worker1, worker1
    assert (out / "last_checkpoint").read_text() == "model_last_good.pth"
    assert torch.load(out / "model_last_good.pth", map_location="cpu", weights_only=True)["iteration"] == 3
    # the evaluations of the first run gathered both workers' images: mIoU and token metrics
    first = evaluations(out)
    assert all(0 < e["token_semantics/S_C"] <= 1 and "token_semantics/D_I" in e for e in first)
    assert (out / "model_final.pth").is_file()
