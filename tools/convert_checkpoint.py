#!/usr/bin/env python
"""Convert a MaskFormer / Mask2Former checkpoint between the official layout and sgr_d2's.

    # a published model -> sgr_d2's names (MODEL.WEIGHTS also takes the official file as it is)
    python tools/convert_checkpoint.py --input model_final_500878.pkl --output m2f_r50_ade20k.pth
    # a baseline trained here (no SGR) -> the official layout, for the official code
    python tools/convert_checkpoint.py --input output/ade20k/mask2former_r50/model_final.pth \\
        --output mask2former_r50_official.pkl

The direction is read from the names (``--to`` forces it): a file with official names
(``sem_seg_head.predictor.transformer_self_attention_layers.*``, ``backbone.layers.*`` of the
official Swin, ...) becomes sgr_d2's, any other file becomes official. The renaming rules are
those of ``MODEL.WEIGHTS`` loading, in one place: ``sgr_d2/engine/official_layout.py``.

Inputs: ``.pkl`` (a pickle ``{"model": {name: array}, ...}``, as the model zoos publish) or a
torch file (``{"model": {name: tensor}, ...}``, e.g. ``model_final.pth``; the optimiser and other
training state are dropped). Outputs: ``.pkl`` (``{"model": {name: numpy array}, "__author__":
...}``) or ``.pth`` (``{"model": {name: tensor}, "__author__": ...}``). Values are copied bit for
bit: official -> sgr_d2 -> official returns the original tensors. The official-only tensors
(``criterion.empty_weight``, Swin's ``relative_position_index``, ``num_batches_tracked``) are
kept aside in the sgr_d2 file under ``"official_only"`` and put back on the way out; a model
trained here gets them recomputed (``--no-object-weight``, 0.1 in every official config).
A model with SGR has no official counterpart and is refused.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Dict, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sgr_d2.engine.checkpoint import atomic_torch_save  # noqa: E402
from sgr_d2.engine.official_layout import official_to_sgr, recognise, sgr_to_official  # noqa: E402

__all__ = ["read_checkpoint", "convert", "convert_file", "main", "AUTHOR"]

AUTHOR = "sgr_d2 convert_checkpoint"


def read_checkpoint(path: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    """``(model state, official_only)`` of a ``.pkl`` or torch checkpoint (arrays and tensors as stored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input file {path} does not exist")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            try:
                data = pickle.load(f, encoding="latin1")
            except Exception as e:
                raise ValueError(f"cannot read {path} as a pickle: {type(e).__name__}: {e}") from e
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            data = torch.load(path, map_location="cpu", weights_only=False)  # a training checkpoint
        except Exception as e:
            raise ValueError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}; expected a dict with a 'model' state dict")
    model = data.get("model", data)
    if not isinstance(model, dict) or not model or not all(hasattr(v, "shape") for v in model.values()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors or arrays")
    return dict(model), dict(data.get("official_only", {}) or {})


def convert(model: Dict[str, object], official_only: Dict[str, object], to: Optional[str] = None, *,
            no_object_weight: float = 0.1) -> Tuple[str, Dict[str, object], Dict[str, object]]:
    """``(direction, converted state, official_only to store)``; ``to`` None: from the names."""
    if to is None:
        to = "sgr_d2" if recognise(model.keys()) is not None else "official"
    if to == "sgr_d2":
        renamed, aside, recognised, _ = official_to_sgr(model)
        if recognised is None:
            raise ValueError("--to sgr_d2: the file has no official MaskFormer / Mask2Former / Swin names")
        aside.update({k: v for k, v in official_only.items() if k not in aside})
        return to, renamed, aside
    if to == "official":
        if recognise(model.keys()) is not None:
            raise ValueError("--to official: the file already has official names")
        return to, sgr_to_official(model, no_object_weight=no_object_weight, set_aside=official_only or None), {}
    raise ValueError(f"--to is {to!r}; expected 'sgr_d2' or 'official'")


def _as_numpy(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _as_tensor(v):
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, order="C"))  # ascontiguousarray would make a 0-d array 1-d


def write_checkpoint(path: str, model: Dict[str, object], official_only: Dict[str, object]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.endswith(".pkl"):
        data = {"model": {k: _as_numpy(v) for k, v in model.items()}, "__author__": AUTHOR}
        if official_only:
            data["official_only"] = {k: _as_numpy(v) for k, v in official_only.items()}
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)
    else:
        data = {"model": {k: _as_tensor(v) for k, v in model.items()}, "__author__": AUTHOR}
        if official_only:
            data["official_only"] = {k: _as_tensor(v) for k, v in official_only.items()}
        atomic_torch_save(data, path)


def convert_file(input_path: str, output_path: str, to: Optional[str] = None, *,
                 no_object_weight: float = 0.1) -> Tuple[str, Dict[str, object]]:
    if not output_path.endswith((".pkl", ".pth")):
        raise ValueError(f"--output {output_path} must end with .pkl or .pth")
    model, official_only = read_checkpoint(input_path)
    direction, converted, aside = convert(model, official_only, to, no_object_weight=no_object_weight)
    write_checkpoint(output_path, converted, aside)
    return direction, converted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official model-zoo file or sgr_d2 checkpoint (.pkl / .pth)")
    parser.add_argument("--output", required=True, help="file to write (.pkl or .pth)")
    parser.add_argument("--to", choices=("sgr_d2", "official"), default=None,
                        help="default: official names -> sgr_d2, anything else -> official")
    parser.add_argument("--no-object-weight", type=float, default=0.1,
                        help="criterion.empty_weight's last entry when it is recomputed (official configs: 0.1)")
    args = parser.parse_args(argv)
    try:
        direction, converted = convert_file(args.input, args.output, args.to,
                                            no_object_weight=args.no_object_weight)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {len(converted)} tensors in the {direction} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
