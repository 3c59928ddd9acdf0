#!/usr/bin/env python
"""Write a checkpoint's weights in another file format, or for the official MaskFormer / Mask2Former code.

    # a published model as a torch file (MODEL.WEIGHTS also takes the .pkl as it is)
    python tools/convert_checkpoint.py --input model_final_500878.pkl --output m2f_r50_ade20k.pth
    # a baseline trained here (no SGR) for the official code
    python tools/convert_checkpoint.py --input output/ade20k/mask2former_r50/model_final.pth \\
        --output mask2former_r50_official.pkl --official

sgr_d2's MaskFormer, Mask2Former and Swin modules carry the official names, so no tensor is
renamed: the tool copies the model state of ``--input`` (``.pkl``: ``{"model": {name: array},
...}`` as the model zoos publish; a torch file such as ``model_final.pth``, whose optimiser and
other training state are dropped) into ``--output`` (``.pkl``: ``{"model": {name: numpy array},
"__author__": ...}``; ``.pth``: ``{"model": {name: tensor}, "__author__": ...}``), values bit for
bit. The input is read as every weights file is (``sgr_d2/files.py``): a file that needs more
than tensors and plain values is refused unless listed in ``SGR_D2_TRUSTED_WEIGHTS``; the output
is then a plain state dict that needs no trust.

``--official``: the state of a MaskFormer / Mask2Former model without SGR or GloRe (which the
official code does not have), completed with the official-only tensors it lacks:
``criterion.empty_weight`` (ones, the last entry ``--no-object-weight``, 0.1 in every official
config) and Swin's ``relative_position_index``; BatchNorm counters (``num_batches_tracked``),
which the official FrozenBN ResNets do not have, are left out. The pixel decoder's tensors are
written in the older ``MaskFormerHead`` layout (directly under ``sem_seg_head.``): the written
file is a plain name -> array dict without version metadata, which the official code reads as
that layout (it would mis-read the current one). sgr_d2 reads either layout.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sgr_d2.engine.checkpoint import read_checkpoint_file  # noqa: E402
from sgr_d2.files import atomic_torch_save, atomic_write  # noqa: E402
from sgr_d2.modeling.maskformer.head import older_head_layout  # noqa: E402

__all__ = ["read_state", "to_official", "convert_file", "main", "AUTHOR"]

AUTHOR = "sgr_d2 convert_checkpoint"
CLASS_EMBED = "sem_seg_head.predictor.class_embed.weight"


def read_state(path: str) -> Dict[str, object]:
    """The model state of a weights file (arrays and tensors as stored)."""
    model = read_checkpoint_file(path)["model"]
    if not isinstance(model, dict) or not model or not all(hasattr(v, "shape") for v in model.values()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors or arrays")
    return dict(model)


def _relative_position_index(table, key: str):
    """Swin's index into a (2w-1)^2-row bias table for a w x w window (timm's formula, the
    official code's)."""
    from timm.models.swin_transformer import get_relative_position_index

    rows = table.shape[0]
    w = (math.isqrt(rows) + 1) // 2
    if (2 * w - 1) ** 2 != rows:
        raise ValueError(f"{key} has {rows} rows; expected (2w-1)^2 for a w x w window")
    index = get_relative_position_index(w, w)
    return index if isinstance(table, torch.Tensor) else np.asarray(index.numpy())


def to_official(state: Dict[str, object], no_object_weight: float = 0.1) -> Dict[str, object]:
    """``state`` completed for the official code (see the module docstring)."""
    bad = [k for k in state if k.startswith(("backbone.sgr.", "backbone.glore.", "backbone.backbone."))]
    if bad:
        raise ValueError(f"the checkpoint has an SGR / GloRe component ({bad[0]}, ...): the official "
                         "MaskFormer / Mask2Former code has none")
    if CLASS_EMBED not in state:
        raise ValueError(f"the checkpoint has no {CLASS_EMBED}: not a MaskFormer / Mask2Former model")
    out = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    older_head_layout(out)
    if "criterion.empty_weight" not in out:
        weight = torch.ones(state[CLASS_EMBED].shape[0], dtype=torch.float32)
        weight[-1] = no_object_weight
        out["criterion.empty_weight"] = weight if isinstance(state[CLASS_EMBED], torch.Tensor) else weight.numpy()
    for key in [k for k in out if k.endswith(".attn.relative_position_bias_table")]:
        index_key = key[: -len("relative_position_bias_table")] + "relative_position_index"
        out.setdefault(index_key, _relative_position_index(out[key], key))
    return out


def _as_numpy(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _as_tensor(v):
    # np.asarray, not ascontiguousarray, which would make a 0-d array 1-d
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, order="C"))


def write_state(path: str, state: Dict[str, object]) -> None:
    if path.endswith(".pkl"):
        data = {"model": {k: _as_numpy(v) for k, v in state.items()}, "__author__": AUTHOR}
        atomic_write(path, lambda f: pickle.dump(data, f))
    else:
        atomic_torch_save({"model": {k: _as_tensor(v) for k, v in state.items()}, "__author__": AUTHOR}, path)


def convert_file(input_path: str, output_path: str, *, official: bool = False,
                 no_object_weight: float = 0.1) -> Dict[str, object]:
    if not output_path.endswith((".pkl", ".pth")):
        raise ValueError(f"--output {output_path} must end with .pkl or .pth")
    state = read_state(input_path)
    if official:
        state = to_official(state, no_object_weight)
    write_state(output_path, state)
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official model-zoo file or sgr_d2 checkpoint (.pkl / .pth)")
    parser.add_argument("--output", required=True, help="file to write (.pkl or .pth)")
    parser.add_argument("--official", action="store_true",
                        help="for the official code: add the official-only tensors a model trained here lacks")
    parser.add_argument("--no-object-weight", type=float, default=0.1,
                        help="criterion.empty_weight's last entry when it is added (official configs: 0.1)")
    args = parser.parse_args(argv)
    try:
        state = convert_file(args.input, args.output, official=args.official, no_object_weight=args.no_object_weight)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
