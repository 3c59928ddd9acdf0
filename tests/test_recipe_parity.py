"""Recipe parity with MaskFormer / Mask2Former where the paper points at them (docs/method.md):
MaskFormer's photometric distortion, the training-image padding value, and the weight decay of
the pixel decoder's level embedding."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from conftest import REPO, tiny_toy_cfg

from detectron2.modeling import build_model

from sgr_d2.data import SemSegDatasetMapper, build_train_augmentations
from sgr_d2.data.augmentation import PhotometricDistortion, PhotometricDistortionTransform
from sgr_d2.engine import param_groups
from sgr_d2.config import load_config

CONFIGS = os.path.join(REPO, "configs")


def _img(*pixels):
    return np.array([pixels], dtype=np.uint8)  # (1, N, 3)


def test_brightness_and_contrast_clip_and_truncate_like_the_original():
    img = _img((250, 5, 100), (0, 128, 3))
    out = PhotometricDistortionTransform(brightness=10.7).apply_image(img)
    assert out.tolist() == [[[255, 15, 110], [10, 138, 13]]]  # x + 10.7, clipped, rounded down
    out = PhotometricDistortionTransform(contrast=1.5).apply_image(img)
    assert out.tolist() == [[[255, 7, 150], [0, 192, 4]]]  # 1.5 x: 7.5 -> 7, 4.5 -> 4
    assert out.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_saturation_and_hue_act_in_hsv(fmt):
    flip = (lambda p: p) if fmt == "RGB" else (lambda p: p[::-1])
    grey = PhotometricDistortionTransform(saturation=0.0, image_format=fmt).apply_image(
        _img(flip((200, 50, 10)), flip((30, 90, 60))))
    assert grey.tolist() == [[[200] * 3, [90] * 3]]  # no saturation: every channel at the value, max(R, G, B)
    # +60 in OpenCV's hue units is +120 degrees: red -> green -> blue -> red
    turned = PhotometricDistortionTransform(hue=60, image_format=fmt).apply_image(
        _img(flip((255, 0, 0)), flip((0, 255, 0)), flip((0, 0, 255))))
    assert turned.tolist() == [[list(flip((0, 255, 0))), list(flip((0, 0, 255))), list(flip((255, 0, 0)))]]
    back = PhotometricDistortionTransform(hue=-60, image_format=fmt).apply_image(_img(flip((0, 255, 0))))
    assert back.tolist() == [[list(flip((255, 0, 0)))]]


def test_contrast_first_or_last_changes_the_result():
    # (200, 100, 100): saturation x2 first makes it (200, ~1, ~1), then contrast x1.5 (255, ~1, ~1);
    # contrast first gives (255, 150, 150), whose saturation x2 is 210/255: (255, ~45, ~45)
    img = _img((200, 100, 100))
    first = PhotometricDistortionTransform(contrast=1.5, saturation=2.0, contrast_first=True).apply_image(img)
    last = PhotometricDistortionTransform(contrast=1.5, saturation=2.0, contrast_first=False).apply_image(img)
    assert first[0, 0, 0] == 255 and abs(int(first[0, 0, 1]) - 45) <= 2 and first[0, 0, 1] == first[0, 0, 2]
    assert last[0, 0, 0] == 255 and last[0, 0, 1] <= 2


def test_each_step_is_drawn_half_of_the_time_within_the_original_ranges():
    aug = PhotometricDistortion("RGB")
    np.random.seed(0)
    draws = [aug.get_transform(None) for _ in range(4000)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        taken = [getattr(t, name) for t in draws if getattr(t, name) is not None]
        assert 0.45 < len(taken) / len(draws) < 0.55, name
    assert 0.45 < np.mean([t.contrast_first for t in draws]) < 0.55
    b = [t.brightness for t in draws if t.brightness is not None]
    assert -32 <= min(b) < -30 and 30 < max(b) <= 32
    for name in ("contrast", "saturation"):
        v = [getattr(t, name) for t in draws if getattr(t, name) is not None]
        assert 0.5 <= min(v) < 0.52 and 1.48 < max(v) <= 1.5
    hues = {t.hue for t in draws if t.hue is not None}
    assert hues == set(range(-18, 19))  # integers, both ends included
    sem = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert draws[0].apply_segmentation(sem) is sem


def test_training_augmentations_use_maskformers_colour_jitter():
    cfg = tiny_toy_cfg()
    assert any(isinstance(a, PhotometricDistortion) for a in build_train_augmentations(cfg))
    cfg.INPUT.COLOR_AUG = False
    assert not any(isinstance(a, PhotometricDistortion) for a in build_train_augmentations(cfg))


def test_maskformer_configs_pad_training_images_with_128():
    heads = sorted(p for d in ("ade20k", "cityscapes", "coco_stuff_10k")
                   for p in glob.glob(os.path.join(CONFIGS, d, "mask*former_*.yaml")))
    assert len(heads) == 3 * 12  # 3 datasets x {MaskFormer, Mask2Former} x {R-50, R-101, Swin-T} x {-, SGR}
    for path in heads:
        assert load_config(path).INPUT.IMAGE_PAD_VALUE == 128, path
    for rel in ("ade20k/dil_fcn_r50.yaml", "cityscapes/upernet_swin_t_sgr.yaml", "toy/maskformer_r18.yaml"):
        assert load_config(os.path.join(CONFIGS, rel)).INPUT.IMAGE_PAD_VALUE == 0, rel
    mapper = SemSegDatasetMapper(True, augmentations=[], image_format="RGB", ignore_label=255, num_classes=3,
                                 pad_size=(4, 5), components=False, image_pad_value=128)
    image, sem = mapper._pad(np.full((2, 3, 3), 7, dtype=np.uint8), np.ones((2, 3), dtype=np.uint8))
    assert image.shape == (4, 5, 3) and (image[:2, :3] == 7).all()
    assert (image[2:] == 128).all() and (image[:, 3:] == 128).all()
    assert (sem[:2, :3] == 1).all() and (sem[2:] == 255).all() and (sem[:, 3:] == 255).all()
    with pytest.raises(ValueError, match="INPUT.IMAGE_PAD_VALUE is 300"):
        SemSegDatasetMapper(True, augmentations=[], image_format="RGB", ignore_label=255, num_classes=3,
                            pad_size=None, image_pad_value=300)


def test_every_dataset_config_trains_with_the_colour_jitter():
    """The paper's "random color jitter following [MaskFormer]": INPUT.COLOR_AUG is on in every
    semantic config of the three datasets (a False in one Base-*.yaml would switch it off for
    all of that dataset's configs)."""
    paths = sorted(p for d in ("ade20k", "cityscapes", "coco_stuff_10k")
                   for p in glob.glob(os.path.join(CONFIGS, d, "*.yaml")) if "Base-" not in os.path.basename(p))
    assert len(paths) >= 3 * 24  # 24 configs per dataset (ADE20K also has a fine-tuning recipe)
    off = [p for p in paths if load_config(p).INPUT.COLOR_AUG is not True]
    assert off == []


def test_pixel_decoder_level_embedding_decays_as_in_mask2former():
    cfg = tiny_toy_cfg(os.path.join(CONFIGS, "toy", "mask2former_r18.yaml"), "SOLVER.WEIGHT_DECAY", "0.05")
    groups = {g["name"]: g for g in param_groups(cfg, build_model(cfg))}
    # an nn.Parameter of the deformable encoder: Mask2Former's optimiser gives it the weight decay
    assert groups["sem_seg_head.pixel_decoder.transformer.level_embed"]["weight_decay"] == 0.05
    # nn.Embedding weights (WEIGHT_DECAY_EMBED 0.0 in Mask2Former)
    for name in ("level_embed", "query_feat", "query_embed"):
        assert groups[f"sem_seg_head.predictor.{name}.weight"]["weight_decay"] == 0.0, name
    assert groups["sem_seg_head.predictor.class_embed.weight"]["weight_decay"] == 0.05
