"""``sgr_toy_context``: a generated toy where only global context decides the class.

The shape toy (:mod:`.toy`) is solved by local colour and shape. This one is built so that a
pixel's neighbourhood — everything a convolutional model without SGR sees — says nothing about
the class of the objects that matter; only something at the far end of the image does.

Scene (32 × 512 pixels, a horizontal strip; ``draw_context_scene``):

* ``ground`` everywhere else (one tint per image, a vertical gradient, noise);
* ``rock``: 4–8 squares anywhere along the strip (locally recognisable by their shape);
* ``flag``: a cloth (at least 20 × 12 pixels) inside the first ``FLAG_ZONE`` = 40 columns at one
  end. Its colour is the **cue**: red or blue;
* ``red_team`` / ``blue_team``: 3–5 discs (radius 7–12), all inside the columns from
  ``TEAM_START`` = 384 on (the far end). **Team discs are drawn identically whatever their class**; their class is
  ``red_team`` when the flag is red and ``blue_team`` when it is blue. All discs of an image
  share the class, so a class has several disconnected components.

The whole scene is mirrored left-right with probability 1/2 (flag on the left or the right).
Every random draw comes from one stream, ``np.random.default_rng(seed)``; the flag's colour is
not drawn from it (``draw_context_scene(seed, team)``; by default red for an even seed, blue for
an odd one). So ``team`` = red and blue give *the same scene in two worlds*: the images differ
only on the cloth's pixels, the labels only on the team discs (``red_team`` ↔ ``blue_team``).

Splits: ``sgr_toy_context_sem_seg_train`` (200 scenes, seeds 5000–5199, half of each colour)
and ``sgr_toy_context_sem_seg_val`` (40 images: scenes 6000–6019, **each in both worlds**, red
then blue), written on first use under ``$DETECTRON2_DATASETS/sgr_toy_context/`` by the shape
toy's machinery (:func:`.toy.write_generated_split`), images as lossless PNG.

What a local classifier can do (computed, not assumed). Take any classifier that sees, for a
pixel, only the window of radius r around it (the square of side 2r + 1, and where the image
border is). For a team pixel whose window does not reach the flag, the window is the same in
both worlds, and so is the classifier's answer: it is right in exactly one of them. On the
validation split, which holds both worlds of every scene, such a pixel is therefore classified
correctly exactly once in two, whatever the classifier; over the training distribution the same
holds in expectation. ``local_accuracy_ceiling(r, seeds)`` computes the resulting ceiling on
pixel accuracy (a team pixel whose window holds no pixel that differs between the two worlds
counts 1/2, every other labelled pixel 1). Every team pixel is at least ``TEAM_START`` −
``FLAG_ZONE`` + 1 = 345 columns from every flag pixel, so for every r ≤ 344 the ceiling on team
pixels is exactly 50%. For mIoU: when the rule cannot tell the two worlds apart, it calls red the
same share q of the team pixels in both, so IoU(red) + IoU(blue) ≤ max over q of
q/(1+q) + (1−q)/(2−q) = 2/3, at q = 1/2 (``team_iou_ceiling``); with the three other classes
perfect, **mIoU ≤ (3 · 100 + 2 · 33.3) / 5 = 73.3** (``local_miou_ceiling``), exactly on the
validation split (each scene in both worlds), in expectation on the training distribution.
``tools/context_toy_ceiling.py`` prints these figures.

Why the toy Dilated-FCN without SGR is such a local classifier. Its output at a pixel depends
only on input pixels at most ``dilated_fcn_reach(cfg)`` columns away: for
``configs/toy/dil_fcn_r18_context.yaml`` (the half-width dilated ResNet-18, output stride 8,
multi-grid 1-2) the res5 receptive field is 611 pixels wide (``receptive_field``: 305 on each
side), the head's 3×3 conv at stride 8 adds 8 and the ×8 bilinear upsampling 11: **324 < 345**.
At the recipe's scales — training at scale 1 (no rescaling, no crop), testing at 1 and, for
multi-scale + flip, 1.25 and 1.5 (below 324/345 ≈ 0.94 the flag would come within reach, so no
smaller scale is used) — the baseline never sees the flag from a team pixel: its ceiling is 50%
on team pixels and mIoU 73.3. (During training, BatchNorm's batch statistics mix all the pixels
of a batch, but evaluation uses the running averages.) SGR pools its tokens over the whole image
and can carry the flag's colour to the team discs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .toy import IGNORE, load_generated_split, register_generated, write_generated_split

__all__ = ["CONTEXT_CLASSES", "CONTEXT_COLORS", "CONTEXT_SPLITS", "FLAG_ZONE", "TEAM_START",
           "draw_context_scene", "scene_team", "split_scenes", "generate_context_split", "context_root", "register_toy_context",
           "local_accuracy_ceiling", "team_iou_ceiling", "local_miou_ceiling", "dilated_fcn_reach", "head_reach"]

CONTEXT_CLASSES = ["ground", "flag", "rock", "red_team", "blue_team"]
CONTEXT_COLORS = [[120, 110, 90], [250, 220, 0], [90, 80, 70], [220, 40, 40], [40, 60, 220]]
GROUND, FLAG, ROCK, RED_TEAM, BLUE_TEAM = range(5)
TEAMS = (RED_TEAM, BLUE_TEAM)
# split: (number of images, first scene seed, paired). A paired split holds each scene twice,
# red flag then blue flag (image 2i and 2i + 1 are scene seed + i in the two worlds).
CONTEXT_SPLITS = {"train": (200, 5000, False), "val": (40, 6000, True)}
HEIGHT, WIDTH = 32, 512
FLAG_ZONE = 40  # flag pixels lie in columns [0, FLAG_ZONE) (before the mirror)
TEAM_START = 384  # team pixels lie in columns [TEAM_START, WIDTH) (before the mirror)
CONTEXT_VERSION = 2
# The pixel accuracy a local classifier reaches at most on the team pixels when its window
# misses the flag (every radius <= 344): right in exactly one of the two worlds of each scene.
TEAM_LOCAL_ACCURACY_CEILING = 0.5
_FLAG_RGB = {RED_TEAM: (215, 45, 45), BLUE_TEAM: (45, 65, 215)}


def context_root() -> Path:
    return Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / "sgr_toy_context"


def scene_team(seed: int) -> int:
    """The flag of scene ``seed`` when not given: red for even seeds, blue for odd ones (so a
    split of consecutive seeds is balanced; the parity is independent of the scene's draws)."""
    return TEAMS[seed % 2]


def split_scenes(split: str):
    """[(scene seed, team)] of the images of ``split``, in file order."""
    if split not in CONTEXT_SPLITS:
        raise KeyError(f"sgr_toy_context has splits {sorted(CONTEXT_SPLITS)}, not {split!r}")
    n, seed, paired = CONTEXT_SPLITS[split]
    if paired:
        return [(seed + i // 2, TEAMS[i % 2]) for i in range(n)]
    return [(seed + i, scene_team(seed + i)) for i in range(n)]


def draw_context_scene(seed: int, team: int | None = None):
    """(rgb uint8 (32, 512, 3), labels uint8, instance ids uint8) of scene ``seed`` with a red
    (``team`` = ``RED_TEAM``) or blue (``BLUE_TEAM``) flag; the default is :func:`scene_team`.
    The flag's colour and the team discs' labels are the only things ``team`` changes."""
    if team is None:
        team = scene_team(seed)
    if team not in TEAMS:
        raise ValueError(f"team is {team!r}; expected {RED_TEAM} (red_team) or {BLUE_TEAM} (blue_team)")
    rng = np.random.default_rng(seed)
    h, w = HEIGHT, WIDTH
    yy, xx = np.mgrid[:h, :w]
    sem = np.full((h, w), GROUND, np.uint8)
    inst = np.zeros((h, w), np.uint8)
    tint = np.array([125, 112, 88], np.float32) + rng.uniform(-15, 15, 3)
    img = np.broadcast_to(tint, (h, w, 3)).copy()
    img += ((yy - h / 2) * rng.uniform(-0.4, 0.4))[..., None]
    next_id = 1
    for _ in range(int(rng.integers(4, 9))):  # rocks, anywhere
        r = int(rng.integers(3, 8))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        sq = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        img[sq] = np.array([92, 82, 72], np.float32) + rng.uniform(-12, 12, 3)
        sem[sq], inst[sq] = ROCK, next_id
        next_id += 1
    # the flag: a cloth inside the first FLAG_ZONE columns
    x0 = int(rng.integers(2, 8))
    cloth_w, cloth_h = int(rng.integers(20, FLAG_ZONE - x0 + 1)), int(rng.integers(12, 21))
    top = int(rng.integers(1, h - cloth_h))
    cloth = (xx >= x0) & (xx < x0 + cloth_w) & (yy >= top) & (yy < top + cloth_h)
    cloth_jitter = rng.uniform(-15, 15, 3)  # drawn in both worlds: only the colour differs
    img[cloth] = np.array(_FLAG_RGB[team], np.float32) + cloth_jitter
    sem[cloth], inst[cloth] = FLAG, 0
    # the team: identical discs at the far end, their class set by the flag
    for _ in range(int(rng.integers(3, 6))):
        r = int(rng.integers(7, 13))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(TEAM_START + r, w - r))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = np.array([205, 205, 200], np.float32) + rng.uniform(-15, 15, 3)
        sem[disc], inst[disc] = team, next_id
        next_id += 1
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 10, size=img.shape)
    if rng.random() < 0.5:
        img, sem, inst = img[:, ::-1], sem[:, ::-1], inst[:, ::-1]
    return (np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8)), np.ascontiguousarray(sem),
            np.ascontiguousarray(inst))


def _stamp(n, seed, paired):
    return {"version": CONTEXT_VERSION, "size": [HEIGHT, WIDTH], "count": n, "seed": seed, "paired": paired}


def generate_context_split(split: str, root: Path | None = None) -> Path:
    """Write the split's files under ``root`` (idempotent; rewritten if the recipe changed)."""
    scenes = split_scenes(split)
    root = Path(root) if root is not None else context_root()
    n, seed, paired = CONTEXT_SPLITS[split]
    return write_generated_split(root, split, n, 0, lambda i: draw_context_scene(*scenes[i]),
                                 _stamp(n, seed, paired), image_ext="png")


def _load(split: str):
    return load_generated_split(generate_context_split(split), split, image_ext="png")


def register_toy_context():
    register_generated("sgr_toy_context_sem_seg", CONTEXT_SPLITS, _load, context_root(),
                       stuff_classes=list(CONTEXT_CLASSES), stuff_colors=[list(c) for c in CONTEXT_COLORS],
                       thing_classes=["rock", "red_team", "blue_team"], local_miou_ceiling=local_miou_ceiling(),
                       context_classes=[CONTEXT_CLASSES[t] for t in TEAMS], local_context_accuracy_ceiling=100.0 * TEAM_LOCAL_ACCURACY_CEILING)


def _square_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Chebyshev distance ``radius`` of a True pixel of ``mask``."""
    from scipy.ndimage import maximum_filter

    return maximum_filter(mask.astype(np.uint8), size=2 * radius + 1, mode="constant") > 0


def local_accuracy_ceiling(radius: int, seeds) -> dict:
    """Ceiling on the expected pixel accuracy of any classifier that sees a pixel's window of
    radius ``radius``, over scenes ``seeds`` each drawn in both worlds (red and blue flag).

    A team pixel whose window holds no pixel that differs between the two worlds counts 1/2;
    every other labelled pixel counts 1 (it might be classified right in both worlds).
    Returns ``{"all": ..., "team": ...}`` (fractions over labelled pixels and over team pixels).
    """
    if radius < 0:
        raise ValueError(f"radius is {radius}; expected >= 0")
    total = team_total = 0
    credit = team_credit = 0.0
    for seed in seeds:
        (img_r, sem_r, _), (img_b, sem_b, _) = (draw_context_scene(seed, t) for t in TEAMS)
        differs = (img_r != img_b).any(axis=2)
        ambiguous = sem_r != sem_b
        blind = ambiguous & ~_square_dilate(differs, radius)
        labelled = sem_r != IGNORE
        n = 2 * int(labelled.sum())  # both worlds
        total += n
        credit += n - 2 * 0.5 * int(blind.sum())
        team_total += 2 * int(ambiguous.sum())
        team_credit += 2 * int(ambiguous.sum()) - int(blind.sum())
    return {"all": credit / total, "team": team_credit / team_total if team_total else float("nan")}


def team_iou_ceiling(steps: int = 10000):
    """(max over q of IoU(red) + IoU(blue), the q reaching it) for a rule that calls a share q of
    the team pixels red independently of their class, the two classes equally frequent:
    per unit of team pixels, TP_red = q/2, union_red = q + 1/2 − q/2; likewise blue with 1 − q."""
    q = np.linspace(0.0, 1.0, steps + 1)
    total = q / 2 / (q + 0.5 - q / 2) + (1 - q) / 2 / ((1 - q) + 0.5 - (1 - q) / 2)
    i = int(np.argmax(total))
    return float(total[i]), float(q[i])


def local_miou_ceiling() -> float:
    """mIoU ceiling (%) of a local classifier on the validation split: the other classes
    perfect, the two teams at :func:`team_iou_ceiling`. Stored in the splits' metadata as
    ``local_miou_ceiling`` (``tools/compare_sgr.py`` quotes it under its table)."""
    teams, _ = team_iou_ceiling()
    others = len(CONTEXT_CLASSES) - len(TEAMS)
    return 100.0 * (others + teams) / len(CONTEXT_CLASSES)


def _upsample_reach(stride: int) -> int:
    """How far the bilinear ×``stride`` upsampling (``align_corners=False``) reaches: output
    pixel x reads cells ⌊u⌋ and ⌊u⌋ + 1 (u = (x + 0.5)/stride − 0.5; cell i centred on input pixel
    stride·i), a cell with weight 0 not counted."""
    reach = 0
    for x in range(stride):  # the pattern repeats every `stride` pixels
        u = (x + 0.5) / stride - 0.5
        lo = int(np.floor(u))
        frac = u - lo
        used = [c for c, wgt in ((lo, 1 - frac), (lo + 1, frac)) if wgt > 0]
        reach = max(reach, max(abs(x - stride * c) for c in used))
    return reach


def head_reach(cfg):
    """``(reach, whole_image)`` of the per-pixel model of ``cfg`` (dilated ResNet, no SGR): the
    largest distance (pixels, along a row or column) between an output pixel and an input pixel
    its convolutions depend on, and whether some branch sees the whole image.

    * ``DilatedFCNHead``: res5's half receptive field, plus the head's ``NUM_CONVS`` 3×3 convs at
      the feature stride, plus the bilinear upsampling;
    * ``DeepLabV3Head``: res5's half receptive field, plus the widest atrous 3×3 branch (rate d at
      stride s reaches d·s), plus the 3×3 conv after ASPP, plus the upsampling; its image-pooling
      branch averages the whole feature map, so ``whole_image`` is True.
    """
    from ..modeling.backbone.resnet import receptive_field

    head = cfg.MODEL.SEM_SEG_HEAD
    size, stride = receptive_field(cfg)
    if head.NAME == "DilatedFCNHead":
        convs, whole = head.NUM_CONVS * stride, False
    elif head.NAME == "DeepLabV3Head":
        convs, whole = max(head.ASPP_DILATIONS) * stride + stride, True
    else:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NAME is {head.NAME!r}; the reach is computed for "
                         "'DilatedFCNHead' and 'DeepLabV3Head'")
    return (size - 1) // 2 + convs + _upsample_reach(stride), whole


def dilated_fcn_reach(cfg) -> int:
    """The reach of the Dilated-FCN model of ``cfg`` (:func:`head_reach`), which sees no further."""
    if cfg.MODEL.SEM_SEG_HEAD.NAME != "DilatedFCNHead":
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NAME is {cfg.MODEL.SEM_SEG_HEAD.NAME!r}; the reach is "
                         "computed for 'DilatedFCNHead'")
    return head_reach(cfg)[0]


register_toy_context()
