"""Multi-scale + flip test-time augmentation for any model that returns ``sem_seg`` probabilities
(the semantic output only, as the official Mask2Former's; which panoptic and instance configs can
use it: :func:`sgr_d2.evaluation.check_test_time_augmentation`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """Averages the model's ``sem_seg`` probabilities over scales × {identity, horizontal flip}.

    Each input image (already at the test size) is resized by every factor in ``scales``
    (docs/method.md#training-and-evaluation-recipe: 0.5 … 1.75), optionally flipped; the model is asked for its prediction at
    the original ``height`` × ``width``; flipped predictions are flipped back; the mean of all
    of them is returned. Images are run one at a time.
    """

    def __init__(self, model: nn.Module, scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                 flip: bool = True):
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"TEST.AUG.SCALES must be positive factors, got {list(scales)}")
        self.model = model
        self.scales = list(scales)
        self.flip = flip
        # Mirror the model's mode: detectron2's inference_context restores the wrapper's mode
        # afterwards, which would otherwise switch the wrapped model to training.
        self.train(model.training)

    @classmethod
    def from_config(cls, cfg, model):
        return cls(model, cfg.TEST.AUG.SCALES, cfg.TEST.AUG.FLIP)

    @torch.no_grad()
    def __call__(self, batched_inputs):
        return [self._one(x) for x in batched_inputs]

    def _one(self, x):
        image = x["image"]
        h, w = image.shape[-2:]
        height, width = x.get("height", h), x.get("width", w)
        total, n = None, 0
        for s in self.scales:
            size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
            scaled = image if size == (h, w) else F.interpolate(
                image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
            for flip in ([False, True] if self.flip else [False]):
                inp = scaled.flip(-1) if flip else scaled
                out = self.model([{"image": inp, "height": height, "width": width}])[0]["sem_seg"]
                if flip:
                    out = out.flip(-1)
                total = out if total is None else total + out
                n += 1
        return {"sem_seg": total / n}
