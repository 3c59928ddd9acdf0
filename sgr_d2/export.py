"""ONNX export of sgr_d2's semantic-segmentation models, checked against onnxruntime.

* :class:`SemanticSegmentationExport` wraps a built model (Dilated-FCN / DeepLabV3 / Semantic-FPN /
  UperNet, MaskFormer, Mask2Former; with or without SGR) as a module of one tensor: the image
  ``(1, 3, H, W)`` float32, raw pixels in the config's ``INPUT.FORMAT`` (what detectron2's
  ``DefaultPredictor`` feeds the model). It returns ``sem_seg`` ``(1, num_classes, H, W)``, the
  model's own per-class scores at the input resolution, and, for a model with SGR,
  ``sgr_regions`` ``(1, K, h, w)``, the concept-region maps over the image. It runs the model's
  own inference path (``model([{"image": ...}])``: normalisation, padding, the head, the
  per-pixel softmax or ``semantic_inference``, the crop and resize, the region crop), so the
  exported graph computes exactly what PyTorch evaluates.
* :func:`export_onnx` writes the ``.onnx`` file with PyTorch's TorchScript-based exporter
  (``torch.onnx.export(..., dynamo=False)``: the dynamo exporter's ``torch.export`` stops at
  detectron2's ``ImageList.from_tensors``, whose padded size depends on the input's values as far
  as ``torch.export`` can tell). A part that cannot be exported is named in an
  :class:`ExportError`.
* :func:`compare_with_onnxruntime` runs an image through PyTorch and onnxruntime and reports the
  largest absolute difference of each output and the argmax agreement of ``sem_seg``.
* :class:`OnnxSemanticPredictor` is ``DefaultPredictor`` for an exported file (``demo/demo.py --onnx``).

onnx and onnxruntime are optional dependencies (``pip install sgr_d2[deploy]``), imported here
only when used.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ExportError",
    "SemanticSegmentationExport",
    "export_onnx",
    "check_exportable",
    "compare_with_onnxruntime",
    "onnxruntime_session",
    "OnnxSemanticPredictor",
    "report_failures",
    "synthetic_image",
    "run_onnxruntime",
    "OPSET",
    "ATOL",
    "MIN_ARGMAX_AGREEMENT",
]

OPSET = 17  # LayerNormalization and GridSample (deformable attention) are native from 17 and 16
# What export_onnx verifies and the tests assert: outputs are scores / probabilities in [0, 1].
ATOL = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
DEPLOY_HELP = "install the optional dependencies: pip install 'sgr_d2[deploy]' (onnx, onnxruntime, onnxscript)"


class ExportError(RuntimeError):
    """A model, or a part of it, that cannot be exported (the message names the part)."""


def _semantic_meta_archs():
    from detectron2.modeling import SemanticSegmentor

    from .modeling.maskformer import MaskFormer

    return (SemanticSegmentor, MaskFormer)


def check_exportable(model: nn.Module, dynamic: bool = False) -> None:
    """Raise :class:`ExportError` naming what keeps ``model`` from being exported (with ``dynamic``:
    from being exported for any input size)."""
    from .modeling.heads import PyramidPooling
    from .modeling.maskformer import MSDeformAttnPixelDecoder
    from .modeling.backbone.sgr_backbone import find_sgr_backbone

    archs = _semantic_meta_archs()
    if not isinstance(model, archs):
        raise ExportError(
            f"{type(model).__name__} (MODEL.META_ARCHITECTURE) is not a semantic-segmentation model: "
            "tools/export_onnx.py exports SGRSemanticSegmentor and MaskFormer (MaskFormer and Mask2Former) models, "
            f"whose inference returns 'sem_seg' (detectron2's {', '.join(a.__name__ for a in archs)} "
            "and their subclasses)"
        )
    if isinstance(model, archs[1]) and (not model.semantic_on or model.panoptic_on or model.instance_on):
        raise ExportError(
            f"{type(model).__name__}: the export returns 'sem_seg' only, but MODEL.MASK_FORMER.TEST.SEMANTIC_ON / "
            f"PANOPTIC_ON / INSTANCE_ON are {model.semantic_on} / {model.panoptic_on} / {model.instance_on}; "
            "export with SEMANTIC_ON True, PANOPTIC_ON False and INSTANCE_ON False")
    if not dynamic:
        return
    fixed = " (the exporter records it as a constant); export at a fixed size (one file per input size) instead"
    for name, m in model.named_modules():
        if isinstance(m, MSDeformAttnPixelDecoder):
            raise ExportError(f"--dynamic: {name} (MSDeformAttnPixelDecoder, MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME) "
                              "normalises its sampling locations by the feature-map sizes" + fixed)
        if isinstance(m, PyramidPooling):
            raise ExportError(f"--dynamic: {name} (UperNet's PyramidPooling) is exported with pooling matrices "
                              "built for the input size" + fixed)
    sgr = find_sgr_backbone(model)
    shapes = sgr.output_shape() if sgr is not None else {}
    stride = shapes[sgr.in_feature].stride if sgr is not None and sgr.in_feature in shapes else None
    divisibility = int(getattr(model, "size_divisibility", 0) or 0)
    if stride is not None and stride < divisibility:
        raise ExportError(
            f"--dynamic: the SGR region maps (output 'sgr_regions') are cropped to the image by "
            f"sgr_d2.modeling.sgr_outputs.attach_sgr_regions with Python arithmetic on the sizes; with "
            f"a region stride ({stride}) below the size divisibility ({divisibility}) the crop depends on "
            "the input size" + fixed)


class SemanticSegmentationExport(nn.Module):
    """``forward(image)`` → ``(sem_seg,)`` or ``(sem_seg, sgr_regions)``; see the module docstring."""

    def __init__(self, model: nn.Module):
        super().__init__()
        check_exportable(model)
        self.model = model.eval()
        from .modeling.backbone.sgr_backbone import find_sgr_backbone

        self.has_sgr = find_sgr_backbone(model) is not None
        self.output_names = ["sem_seg", "sgr_regions"] if self.has_sgr else ["sem_seg"]

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f"expected a (1, 3, H, W) image, got {tuple(image.shape)}")
        out = self.model([{"image": image[0]}])[0]
        if self.has_sgr:
            return out["sem_seg"][None], out["sgr_regions"][None]
        return (out["sem_seg"][None],)


@contextlib.contextmanager
def _exportable_attention():
    """PyTorch's fused TransformerEncoderLayer inference path (``_transformer_encoder_layer_fwd``,
    taken in eval mode without gradients) has no ONNX form; the unfused path computes the same."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def _module_stack(model: nn.Module):
    """Records the names of the modules whose forward is running (innermost last)."""
    stack: List[str] = []

    def leave(module, args, output):  # returns None: the output is kept
        if stack:
            stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: stack.append(n) and None))
        handles.append(m.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _scopes_of_op(wrapper: nn.Module, image: torch.Tensor, op: str) -> List[str]:
    """Names (``backbone.sgr.encoder.layers.0``) of the modules whose traced graph holds ``op``."""
    with torch.no_grad(), _exportable_attention():
        graph = torch.jit.trace(wrapper, (image,), check_trace=False).inlined_graph
    names = []
    for node in graph.nodes():
        if node.kind() == op:
            scope = node.scopeName().split("/")[-1].replace("__module.", "")
            scope = scope[len("model."):] if scope.startswith("model.") else scope
            if scope not in names:
                names.append(scope or "(the meta-architecture itself)")
    return names


def _describe(model: nn.Module, names: Sequence[str]) -> str:
    modules = dict(model.named_modules())
    return ", ".join(f"{n} ({type(modules[n]).__name__})" if n in modules else n for n in names)


def export_onnx(model: nn.Module, path: str, height: int, width: int, dynamic: bool = False,
                opset: int = OPSET, verify: bool = True, atol: float = ATOL) -> Tuple[List[str], Dict[str, Dict]]:
    """Export ``model`` (built from an sgr_d2 config, weights loaded) to ``path``; returns the
    output names and the verification reports (``{"HxW": compare_with_onnxruntime report}``).

    The graph is traced with an image of ``height`` × ``width``; the file takes that size only,
    or, with ``dynamic``, any size. With ``verify`` (default), onnxruntime must reproduce PyTorch
    (:func:`compare_with_onnxruntime`: max |Δ| ≤ ``atol`` and argmax agreement ≥
    ``MIN_ARGMAX_AGREEMENT``) on a random image of that size and, with ``dynamic``, of a second
    size that is not a multiple of the model's size divisibility; otherwise :class:`ExportError`.
    """
    check_exportable(model, dynamic)
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # torch.onnx.export writes through it
        raise ImportError(f"onnx is not installed: {DEPLOY_HELP}")
    if height < 1 or width < 1:
        raise ValueError(f"the export size must be positive, got {height}x{width}")
    device = next(model.parameters()).device
    wrapper = SemanticSegmentationExport(model).eval()
    image = synthetic_image(height, width, seed=0).to(device)
    names = wrapper.output_names
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {"image": {2: "height", 3: "width"}, "sem_seg": {2: "height", 3: "width"}}
        if "sgr_regions" in names:
            dynamic_axes["sgr_regions"] = {2: "region_height", 3: "region_width"}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with _module_stack(model) as stack:
        try:
            with torch.no_grad(), _exportable_attention():
                torch.onnx.export(wrapper, (image,), path, dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=names, dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
        except Exception as e:
            _raise_export_error(e, model, wrapper, image, list(stack))
    reports = {}
    if verify:
        sizes = [(height, width)]
        if dynamic:
            sizes.append(_second_size(model, height, width))
        session = onnxruntime_session(path)
        for h, w in sizes:
            report = compare_with_onnxruntime(wrapper, session, synthetic_image(h, w, seed=1).to(device))
            bad = report_failures(report, atol=atol)
            if bad:
                what = f"at {h}x{w}" + (" (--dynamic's second check size)" if (h, w) != (height, width) else "")
                raise ExportError(f"{path}: onnxruntime does not reproduce PyTorch {what}: {'; '.join(bad)}. "
                                  "(Rounding alone moves a badly conditioned model, e.g. a deep one with random "
                                  "weights, by more: compare PyTorch on 1 and 2 threads, and raise --atol if it "
                                  "varies as much.)")
            reports[f"{h}x{w}"] = report
    return names, reports


def _raise_export_error(error: Exception, model: nn.Module, wrapper: nn.Module, image: torch.Tensor,
                        stack: List[str]):
    # "Exporting the operator 'aten::cummax' to ONNX ...", "ONNX export of operator adaptive_avg_pool2d, ..."
    m = re.search(r"operator '?([\w:.]+)'?", str(error))
    if m:  # a traced op without an ONNX form: find it in the traced graph
        op = m.group(1) if "::" in m.group(1) else f"aten::{m.group(1)}"
        try:
            where = _scopes_of_op(wrapper, image, op)
        except Exception:  # the error below still names the op
            where = []
        part = _describe(model, where) if where else "a part of the model"
        raise ExportError(f"{part} cannot be exported to ONNX: it uses {op}, which the ONNX exporter "
                          f"does not support here ({type(error).__name__}: {_first_line(error)})") from error
    inner = [n for n in stack if n]
    part = _describe(model, inner[-1:]) if inner else type(model).__name__
    raise ExportError(f"exporting {type(model).__name__} failed in {part}: "
                      f"{type(error).__name__}: {error}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _second_size(model: nn.Module, height: int, width: int) -> Tuple[int, int]:
    div = max(int(getattr(model, "size_divisibility", 0) or 0), 1)
    h = max(height * 3 // 4, div + 1)
    w = width + div // 2 + 3
    if div > 1:
        h += (h % div == 0)
        w += (w % div == 0)
    return h, w


def synthetic_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A (1, 3, H, W) float image with values in [0, 255] and some structure (smooth blobs plus
    noise), so that the models' argmax is not one class everywhere."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(height // 16, 2), max(width // 16, 2), generator=g)
    img = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    img = 0.8 * img + 0.2 * torch.rand(1, 3, height, width, generator=g)
    return (img * 255).float()


# --------------------------------------------------------------------------- onnxruntime
def onnxruntime_session(path: str, num_threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"onnxruntime is not installed: {DEPLOY_HELP}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnxruntime(session, image: np.ndarray) -> Dict[str, np.ndarray]:
    """The outputs (by name) of ``session`` for a (1, 3, H, W) float32 image."""
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {session.get_inputs()[0].name: np.ascontiguousarray(image, dtype=np.float32)})
    return dict(zip(names, outs))


def compare_with_onnxruntime(wrapper: SemanticSegmentationExport, session, image: torch.Tensor) -> Dict[str, Dict]:
    """``{output: {"max_abs_diff", "shape", "onnx_shape"[, "argmax_agreement"]}}`` for one image."""
    with torch.no_grad():
        ref = wrapper(image)
    got = run_onnxruntime(session, image.cpu().numpy())
    report = {}
    for name, r in zip(wrapper.output_names, ref):
        r = r.float().cpu().numpy()
        o = got.get(name)
        entry = {"shape": tuple(r.shape), "onnx_shape": None if o is None else tuple(o.shape)}
        if o is not None and o.shape == r.shape:
            entry["max_abs_diff"] = float(np.abs(r - o).max()) if r.size else 0.0
            if name == "sem_seg":
                entry["argmax_agreement"] = float((r.argmax(1) == o.argmax(1)).mean())
        report[name] = entry
    return report


def report_failures(report: Dict[str, Dict], atol: float = ATOL,
                    min_agreement: float = MIN_ARGMAX_AGREEMENT) -> List[str]:
    """The lines of a :func:`compare_with_onnxruntime` report that break the tolerances."""
    bad = []
    for name, e in report.items():
        if e["onnx_shape"] != e["shape"]:
            bad.append(f"output {name!r} has shape {e['onnx_shape']}, PyTorch gives {e['shape']}")
            continue
        if not e["max_abs_diff"] <= atol:
            bad.append(f"output {name!r} differs by up to {e['max_abs_diff']:.3g} (tolerance {atol:g})")
        if "argmax_agreement" in e and not e["argmax_agreement"] >= min_agreement:
            bad.append(f"the argmax of {name!r} agrees on {100 * e['argmax_agreement']:.2f}% of the pixels "
                       f"(at least {100 * min_agreement:g}% required)")
    return bad


class OnnxSemanticPredictor:
    """``DefaultPredictor`` for an exported model: ``predictor(bgr_image)`` returns
    ``{"sem_seg": (num_classes, H, W)[, "sgr_regions": (K, h, w)]}`` as torch tensors, for the
    original image size.

    A file exported for one size gets the image resized to that size; a ``--dynamic`` file gets
    it resized as ``DefaultPredictor`` does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``). The
    scores are resized back bilinearly; the region maps are returned as the model gives them.
    """

    def __init__(self, cfg, path: str, num_threads: Optional[int] = None):
        from detectron2.data import transforms as T

        self.session = onnxruntime_session(path, num_threads)
        shape = self.session.get_inputs()[0].shape
        self.fixed = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT is {self.input_format!r}; the ONNX predictor takes 'RGB' or 'BGR'")
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)

    def __call__(self, original_image: np.ndarray) -> Dict[str, torch.Tensor]:
        from detectron2.data import transforms as T

        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        if self.fixed is not None:
            image = T.ResizeTransform(height, width, self.fixed[0], self.fixed[1]).apply_image(original_image)
        else:
            image = self.resize.get_transform(original_image).apply_image(original_image)
        x = torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))[None]
        out = run_onnxruntime(self.session, x.numpy())
        sem = torch.from_numpy(out["sem_seg"])
        if sem.shape[-2:] != (height, width):
            sem = F.interpolate(sem, size=(height, width), mode="bilinear", align_corners=False)
        result = {"sem_seg": sem[0]}
        if "sgr_regions" in out:
            result["sgr_regions"] = torch.from_numpy(out["sgr_regions"])[0]
        return result

