"""MaskFormer's photometric augmentation ("colour jitter following MaskFormer", SGR supplementary §1).

MaskFormer and Mask2Former train with the SSD colour distortion (``INPUT.COLOR_AUG_SSD`` there):

1. brightness: with probability 1/2, add ``δ ~ U(-32, 32)`` to every channel;
2. then, in one of two orders chosen with probability 1/2, contrast -> saturation -> hue or
   saturation -> hue -> contrast, where each step happens with probability 1/2:

   * contrast: multiply every channel by ``α ~ U(0.5, 1.5)``;
   * saturation: multiply the HSV saturation by ``α ~ U(0.5, 1.5)``;
   * hue: shift the HSV hue by ``δ``, a random integer in [-18, 18] in OpenCV's 8-bit hue units
     (2 degrees each, 180 per turn), modulo 180.

Every step works on 8-bit images and rounds towards zero after clipping to [0, 255], and the HSV
steps go through OpenCV's 8-bit colour conversion, as the original does. Written here: detectron2
ships no such augmentation (MaskFormer imports it from detectron2's PointRend project, which is
not part of the detectron2 package). Labels are never changed.
"""
from __future__ import annotations

import cv2
import numpy as np
from fvcore.transforms.transform import Transform

from detectron2.data import transforms as T

__all__ = ["PhotometricDistortion", "PhotometricDistortionTransform"]


class PhotometricDistortionTransform(Transform):
    """The distortion with its random draws fixed (``None``: the step is skipped)."""

    def __init__(self, brightness=None, contrast=None, saturation=None, hue=None, contrast_first=True,
                 image_format="RGB"):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotometricDistortion: image format {image_format!r}; expected 'RGB' or 'BGR'")
        self._set_attributes(locals())

    @staticmethod
    def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _hsv(self, img: np.ndarray, channel: int, fn) -> np.ndarray:
        to_hsv, back = ((cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB) if self.image_format == "RGB"
                        else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR))
        hsv = cv2.cvtColor(np.ascontiguousarray(img), to_hsv)
        hsv[:, :, channel] = fn(hsv[:, :, channel])
        return cv2.cvtColor(hsv, back)

    def _contrast(self, img):
        return img if self.contrast is None else self._affine(img, alpha=self.contrast)

    def _saturation_and_hue(self, img):
        if self.saturation is not None:
            img = self._hsv(img, 1, lambda s: self._affine(s, alpha=self.saturation))
        if self.hue is not None:
            img = self._hsv(img, 0, lambda h: ((h.astype(np.int64) + self.hue) % 180).astype(np.uint8))
        return img

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotometricDistortion expects an (H, W, 3) uint8 image, got {img.dtype} "
                             f"{img.shape}")
        if self.brightness is not None:
            img = self._affine(img, beta=self.brightness)
        if self.contrast_first:
            return self._saturation_and_hue(self._contrast(img))
        return self._contrast(self._saturation_and_hue(img))

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation


class PhotometricDistortion(T.Augmentation):
    """Draws a :class:`PhotometricDistortionTransform` (defaults: MaskFormer's / SSD's)."""

    def __init__(self, image_format: str = "RGB", brightness_delta: float = 32, contrast=(0.5, 1.5),
                 saturation=(0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        coin = lambda: np.random.rand() < 0.5  # noqa: E731
        brightness = np.random.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None
        contrast_first = bool(coin())
        contrast = np.random.uniform(*self.contrast) if coin() else None
        saturation = np.random.uniform(*self.saturation) if coin() else None
        hue = int(np.random.randint(-self.hue_delta, self.hue_delta + 1)) if coin() else None
        return PhotometricDistortionTransform(brightness, contrast, saturation, hue, contrast_first,
                                              self.image_format)
