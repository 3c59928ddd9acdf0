"""Your own data, no code (docs/own_data.md): a folder of images and masks registered by
DATASETS.FOLDER.ROOT, its checks (every problem in one error naming the files, before the first
iteration, OUTPUT_DIR untouched), the palette form, the scan's cache, and fine-tuning a model of
other classes on it."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import REPO, TOY_SGR, child_env, folder_bytes, log_records, run_all
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from sgr_d2.config import load_config, setup_cfg
from sgr_d2.data.datasets import folder, folder_coco
from sgr_d2.data.labels import read_id_map
from sgr_d2.data.datasets.folder import FolderDatasetError
from sgr_d2.engine.trainer import Trainer, argument_parser, run

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDER_R18 = os.path.join(REPO, "configs", "folder", "dil_fcn_r18_sgr.yaml")
CLASSES = (("sky", (135, 206, 235)), ("road", (90, 90, 90)), ("parked car", (220, 40, 40)))
IGNORE_COLOR = (255, 255, 255)
# CPU-sized runs: one process, 64 px inputs
FAST = ("MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64")


def labels_of(i: int, size: int = 64) -> np.ndarray:
    """Sky above a horizon that moves with ``i``, road below, a car box, a 2-pixel ignore strip."""
    sem = np.zeros((size, size), np.uint8)
    sem[size // 3 + i % 5:] = 1
    y, x = size // 2 + i % 3, 6 + 5 * (i % 4)
    sem[y:y + 12, x:x + 20] = 2
    sem[:, -2:] = 255
    return sem


def make_folder(root: Path, *, colors: bool = False, counts=(4, 2)) -> Path:
    """A 3-class folder dataset: 64x64 JPEG images, masks of class ids (or of the palette's
    colours, the ignore label painted white)."""
    root.mkdir(parents=True, exist_ok=True)
    # (a blank line, skipped: class k is the k-th non-empty line)
    (root / "classes.txt").write_text("\n".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in CLASSES))
    palette = np.array([c for _, c in CLASSES] + [IGNORE_COLOR] * 253, np.uint8)
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), counts):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sem = labels_of(i + 10 * (split == "val"))
            image = np.clip(palette[sem].astype(int) + rng.integers(-20, 20, (*sem.shape, 3)), 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(root / "images" / split / f"{i:03d}.jpg")
            mask = palette[sem] if colors else sem
            Image.fromarray(mask).save(root / "masks" / split / f"{i:03d}.png")
    return root


def _args(root, out, *opts, config=FOLDER_R18):
    return argument_parser().parse_args(["--config-file", config, "DATASETS.FOLDER.ROOT", str(root),
                                         "OUTPUT_DIR", str(out), *FAST, *opts])


def _refused(tmp_path, root, *opts, error=FolderDatasetError, config=FOLDER_R18) -> str:
    """``train_net.py``'s body on ``root``: refused, OUTPUT_DIR as the earlier run left it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"an earlier run's weights")
    with pytest.raises(error) as e:
        run(_args(root, out, *opts, config=config))
    assert folder_bytes(out) == {"model_final.pth": b"an earlier run's weights"}
    return str(e.value)


# ----------------------------------------------------------------------------- one command
@pytest.mark.slow
def test_the_command_trains_and_evaluates_a_folder_and_refuses_a_broken_one_untouched(tmp_path):
    """The documented command (with CPU-sized inputs) trains 20 iterations and evaluates on the
    val split, the IoUs named by classes.txt; a folder with six problems is refused by
    train_net.py in ONE error that lists each (with its file), and its OUTPUT_DIR keeps exactly
    the earlier run's file. Beside them, the R-18 panoptic folder config trains 6 iterations on
    a COCO-panoptic folder and reports PQ, mask AP and mIoU (under the categories' names)."""
    good = make_folder(tmp_path / "good")
    bad = make_folder(tmp_path / "bad", counts=(5, 1))
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(bad / "masks" / "train" / "001.png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(bad / "masks" / "train" / "002.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bad / "masks" / "train" / "003.png")
    (bad / "masks" / "train" / "004.png").rename(bad / "masks" / "train" / "lone.png")
    shutil.rmtree(bad / "images" / "val")
    shutil.rmtree(bad / "masks" / "val")
    refused_out = tmp_path / "refused"
    refused_out.mkdir()
    (refused_out / "log.txt").write_text("an earlier run's log\n")
    coco = tmp_path / "coco"
    make_coco_folder(coco, counts=(4, 2))
    command = ["train_net.py", "--config-file", "configs/folder/dil_fcn_r18_sgr.yaml", "DATASETS.FOLDER.ROOT"]
    (code, output), (refused, message), (pan_code, pan_output) = run_all([
        [*command, str(good), "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(tmp_path / "run"), *FAST],
        [*command, str(bad), "SOLVER.MAX_ITER", "20", "OUTPUT_DIR", str(refused_out), *FAST],
        ["train_net.py", "--config-file", "configs/folder/mask2former_r18_panoptic_sgr.yaml", "DATASETS.FOLDER.ROOT",
         str(coco), "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(tmp_path / "panoptic"), *FAST],
    ], env=child_env())
    assert code == 0, output[-3000:]
    results = re.findall(r"Evaluation results for folder_sem_seg_val", output)
    assert len(results) == 1 and "copypaste: mIoU" in output
    for name, _ in CLASSES:
        assert f"'IoU-{name}'" in output
    assert (tmp_path / "run" / "model_final.pth").is_file()
    assert "NUM_CLASSES: 3\n" in (tmp_path / "run" / "config.yaml").read_text()  # resolved from classes.txt

    assert refused != 0
    assert f"the folder dataset {bad} (DATASETS.FOLDER.ROOT) has 6 problems:" in message, message[-3000:]
    for problem in [
        "masks/train/001.png holds values [7]: expected class ids 0..2 (the 3 classes of classes.txt) or the "
        "ignore label 255",
        "masks/train/002.png is 64x48 (WxH) but its image images/train/002.jpg is 64x64",
        "1 mask with several channels (masks/train/003.png), but DATASETS.FOLDER.MASK_FORMAT is 'ids'",
        "1 image of images/train/ without a mask masks/train/<stem>.png: 004",
        "1 mask of masks/train/ without an image images/train/<stem>.jpg/.png: lone",
        "the val split is empty: images/val/ does not exist",
    ]:
        assert message.count(problem) == 1, (problem, message[-3000:])
    assert folder_bytes(refused_out) == {"log.txt": b"an earlier run's log\n"}

    assert pan_code == 0, pan_output[-3000:]
    assert pan_output.count("Evaluation results for folder_panoptic_val_with_sem_seg in csv format") == 1
    for task, keys in (("panoptic_seg", "PQ,SQ,RQ,PQ_th,SQ_th,RQ_th,PQ_st,SQ_st,RQ_st"), ("segm", "AP,AP50,AP75"),
                       ("sem_seg", "mIoU,fwIoU")):
        assert re.search(rf"copypaste: Task: {task}\n.*copypaste: {keys}", pan_output), (task, pan_output[-3000:])
    assert all(f"'IoU-{name}'" in pan_output for name in PAN_NAMES)
    assert "NUM_CLASSES: 6\n" in (tmp_path / "panoptic" / "config.yaml").read_text()


# ----------------------------------------------------------------------------- each problem
def _break_values(root):
    Image.fromarray(np.where(labels_of(1) == 2, 9, labels_of(1)).astype(np.uint8)).save(root / "masks/train/001.png")
    sem = labels_of(0)
    sem[0, :3] = 7
    Image.fromarray(sem).save(root / "masks/val/000.png")
    return ["masks/train/001.png holds values [9]: expected class ids 0..2 (the 3 classes of classes.txt) or the "
            "ignore label 255 (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)", "masks/val/000.png holds values [7]"]


def _break_pairs(root):
    for stem in ("a", "b", "c", "d", "e", "f"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / f"images/train/{stem}.png")
    (root / "images/val/001.jpg").rename(root / "images/val/x.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images/val/000.png")
    return ["images/val/ has several images with the same stem, which one mask cannot label: 000 (000.jpg, 000.png)","6 images of images/train/ without a mask masks/train/<stem>.png: a, b, c, d, e, ... and 1 more",
            "1 image of images/val/ without a mask masks/val/<stem>.png: x",
            "1 mask of masks/val/ without an image images/val/<stem>.jpg/.png: 001"]


def _break_sizes(root):
    Image.fromarray(labels_of(2)[:, :40]).save(root / "masks/train/002.png")
    return ["masks/train/002.png is 40x64 (WxH) but its image images/train/002.jpg is 64x64"]


def _break_split(root):
    for p in (root / "images/val").iterdir():
        p.unlink()
    return ["the val split is empty: images/val/ holds no .jpg, .jpeg or .png image",
            "2 masks of masks/val/ without an image images/val/<stem>.jpg/.png: 000, 001"]


def _break_unreadable(root):
    (root / "images/train/003.jpg").write_bytes(b"not a JPEG")
    return ["images/train/003.jpg cannot be read (UnidentifiedImageError"]


@pytest.mark.parametrize("broken", [_break_values, _break_pairs, _break_sizes, _break_split, _break_unreadable],
                         ids=["mask_values", "unpaired", "sizes", "empty_split", "unreadable"])
def test_each_problem_of_a_folder_is_named_before_training(tmp_path, broken):
    """train_net.py's body refuses the folder before the first iteration with every problem of
    that kind, each naming its files (at most five listed, and how many more), and writes
    nothing into OUTPUT_DIR."""
    root = make_folder(tmp_path / "data")
    expected = broken(root)
    message = _refused(tmp_path, root)
    for text in expected:
        assert text in message, (text, message)
    assert f"has {len(expected)} problem" in message


def test_a_colour_outside_the_palette_is_named_with_its_count(tmp_path):
    root = make_folder(tmp_path / "data", colors=True)
    mask = np.array(Image.open(root / "masks/val/001.png"))
    mask[:4, :10] = (12, 34, 56)  # 40 pixels
    mask[10, :3] = (1, 2, 3)
    Image.fromarray(mask).save(root / "masks/val/001.png")
    message = _refused(tmp_path, root, "DATASETS.FOLDER.MASK_FORMAT", "colors", "DATASETS.FOLDER.IGNORE_COLORS",
                       "[[255, 255, 255]]")
    assert ("masks/val/001.png holds colours (12, 34, 56) in 40 pixels, (1, 2, 3) in 3 pixels, not in the "
            "palette of classes.txt") in message and "has 1 problem:" in message
    # without IGNORE_COLORS, white is a colour outside the palette in every mask
    load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(root), "DATASETS.FOLDER.MASK_FORMAT", "colors"])
    with pytest.raises(FolderDatasetError, match=r"masks/train/000.png holds colour \(255, 255, 255\) in 128 pixels"):
        DatasetCatalog.get("folder_sem_seg_train")


@pytest.mark.parametrize("classes, opts, expected", [
    (None, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"],
     r"MODEL.SEM_SEG_HEAD.NUM_CLASSES is 5 but .*classes.txt names 3 classes"),
    ("sky 1 2 3\nroad\nsky 4 5 6\n", [],
     r"(?s)has 2 problems.*line 3: class 'sky' is already class 0.*a colour to 2 of 3 classes \(none on line 2\)"),
    ("sky 1 2 3\nroad 1 2 3\ncar 0 0 300\n", [],
     r"(?s)line 3: colour \[0, 0, 300\] is not `r g b` in 0..255.*line 2: colour \[1, 2, 3\] is also class 0's"),
    ("sky\nroad\ncar\n", ["DATASETS.FOLDER.MASK_FORMAT", "colors"], r"'colors' but classes.txt gives no colours"),
    (None, ["DATASETS.FOLDER.MASK_FORMAT", "rgb"], r"DATASETS.FOLDER.MASK_FORMAT is 'rgb'; expected 'ids'"),
    (None, ["MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "2"], r"class 2 would be the ignore label"),
    ("", [], r"classes.txt names no class"),
], ids=["num_classes", "names_and_partial_palette", "palette", "no_palette", "mask_format", "ignore", "empty"])
def test_classes_txt_and_the_keys_are_checked_when_the_config_loads(tmp_path, classes, opts, expected):
    root = make_folder(tmp_path / "data", counts=(1, 1))
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    with pytest.raises(ValueError, match=expected):
        load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(root), *opts])


def test_a_folder_config_without_a_root_names_the_key():
    with pytest.raises(ValueError, match=r"trains or tests on \['folder_sem_seg_train', 'folder_sem_seg_val'\] "
                                         r"but DATASETS.FOLDER.ROOT is empty"):
        load_config(FOLDER_R18)


# ----------------------------------------------------------------------------- registration, palette, cache
def test_the_palette_form_gives_the_same_labels_and_the_metadata(tmp_path):
    """The same data as class ids and as palette colours (white: IGNORE_COLORS) gives the same
    label maps to train and evaluate on, and classes.txt's names and colours as metadata."""
    ids_root, colors_root = make_folder(tmp_path / "ids"), make_folder(tmp_path / "colors", colors=True)
    cfg = load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(ids_root)])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    expected = {split: [np.array(Image.open(d["sem_seg_file_name"])) for d in DatasetCatalog.get(name)]
                for split, name in folder.FOLDER_DATASETS.items()}
    assert [len(v) for v in expected.values()] == [4, 2]
    assert np.array_equal(expected["val"][1], labels_of(11))
    # a palette-mode PNG of ids: its pixel values (what the scan checks and training reads) are the indices
    indexed = Image.frombytes("P", (64, 64), labels_of(10).tobytes())
    indexed.putpalette([v for _, c in CLASSES for v in c] + [255] * 3 * 253)
    indexed.save(ids_root / "masks/val/000.png")
    path = DatasetCatalog.get("folder_sem_seg_val")[0]["sem_seg_file_name"]
    assert Image.open(path).mode == "P" and np.array_equal(read_id_map(path), labels_of(10))
    load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(colors_root), "DATASETS.FOLDER.MASK_FORMAT", "colors",
                             "DATASETS.FOLDER.IGNORE_COLORS", "[[255, 255, 255]]"])
    for split, name in folder.FOLDER_DATASETS.items():
        dicts = DatasetCatalog.get(name)
        assert [Path(d["file_name"]).name for d in dicts] == [f"{i:03d}.jpg" for i in range(len(expected[split]))]
        for d, labels in zip(dicts, expected[split]):
            assert d["sem_seg_file_name"].startswith(str(colors_root / ".sgr_d2_cache" / "masks" / split))
            converted = np.array(Image.open(d["sem_seg_file_name"]))
            assert converted.dtype == np.uint8 and np.array_equal(converted, labels)
        meta = MetadataCatalog.get(name)
        assert meta.stuff_classes == ["sky", "road", "parked car"]
        assert meta.stuff_colors == [list(c) for _, c in CLASSES]
        assert (meta.ignore_label, meta.evaluator_type) == (255, "sem_seg")


def test_the_scan_is_cached_and_follows_a_changed_mask_and_classes_txt(tmp_path, monkeypatch):
    """Each file is read once; a later load reads only a mask that changed (size or time) and,
    after classes.txt changed, the colour masks again (not the images), whose conversion
    follows the new palette."""
    root = make_folder(tmp_path / "data", colors=True)
    reads = []
    scan_image, scan_mask = folder._Scanner.image, folder._Scanner.mask
    monkeypatch.setattr(folder._Scanner, "image", lambda self, p: reads.append(p) or scan_image(self, p))
    monkeypatch.setattr(folder._Scanner, "mask", lambda self, p, c: reads.append(p) or scan_mask(self, p, c))

    def load():
        reads.clear()
        load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(root), "DATASETS.FOLDER.MASK_FORMAT", "colors",
                                 "DATASETS.FOLDER.IGNORE_COLORS", "[[255, 255, 255]]"])
        return {Path(d["file_name"]).stem: np.array(Image.open(d["sem_seg_file_name"]))
                for d in DatasetCatalog.get("folder_sem_seg_train")}

    first = load()
    assert len(reads) == 12  # 6 images, 6 masks
    load()
    assert reads == []
    # two processes (workers) at once: the second waits for the first's scan, then reads nothing
    (root / ".sgr_d2_cache" / "scan-colors.json").unlink()
    reads.clear()
    second_listed = threading.Event()
    listing = folder._listing
    monkeypatch.setattr(folder, "_listing", lambda r, split: (
        threading.current_thread().name == "second" and second_listed.set()) or listing(r, split))
    monkeypatch.setattr(folder._Scanner, "image", lambda self, p: (
        second_listed.wait(30), reads.append(p), scan_image(self, p))[-1])
    workers = [threading.Thread(target=DatasetCatalog.get, args=("folder_sem_seg_train",), name=name)
               for name in ("first", "second")]
    workers[0].start()
    workers[1].start()
    for w in workers:
        w.join()
    assert len(reads) == 12
    mask = root / "masks/train/002.png"
    Image.fromarray(np.array(Image.open(root / "masks/train/003.png"))).save(mask)
    os.utime(mask, ns=(1, 1))
    changed = load()
    assert reads == [str(mask)] and np.array_equal(changed["002"], first["003"])
    # road and car swap colours: the converted masks swap classes 1 and 2
    (root / "classes.txt").write_text("sky 135 206 235\nroad 220 40 40\ncar 90 90 90\n")
    swapped = load()
    assert sorted(reads) == sorted(str(p) for p in (root / "masks").rglob("*.png"))
    swap = np.array([0, 2, 1] + list(range(3, 256)), np.uint8)
    assert all(np.array_equal(swapped[stem], swap[changed[stem]]) for stem in changed)


def test_the_ignore_label_of_the_masks_is_the_heads_ignore_value(tmp_path):
    """MODEL.SEM_SEG_HEAD.IGNORE_VALUE is the masks' ignore label: with 254, the 255 of the
    masks is an error and 254 the datasets' ignore_label."""
    root = make_folder(tmp_path / "data", counts=(1, 1))
    load_config(FOLDER_R18, ["DATASETS.FOLDER.ROOT", str(root), "MODEL.SEM_SEG_HEAD.IGNORE_VALUE", "254"])
    assert MetadataCatalog.get("folder_sem_seg_val").ignore_label == 254
    with pytest.raises(FolderDatasetError, match=r"masks/train/000.png holds values \[255\]: expected class ids "
                                                 r"0..2 \(the 3 classes of classes.txt\) or the ignore label 254"):
        DatasetCatalog.get("folder_sem_seg_val")


# ----------------------------------------------------------------------------- fine-tuning
def test_fine_tuning_a_model_of_other_classes_names_the_fresh_layers(tmp_path):
    """A 6-class toy model's checkpoint as MODEL.WEIGHTS of the 3-class folder config, with
    MODEL.WEIGHTS_NEW_CLASSES: the log names the class layers that start fresh, every other
    tensor is the checkpoint's bit for bit, and two iterations train on the folder."""
    toy = load_config(TOY_SGR, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    saved = build_model(toy).state_dict()
    weights = tmp_path / "toy_6_classes.pth"
    torch.save({"model": saved}, weights)
    root = make_folder(tmp_path / "data")
    cfg = setup_cfg(_args(root, tmp_path / "out", "MODEL.WEIGHTS", str(weights), "MODEL.WEIGHTS_NEW_CLASSES", "True",
                          "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"))
    torch.manual_seed(1)
    trainer = Trainer(cfg)
    with log_records("fvcore.common.checkpoint") as log:
        trainer.resume_or_load(resume=False)
    fresh = ("sem_seg_head.predictor.", "backbone.sgr.classifier.")
    assert f"{weights}: MODEL.WEIGHTS_NEW_CLASSES: the class-specific layers start from their initialisation: " \
           "backbone.sgr.classifier (2 tensors), sem_seg_head.predictor (2 tensors)" in log, log
    state = trainer.model.state_dict()
    assert state["sem_seg_head.predictor.weight"].shape[0] == 3 and saved["sem_seg_head.predictor.weight"].shape[0] == 6
    others = [k for k in saved if not k.startswith(fresh) and k not in ("pixel_mean", "pixel_std")]
    assert all(torch.equal(state[k], saved[k]) for k in others)
    counted = [k for k in others if not k.endswith("num_batches_tracked")]  # (not weights: not counted)
    assert f"{weights}: full model checkpoint; {len(counted)} of the model's {len(counted) + 4} tensors loaded" in log
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    assert [it for _, it in losses] == [0, 1] and all(np.isfinite(v) for v, _ in losses)


# ----------------------------------------------------------------------------- COCO-format instance and panoptic data
FOLDER_PAN_R18 = os.path.join(REPO, "configs", "folder", "mask2former_r18_panoptic_sgr.yaml")
FOLDER_INST_R50 = os.path.join(REPO, "configs", "folder", "mask2former_r50_instance.yaml")
# the panoptic toy's categories under other ids: sorted by id, stuff and things would interleave
COCO_IDS = {"ball": 5, "box": 9, "kite": 20, "sky": 1, "grass": 8, "wall": 12}
THINGS = (5, 9, 20)
CONTIGUOUS = {5: 0, 9: 1, 20: 2, 1: 3, 8: 4, 12: 5}  # the things by id, then the stuff by id
PAN_NAMES = ["ball", "box", "kite", "sky", "grass", "wall"]
# an instance R-18 run: the panoptic R-18 folder config on the instance datasets
INSTANCE_R18 = ("DATASETS.TRAIN", "('folder_instance_train',)", "DATASETS.TEST", "('folder_instance_val',)",
                "INPUT.DATASET_MAPPER_NAME", "mask_former_instance")


def make_coco_folder(root: Path, counts=(3, 2)) -> dict:
    """The panoptic toy's 128x128 scenes in both COCO formats: images/<split>/NNN.jpg,
    panoptic/<split>/NNN.png with annotations/panoptic_<split>.json, and the things as RLE
    instances in annotations/instances_<split>.json (categories listed neither by id nor things
    first). The first thing of val image 0 is a crowd segment. Returns split -> [(image id,
    segment ids (H, W), segments_info)]."""
    from sgr_d2.data.toy_instances import coco_mask_annotation
    from sgr_d2.data.toy_panoptic import PANOPTIC_CATEGORIES, draw_panoptic_scene, id2rgb

    new_id = {c["id"]: COCO_IDS[c["name"]] for c in PANOPTIC_CATEGORIES}
    cats = [dict(c, id=COCO_IDS[c["name"]]) for c in PANOPTIC_CATEGORIES]
    cats = [cats[i] for i in (5, 0, 3, 2, 4, 1)]
    (root / "annotations").mkdir(parents=True)
    truth = {}
    for split, n, seed in zip(("train", "val"), counts, (9000, 9100)):
        (root / "images" / split).mkdir(parents=True)
        (root / "panoptic" / split).mkdir(parents=True)
        images, panoptic, instances, truth[split] = [], [], [], []
        for i in range(n):
            rgb, pan, segments = draw_panoptic_scene(seed + i)
            segments = [dict(s, category_id=new_id[s["category_id"]]) for s in segments]
            if split == "val" and i == 0:
                next(s for s in segments if s["category_id"] in THINGS)["iscrowd"] = 1
            image_id = 100 * (split == "val") + 7 * i + 3
            Image.fromarray(rgb).save(root / "images" / split / f"{i:03d}.jpg")
            Image.fromarray(id2rgb(pan)).save(root / "panoptic" / split / f"{i:03d}.png")
            images.append({"id": image_id, "file_name": f"{i:03d}.jpg", "height": 128, "width": 128})
            panoptic.append({"image_id": image_id, "file_name": f"{i:03d}.png", "segments_info": segments})
            for s in segments:
                if s["category_id"] in THINGS:
                    instances.append(dict(coco_mask_annotation(pan == s["id"], len(instances) + 1, image_id,
                                                               s["category_id"]), iscrowd=s["iscrowd"]))
            truth[split].append((image_id, pan, segments))
        for task, anns, categories in (("panoptic", panoptic, cats),
                                       ("instances", instances, [c for c in cats if c["isthing"]])):
            (root / "annotations" / f"{task}_{split}.json").write_text(
                json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return truth


def _edit_json(root: Path, name: str, edit) -> None:
    path = root / "annotations" / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_panoptic_folder_is_registered_by_detectron2_with_derived_semantic_maps_and_instances(tmp_path,
                                                                                                 monkeypatch):
    """The categories give the class ids (things by id, then stuff by id) and NUM_CLASSES; the
    dicts are detectron2's with those ids; the val split's derived semantic maps are each
    segment's class (crowd too, 255 on void) and its instances JSON the things (crowd flagged);
    a second load reads no file, and a segment's new category re-derives only its PNG."""
    root = tmp_path / "data"
    truth = make_coco_folder(root)
    cfg = load_config(FOLDER_PAN_R18, ["DATASETS.FOLDER.ROOT", str(root)])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 6
    meta = MetadataCatalog.get("folder_panoptic_val_with_sem_seg")
    assert meta.stuff_classes == PAN_NAMES and meta.thing_classes == PAN_NAMES[:3]
    assert meta.thing_dataset_id_to_contiguous_id == {5: 0, 9: 1, 20: 2}
    assert meta.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
    assert MetadataCatalog.get("folder_panoptic_val").stuff_dataset_id_to_contiguous_id == {1: 3, 8: 4, 12: 5}
    assert (meta.evaluator_type, meta.ignore_label, meta.label_divisor) == ("coco_panoptic_seg", 255, 1000)

    def expected_sem(pan, segments):
        sem = np.full(pan.shape, 255, np.uint8)
        for s in segments:
            sem[pan == s["id"]] = CONTIGUOUS[s["category_id"]]
        return sem

    for split, name in (("train", "folder_panoptic_train"), ("val", "folder_panoptic_val_with_sem_seg")):
        dicts = DatasetCatalog.get(name)
        assert [(d["image_id"], d["file_name"]) for d in dicts] == [
            (image_id, str(root / "images" / split / f"{i:03d}.jpg"))
            for i, (image_id, _, _) in enumerate(truth[split])]
        for d, (_, pan, segments) in zip(dicts, truth[split]):
            assert [(s["id"], s["category_id"], s["isthing"]) for s in d["segments_info"]] == [
                (s["id"], CONTIGUOUS[s["category_id"]], s["category_id"] in THINGS) for s in segments]
            if split == "val":
                assert np.array_equal(np.array(Image.open(d["sem_seg_file_name"])), expected_sem(pan, segments))
    derived = json.loads(Path(meta.json_file).read_text())
    things = [(image_id, s) for image_id, _, segments in truth["val"] for s in segments if s["category_id"] in THINGS]
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in derived["annotations"]] == [
        (image_id, s["category_id"], s["iscrowd"]) for image_id, s in things]
    crowd = next(a for a in derived["annotations"] if a["iscrowd"])
    crowd_mask = truth["val"][0][1] == things[0][1]["id"]
    assert np.array_equal(mask_util.decode(crowd["segmentation"]).astype(bool), crowd_mask)
    assert sorted(c["id"] for c in derived["categories"]) == list(THINGS)

    reads = []
    read_png, read_image = folder_coco._read_panoptic, folder_coco.image_record
    monkeypatch.setattr(folder_coco, "_read_panoptic", lambda p, *a: reads.append(p) or read_png(p, *a))
    monkeypatch.setattr(folder_coco, "image_record", lambda p: reads.append(p) or read_image(p))
    DatasetCatalog.get("folder_panoptic_val_with_sem_seg")
    assert reads == []
    _, pan, segments = truth["val"][1]
    sky = next(s for s in segments if s["category_id"] == 1)
    sky["category_id"] = 8  # sky becomes grass
    _edit_json(root, "panoptic_val.json", lambda data: data["annotations"][1].update(segments_info=segments))
    d = DatasetCatalog.get("folder_panoptic_val_with_sem_seg")[1]
    assert reads == [str(root / "panoptic" / "val" / "001.png")]
    assert np.array_equal(np.array(Image.open(d["sem_seg_file_name"])), expected_sem(pan, segments))


def test_an_instance_folder_is_registered_by_detectron2(tmp_path):
    """The categories sorted by id give the class ids and NUM_CLASSES; load_coco_json's dicts
    hold every thing with that class and its mask."""
    root = tmp_path / "data"
    truth = make_coco_folder(root, counts=(2, 1))
    cfg = load_config(FOLDER_INST_R50, ["DATASETS.FOLDER.ROOT", str(root)])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 3
    meta = MetadataCatalog.get("folder_instance_val")
    assert meta.thing_classes == PAN_NAMES[:3] and meta.thing_dataset_id_to_contiguous_id == {5: 0, 9: 1, 20: 2}
    assert (meta.evaluator_type, meta.json_file) == ("coco", str(root / "annotations" / "instances_val.json"))
    for split, name in folder_coco.INSTANCE_DATASETS.items():
        dicts = DatasetCatalog.get(name)
        assert [d["image_id"] for d in dicts] == [image_id for image_id, _, _ in truth[split]]
        for d, (_, pan, segments) in zip(dicts, truth[split]):
            things = [s for s in segments if s["category_id"] in THINGS]
            assert [a["category_id"] for a in d["annotations"]] == [CONTIGUOUS[s["category_id"]] for s in things]
            assert all(np.array_equal(mask_util.decode(a["segmentation"]).astype(bool), pan == s["id"])
                       for a, s in zip(d["annotations"], things))


def _break_panoptic(root):
    (root / "images/train/000.jpg").unlink()
    (root / "panoptic/train/001.png").unlink()

    def edit(data):
        anns = data["annotations"]
        anns[2]["segments_info"].pop()
        anns[3]["segments_info"].append({"id": 4242, "category_id": 1, "iscrowd": 0})
        anns[3]["segments_info"][0]["category_id"] = 99
    _edit_json(root, "panoptic_train.json", edit)
    png = root / "panoptic/train/004.png"
    Image.fromarray(np.pad(np.array(Image.open(png)), ((0, 16), (0, 0), (0, 0)))).save(png)
    _edit_json(root, "panoptic_val.json", lambda data: data.update(annotations=[]))


def test_each_problem_of_a_panoptic_folder_is_named_in_one_error_before_training(tmp_path):
    """A missing image and PNG, a PNG segment the segments_info does not list and the other way
    round, an unknown category, a PNG of another size, an empty split: train_net.py's body
    refuses the folder with all seven, each naming its file, and writes nothing."""
    root = tmp_path / "data"
    truth = make_coco_folder(root, counts=(5, 1))
    _break_panoptic(root)
    message = _refused(tmp_path, root, config=FOLDER_PAN_R18)
    dropped = truth["train"][2][2][-1]["id"]
    for problem in [
        "1 image named by annotations/panoptic_train.json does not exist: images/train/000.jpg (detectron2's "
        "load_coco_panoptic_json reads images/train/<the stem of each PNG's file_name>.jpg)",
        "1 panoptic PNG named by annotations/panoptic_train.json does not exist: panoptic/train/001.png",
        f"panoptic/train/002.png holds segment id {dropped} that its segments_info in "
        "annotations/panoptic_train.json does not list",
        "annotations/panoptic_train.json: the segments_info of 003.png lists segment id 4242 that "
        "panoptic/train/003.png does not hold",
        f"annotations/panoptic_train.json: segment {truth['train'][3][2][0]['id']} of 003.png has category id 99, "
        "which is not in its categories (ids [1, 5, 8, 9, 12, 20])",
        "panoptic/train/004.png is 128x144 (WxH) but its image images/train/004.jpg is 128x128",
        "the val split is empty: annotations/panoptic_val.json has no annotation",
    ]:
        assert message.count(problem) == 1, (problem, message)
    assert f"the folder dataset {root} (DATASETS.FOLDER.ROOT) has 7 problems:" in message


def _break_instances(root):
    (root / "images/train/000.jpg").unlink()

    def edit(data):
        anns = data["annotations"]
        anns[0]["category_id"] = 99
        anns[1]["image_id"] = 777
        del anns[2]["segmentation"]
        anns[3]["id"] = anns[4]["id"]
        data["images"][1]["height"] = 100
    _edit_json(root, "instances_train.json", edit)
    _edit_json(root, "instances_val.json", lambda data: data.update(images=[], annotations=[]))


def test_each_problem_of_an_instance_folder_is_named_in_one_error_before_training(tmp_path):
    """A missing image, an unknown category, an annotation of an image not in `images`, one
    without its segmentation, a repeated annotation id, an image of another size than the JSON
    says, an empty split: refused with all seven, OUTPUT_DIR untouched."""
    root = tmp_path / "data"
    make_coco_folder(root, counts=(3, 1))
    _break_instances(root)
    message = _refused(tmp_path, root, *INSTANCE_R18, config=FOLDER_PAN_R18)
    for problem in [
        "1 image named by annotations/instances_train.json does not exist: images/train/000.jpg",
        "annotations/instances_train.json: annotation 1 (image 3) has category id 99, which is not in its "
        "categories (ids [5, 9, 20])",
        "annotations/instances_train.json: annotation 2 is of image id 777, which is not in its `images`",
        "annotations/instances_train.json: 1 annotation lacks one of id, image_id, category_id, segmentation, bbox, "
        "area, or has an empty segmentation or bbox (at index 2)",
        "annotations/instances_train.json: annotation ids appear more than once: 5",
        "images/train/001.jpg is 128x128 (WxH) but annotations/instances_train.json says 128x100",
        "the val split is empty: annotations/instances_val.json lists no image",
    ]:
        assert message.count(problem) == 1, (problem, message)
    assert "has 7 problems:" in message


@pytest.mark.parametrize("edit, opts, expected", [
    (lambda root: (root / "annotations/panoptic_val.json").unlink(), [],
     r"has 1 problem:\n  - annotations/panoptic_val.json does not exist"),
    (lambda root: (root / "annotations/panoptic_train.json").write_text("{"), [],
     r"annotations/panoptic_train.json cannot be read as JSON \(JSONDecodeError"),
    (lambda root: _edit_json(root, "panoptic_train.json", lambda d: d["categories"][2].pop("isthing")), [],
     r"panoptic_train.json: 1 category of `categories` lacks id, name, isthing or an integer id \(at index 2\)"),
    (lambda root: _edit_json(root, "panoptic_val.json", lambda d: d["categories"].append(d["categories"][0])), [],
     r"panoptic_val.json: category id \[12\] appears more than once"),
    (lambda root: _edit_json(root, "panoptic_val.json", lambda d: d["categories"][0].update(name="walls")), [],
     r"different categories \(only in train: 12 'wall'; only in val: 12 'walls'\): both splits need the same"),
    (lambda root: (root / "classes.txt").write_text("\n".join(sorted(PAN_NAMES))), [],
     r"classes.txt names \['ball', 'box', 'grass', 'kite', 'sky', 'wall'\] but the categories of "
     r"annotations/panoptic_train.json in the order of the class ids \(the things sorted by id, then the stuff "
     r"sorted by id\) are \['ball', 'box', 'kite', 'sky', 'grass', 'wall'\]"),
    (lambda root: None, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"],
     r"NUM_CLASSES is 5 but .*annotations/panoptic_train.json names 6 classes: set MODEL.SEM_SEG_HEAD.NUM_CLASSES "
     r"-1 to take the number from its categories"),
], ids=["missing_json", "not_json", "isthing", "repeated_id", "splits_differ", "classes_txt", "num_classes"])
def test_the_categories_are_checked_when_the_config_loads(tmp_path, edit, opts, expected):
    root = tmp_path / "data"
    make_coco_folder(root, counts=(1, 1))
    edit(root)
    with pytest.raises(ValueError, match=expected):
        load_config(FOLDER_PAN_R18, ["DATASETS.FOLDER.ROOT", str(root), *opts])


def test_each_folder_config_is_the_config_it_inherits_from_on_the_folder():
    """Every configs/folder/*.yaml is its _BASE_ with only the datasets (the folder's, of the
    base's task), MODEL.SEM_SEG_HEAD.NUM_CLASSES -1 (resolved from the folder) and OUTPUT_DIR
    changed (docs/own_data.md)."""
    import yaml
    from conftest import folder_opts

    names = sorted(Path(REPO, "configs", "folder").glob("*.yaml"))
    assert len(names) == 14
    for path in names:
        cfg = load_config(str(path), folder_opts(str(path)))
        base = load_config(str(path.parent / yaml.safe_load(path.read_text())["_BASE_"]))
        task = "panoptic" if "_panoptic" in path.name else "instance" if "_instance" in path.name else "sem_seg"
        val = "folder_panoptic_val_with_sem_seg" if task == "panoptic" else f"folder_{task}_val"
        assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == ((f"folder_{task}_train",), (val,))
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == {"panoptic": 4, "instance": 2, "sem_seg": 3}[task]
        assert cfg.OUTPUT_DIR == f"./output/folder/{path.stem}"
        for c in (cfg, base):
            c.defrost()
            c.DATASETS.TRAIN = c.DATASETS.TEST = ()
            c.DATASETS.FOLDER.ROOT, c.MODEL.SEM_SEG_HEAD.NUM_CLASSES, c.OUTPUT_DIR = "", 0, ""
        assert cfg == base, path.name
