"""Dataset preparation scripts (datasets/*.py) and registration (sgr_d2.data.datasets).

Each test builds a tiny copy of an official raw layout under a temporary DETECTRON2_DATASETS,
runs the preparation script in-process, loads the registered dataset through DatasetCatalog
and checks every label value against the mapping the dataset defines.
"""
import sgr_d2  # noqa: F401  (must precede detectron2 imports: compatibility shims)

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from sgr_d2.data.datasets import DatasetLayoutError, instance_map_path

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_prep_{name}", REPO / "datasets" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ade_prep = _load_script("prepare_ade20k_sem_seg")
coco_prep = _load_script("prepare_coco_stuff_10k_sem_seg")
city_prep = _load_script("prepare_cityscapes_sem_seg")


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _image(path, seed, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.RandomState(seed).randint(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)


def _read(path):
    return np.asarray(Image.open(path))


def _mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


def _cycle(values, offset=0):
    """An H x W map that cycles through ``values`` (so every value occurs in a 64x48 map)."""
    values = np.asarray(values)
    idx = (np.arange(H * W) + offset) % len(values)
    return values[idx].reshape(H, W)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    return tmp_path


# --------------------------------------------------------------------------------------- ADE20K
def _make_ade(root):
    base = root / "ADEChallengeData2016"
    raws = {}
    for split, prefix, n in (("training", "ADE_train", 2), ("validation", "ADE_val", 1)):
        for i in range(n):
            name = f"{prefix}_{i + 1:08d}"
            _image(base / "images" / split / f"{name}.jpg", i, "JPEG")
            raw = _cycle(np.arange(151), offset=37 * i)  # every raw value 0..150 occurs
            _png(base / "annotations" / split / f"{name}.png", raw)
            raws[(split, name)] = raw
    return base, raws


def test_ade20k_prepare_and_load(root):
    base, raws = _make_ade(root)
    assert ade_prep.main([]) == 0
    for (split, name), raw in raws.items():
        out = _read(base / "annotations_detectron2" / split / f"{name}.png")
        assert out.dtype == np.uint8 and out.shape == (H, W)
        # hand-written spots: 0 ("other") -> 255, 1 -> 0, 150 -> 149
        for raw_value, expected in ((0, 255), (1, 0), (2, 1), (75, 74), (150, 149)):
            assert (out[raw == raw_value] == expected).all()
        assert np.array_equal(out, np.where(raw == 0, 255, raw.astype(int) - 1))

    dicts = DatasetCatalog.get("ade20k_sem_seg_train")
    assert [Path(d["file_name"]).name for d in dicts] == [
        "ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    for d in dicts:
        assert Path(d["file_name"]).parent == base / "images" / "training"
        assert Path(d["sem_seg_file_name"]) == base / "annotations_detectron2" / "training" / (
            Path(d["file_name"]).stem + ".png")
        assert instance_map_path(d) is None  # ADE20K instances: connected components
    assert len(DatasetCatalog.get("ade20k_sem_seg_val")) == 1

    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert Path(meta.image_root) == base / "images" / "validation"
    assert Path(meta.sem_seg_root) == base / "annotations_detectron2" / "validation"
    assert len(meta.stuff_classes) == 150 and len(meta.stuff_colors) == 150
    # objectInfo150.csv: index 1 wall, 3 sky, 13 person, 21 car, 150 flag; color150 first/last
    assert [meta.stuff_classes[i] for i in (0, 2, 12, 20, 149)] == [
        "wall", "sky", "person", "car", "flag"]
    assert meta.stuff_colors[0] == [120, 120, 120] and meta.stuff_colors[149] == [92, 0, 255]
    assert meta.instance_source == "connected_components"


def test_ade20k_idempotent(root):
    base, _ = _make_ade(root)
    ade_prep.main([])
    outputs = sorted((base / "annotations_detectron2").rglob("*.png"))
    assert len(outputs) == 3
    before = _mtimes(outputs)
    ade_prep.main([])
    assert _mtimes(outputs) == before  # nothing rewritten
    # a source made newer than its output is converted again, and only that one
    src = base / "annotations" / "validation" / "ADE_val_00000001.png"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, max(before.values()) + 10**9))
    ade_prep.main([])
    after = _mtimes(outputs)
    changed = [p for p in outputs if after[p] != before[p]]
    assert changed == [base / "annotations_detectron2" / "validation" / "ADE_val_00000001.png"]


def test_ade20k_errors(root, monkeypatch):
    missing = root / "absent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing))
    with pytest.raises(FileNotFoundError) as e:
        ade_prep.main([])
    assert str(missing / "ADEChallengeData2016") in str(e.value) and "annotations/" in str(e.value)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    base, _ = _make_ade(root)
    # registered loader before preparation: names the missing folder and the script
    with pytest.raises(DatasetLayoutError) as e:
        DatasetCatalog.get("ade20k_sem_seg_val")
    assert str(base / "annotations_detectron2" / "validation") in str(e.value)
    assert "prepare_ade20k_sem_seg.py" in str(e.value)

    lonely = base / "images" / "training" / "ADE_train_00000009.jpg"
    _image(lonely, 9, "JPEG")
    with pytest.raises(FileNotFoundError) as e:
        ade_prep.main([])
    assert str(base / "annotations" / "training" / "ADE_train_00000009.png") in str(e.value)
    assert str(lonely) in str(e.value)
    lonely.unlink()

    (base / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    (base / "annotations" / "validation").rmdir()
    with pytest.raises(FileNotFoundError) as e:
        ade_prep.main([])
    assert str(base / "annotations" / "validation") in str(e.value)
    assert not (base / "annotations_detectron2").exists()  # checked before writing anything


def test_ade20k_rejects_out_of_range_label(root):
    base, _ = _make_ade(root)
    bad = base / "annotations" / "training" / "ADE_train_00000002.png"
    _png(bad, np.full((H, W), 151))
    with pytest.raises(ValueError, match=r"\[151\]") as e:
        ade_prep.main([])
    assert str(bad) in str(e.value)


# ------------------------------------------------------------------------------- COCO-Stuff-10K
UNUSED = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}
USED = [i for i in range(1, 183) if i not in UNUSED]


def _savemat(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"S": np.asarray(labels, dtype=np.uint8), "names": ["x"]})


def _make_coco(root):
    base = root / "coco" / "coco_stuff_10k"
    raws = {}
    lists = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000081"]}
    for split, names in lists.items():
        for i, name in enumerate(names):
            _image(base / "images" / f"{name}.jpg", i, "JPEG")
            raw = _cycle([0] + USED, offset=11 * i)  # unlabeled + all 171 used ids
            _savemat(base / "annotations" / f"{name}.mat", raw)
            raws[(split, name)] = raw
        (base / "imageLists").mkdir(parents=True, exist_ok=True)
        (base / "imageLists" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return base, raws


def test_coco_stuff_prepare_and_load(root):
    base, raws = _make_coco(root)
    assert coco_prep.main([]) == 0
    # hand-counted: the index of id c is c-1 minus the unused ids below c; unlabeled -> 255
    spots = {0: 255, 1: 0, 11: 10, 13: 11, 25: 23, 27: 24, 31: 26, 44: 39, 46: 40, 67: 60,
             84: 73, 90: 79, 92: 80, 182: 170}
    for (split, name), raw in raws.items():
        out = _read(base / "annotations_detectron2" / split / f"{name}.png")
        assert out.shape == (H, W) and out.dtype == np.uint8
        for cid, expected in spots.items():
            assert (out[raw == cid] == expected).all()
        expected = np.full((H, W), 255)
        for k, cid in enumerate(sorted(USED)):
            expected[raw == cid] = k
        assert np.array_equal(out, expected)
        assert set(np.unique(out).tolist()) == set(range(171)) | {255}
        img = base / "images_detectron2" / split / f"{name}.jpg"
        assert img.read_bytes() == (base / "images" / f"{name}.jpg").read_bytes()

    dicts = DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    assert len(dicts) == 2 and len(DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")) == 1
    for d in dicts:
        assert Path(d["file_name"]).parent == base / "images_detectron2" / "train"
        assert Path(d["sem_seg_file_name"]).stem == Path(d["file_name"]).stem
        assert instance_map_path(d) is None  # COCO-Stuff instances: connected components

    meta = MetadataCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert Path(meta.sem_seg_root) == base / "annotations_detectron2" / "test"
    assert len(meta.stuff_classes) == 171 and len(meta.stuff_colors) == 171
    assert len({tuple(c) for c in meta.stuff_colors}) == 171
    id2c = meta.stuff_dataset_id_to_contiguous_id
    assert sorted(id2c) == USED and [id2c[c] for c in sorted(id2c)] == list(range(171))
    assert not UNUSED & set(id2c)
    # class names of the ids detectron2 also knows (its COCO thing and stuff categories)
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    checked = 0
    for cat in COCO_CATEGORIES:
        if cat["id"] <= 182:
            assert meta.stuff_classes[id2c[cat["id"]]] == cat["name"], cat
            checked += 1
    assert checked == 80 + 36
    assert meta.stuff_classes[170] == "wood" and meta.stuff_classes[80] == "banner"


def test_coco_stuff_idempotent(root):
    base, _ = _make_coco(root)
    coco_prep.main([])
    outputs = sorted((base / "annotations_detectron2").rglob("*.png")) + sorted(
        (base / "images_detectron2").rglob("*.jpg"))
    assert len(outputs) == 6
    before = _mtimes(outputs)
    coco_prep.main([])
    assert _mtimes(outputs) == before


def test_coco_stuff_rejects_unused_ids(root):
    base, _ = _make_coco(root)
    for bad_id in (12, 91, 183):
        mat = base / "annotations" / "COCO_train2014_000000000078.mat"
        raw = _cycle([0, 1, bad_id, 182])
        _savemat(mat, raw)
        with pytest.raises(ValueError) as e:
            coco_prep.main([])
        assert str(mat) in str(e.value) and f"[{bad_id}]" in str(e.value)


def _matlab_v73_header():
    text = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
            b"HDF5 schema 1.00 .")
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"  # version 0x0200, "IM"
    assert len(header) == 128
    return header


@pytest.mark.parametrize("with_hdf5_body", [True, False])
def test_coco_stuff_rejects_matlab_v73(root, with_hdf5_body):
    base, _ = _make_coco(root)
    mat = base / "annotations" / "COCO_train2014_000000000081.mat"
    body = _matlab_v73_header().ljust(512, b"\x00")
    if with_hdf5_body:
        body += b"\x89HDF\r\n\x1a\n" + b"\x00" * 64
    mat.write_bytes(body)
    with pytest.raises(NotImplementedError):  # the fixture is what scipy calls a v7.3 file
        scipy.io.loadmat(str(mat))
    with pytest.raises(ValueError, match="v7.3") as e:
        coco_prep.main([])
    assert str(mat) in str(e.value)


def test_coco_stuff_errors(root, monkeypatch):
    missing = root / "absent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing))
    with pytest.raises(FileNotFoundError) as e:
        coco_prep.main([])
    assert str(missing / "coco" / "coco_stuff_10k") in str(e.value) and "imageLists" in str(e.value)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    base, _ = _make_coco(root)
    with pytest.raises(DatasetLayoutError) as e:
        DatasetCatalog.get("coco_2017_train_stuff_10k_sem_seg")
    assert str(base / "images_detectron2" / "train") in str(e.value)
    assert "prepare_coco_stuff_10k_sem_seg.py" in str(e.value)

    _image(base / "images" / "COCO_train2014_000000000099.jpg", 3, "JPEG")
    with open(base / "imageLists" / "train.txt", "a") as f:
        f.write("COCO_train2014_000000000099\n")
    with pytest.raises(FileNotFoundError) as e:
        coco_prep.main([])
    assert str(base / "annotations" / "COCO_train2014_000000000099.mat") in str(e.value)
    _savemat(base / "annotations" / "COCO_train2014_000000000099.mat", np.zeros((H, W)))

    (base / "imageLists" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError) as e:
        coco_prep.main([])
    assert str(base / "imageLists" / "test.txt") in str(e.value)
    assert not (base / "annotations_detectron2").exists()  # checked before writing anything


# ----------------------------------------------------------------------------------- Cityscapes
def _cs_table():
    """label id -> train id as cityscapesscripts.helpers.labels defines it (255/-1 -> 255)."""
    from cityscapesscripts.helpers.labels import labels

    return {lab.id: (255 if lab.trainId in (255, -1) else lab.trainId) for lab in labels if lab.id >= 0}


def _make_cityscapes(root, label_maps=None):
    """label_maps: {(split, city, frame): label-id map}; default: every label id 0..33 occurs."""
    base = root / "cityscapes"
    if label_maps is None:
        ids = sorted(_cs_table())
        label_maps = {("train", "aachen", "aachen_000000_000019"): _cycle(ids),
                      ("train", "bochum", "bochum_000000_000313"): _cycle(ids, offset=5),
                      ("val", "lindau", "lindau_000000_000019"): _cycle(ids, offset=9)}
    for i, ((split, city, frame), ids_map) in enumerate(label_maps.items()):
        _image(base / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", i, "PNG")
        gt = base / "gtFine" / split / city
        _png(gt / f"{frame}_gtFine_labelIds.png", ids_map)
        inst = np.where(ids_map == 26, 26000, ids_map).astype(np.uint16)  # 16-bit, one "car"
        Image.fromarray(inst).save(gt / f"{frame}_gtFine_instanceIds.png")
        (gt / f"{frame}_gtFine_polygons.json").write_text(
            json.dumps({"imgHeight": H, "imgWidth": W, "objects": []}))
    return base, label_maps


def test_cityscapes_prepare_and_load(root):
    table = _cs_table()
    # hand-written spots from the Cityscapes label definition
    assert {k: table[k] for k in (0, 4, 7, 8, 11, 24, 26, 33)} == {
        0: 255, 4: 255, 7: 0, 8: 1, 11: 2, 24: 11, 26: 13, 33: 18}
    base, maps = _make_cityscapes(root)
    assert city_prep.main([]) == 0
    for (split, city, frame), ids_map in maps.items():
        out = _read(base / "gtFine" / split / city / f"{frame}_gtFine_labelTrainIds.png")
        expected = np.vectorize(table.__getitem__)(ids_map)
        assert np.array_equal(out, expected)
        assert set(np.unique(out).tolist()) == set(range(19)) | {255}

    dicts = DatasetCatalog.get("cityscapes_fine_sem_seg_train")
    assert sorted(Path(d["file_name"]).name for d in dicts) == [
        "aachen_000000_000019_leftImg8bit.png", "bochum_000000_000313_leftImg8bit.png"]
    for d in dicts:
        assert d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png")
        assert (d["height"], d["width"]) == (H, W)
        inst = instance_map_path(d)
        assert inst == d["sem_seg_file_name"].replace("labelTrainIds", "instanceIds")
        assert Path(inst).is_file()
    meta = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    assert len(DatasetCatalog.get("cityscapes_fine_sem_seg_val")) == 1
    assert meta.evaluator_type == "cityscapes_sem_seg" and meta.ignore_label == 255
    assert Path(meta.gt_dir) == Path(meta.instance_root) == base / "gtFine" / "val"
    assert meta.stuff_colors[0] == [128, 64, 128] and len(meta.stuff_colors) == 19
    # the names stay detectron2's own registration: no second copy
    names = {n for n in DatasetCatalog.list() if n.startswith("cityscapes") and "sem_seg" in n}
    assert names == {"cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val",
                     "cityscapes_fine_sem_seg_test"}


def test_cityscapes_matches_cityscapesscripts_trainid_drawing(root):
    """Our id -> trainId mapping of labelIds.png equals cityscapesscripts drawing the polygons
    with train ids (what its createTrainIdLabelImgs writes)."""
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    objects = [("sky", [[0, 0], [63, 0], [63, 20], [0, 20]]),
               ("building", [[5, 2], [40, 2], [40, 30], [5, 30]]),
               ("road", [[0, 30], [63, 30], [63, 47], [0, 47]]),
               ("ego vehicle", [[0, 44], [63, 44], [63, 47], [0, 47]]),
               ("car", [[10, 25], [30, 25], [30, 40], [10, 40]]),
               ("license plate", [[15, 33], [25, 33], [25, 37], [15, 37]]),
               ("persongroup", [[45, 15], [55, 15], [55, 42], [45, 42]]),
               ("rectification border", [[60, 0], [63, 0], [63, 47], [60, 47]])]
    maps = {}
    for split, city in (("train", "aachen"), ("val", "lindau")):
        frame = f"{city}_000000_000019"
        gt = root / "cityscapes" / "gtFine" / split / city
        gt.mkdir(parents=True)
        poly = gt / f"{frame}_gtFine_polygons.json"
        poly.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": [
            {"label": lab, "polygon": pts} for lab, pts in objects]}))
        json2labelImg(str(poly), str(gt / f"{frame}_gtFine_labelIds.png"), "ids")
        json2labelImg(str(poly), str(root / f"reference_{split}.png"), "trainIds")
        _image(root / "cityscapes" / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", 0, "PNG")
        maps[split] = gt / f"{frame}_gtFine_labelTrainIds.png"
    city_prep.main([])
    for split, ours in maps.items():
        reference = _read(root / f"reference_{split}.png")
        assert len(np.unique(reference)) >= 5
        assert np.array_equal(_read(ours), reference)


def test_cityscapes_idempotent(root):
    base, _ = _make_cityscapes(root)
    city_prep.main([])
    outputs = sorted(base.rglob("*_gtFine_labelTrainIds.png"))
    assert len(outputs) == 3
    before = _mtimes(outputs)
    city_prep.main([])
    assert _mtimes(outputs) == before


def test_cityscapes_errors(root, monkeypatch):
    missing = root / "absent"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(missing))
    with pytest.raises(FileNotFoundError) as e:
        city_prep.main([])
    assert str(missing / "cityscapes") in str(e.value) and "leftImg8bit" in str(e.value)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    base, _ = _make_cityscapes(root)
    with pytest.raises(DatasetLayoutError) as e:  # registered loader before preparation
        DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert "lindau_000000_000019_gtFine_labelTrainIds.png" in str(e.value)
    assert "prepare_cityscapes_sem_seg.py" in str(e.value)

    lonely = base / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    _image(lonely, 1, "PNG")
    with pytest.raises(FileNotFoundError) as e:
        city_prep.main([])
    expected = base / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png"
    assert str(expected) in str(e.value)
    lonely.unlink()

    bad = base / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    _png(bad, _cycle([7, 8, 40]))
    with pytest.raises(ValueError) as e:
        city_prep.main([])
    assert str(bad) in str(e.value) and "[40]" in str(e.value)

    for f in (base / "gtFine" / "val" / "lindau").iterdir():
        f.unlink()
    (base / "gtFine" / "val" / "lindau").rmdir()
    (base / "gtFine" / "val").rmdir()
    with pytest.raises(FileNotFoundError) as e:
        city_prep.main([])
    assert str(base / "gtFine" / "val") in str(e.value)
    with pytest.raises(DatasetLayoutError) as e:
        DatasetCatalog.get("cityscapes_fine_sem_seg_val")
    assert str(base / "gtFine" / "val") in str(e.value)


def test_registration_does_not_touch_disk(root, monkeypatch):
    from sgr_d2.data.datasets import (refresh_paths, register_ade20k, register_ade20k_panoptic, register_cityscapes,
                                      register_coco, register_coco_stuff_10k)

    def register_all():
        register_ade20k.register_all_ade20k()
        register_ade20k_panoptic.register_all_ade20k_panoptic()
        register_coco.register_all_coco()
        register_coco_stuff_10k.register_all_coco_stuff_10k()
        register_cityscapes.register_all_cityscapes()

    absent = root / "nowhere"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(absent))
    try:
        register_all()
        assert not absent.exists()
        assert Path(MetadataCatalog.get("ade20k_sem_seg_train").image_root) == (
            absent / "ADEChallengeData2016" / "images" / "training")
        with pytest.raises(DatasetLayoutError, match=str(absent / "coco" / "coco_stuff_10k")):
            DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
        for name in ("coco_2017_val", "coco_2017_train_panoptic", "ade20k_panoptic_val", "ade20k_instance_train",
                     "cityscapes_fine_panoptic_val", "cityscapes_fine_instance_seg_train"):
            with pytest.raises(DatasetLayoutError, match=str(absent)):
                DatasetCatalog.get(name)
        # the paths an evaluator reads when it is built follow the variable without a load
        moved = root / "elsewhere"
        monkeypatch.setenv("DETECTRON2_DATASETS", str(moved))
        refresh_paths("coco_2017_val_panoptic_with_sem_seg")
        meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
        assert Path(meta.panoptic_json) == moved / "coco" / "annotations" / "panoptic_val2017.json"
        assert Path(meta.json_file) == moved / "coco" / "annotations" / "instances_val2017.json"
        assert Path(meta.sem_seg_root) == moved / "coco" / "panoptic_semseg_val2017"
        refresh_paths("cityscapes_fine_panoptic_val")
        assert Path(MetadataCatalog.get("cityscapes_fine_panoptic_val").panoptic_root) == (
            moved / "cityscapes" / "gtFine" / "cityscapes_panoptic_val")
        assert not moved.exists() and not absent.exists()
    finally:
        monkeypatch.undo()  # leave the registrations as an import with the real env makes them
        register_all()


def test_instance_map_path():
    assert instance_map_path({"sem_seg_file_name": "/d/x/a_1_2_gtFine_labelTrainIds.png"}) == (
        "/d/x/a_1_2_gtFine_instanceIds.png")
    assert instance_map_path({"sem_seg_file_name": "/d/a_gtFine_labelIds.png"}) == (
        "/d/a_gtFine_instanceIds.png")
    explicit = {"sem_seg_file_name": "/d/a.png", "instance_file_name": "/i/a.png"}
    assert instance_map_path(explicit) == "/i/a.png"
    assert instance_map_path({"sem_seg_file_name": "/d/ADE_val_00000001.png"}) is None
    assert instance_map_path({"file_name": "/d/a.jpg"}) is None


# ---------------------------------------- sgr_d2's SemSegEvaluator vs. cityscapesscripts mIoU
def test_semseg_evaluator_matches_cityscapesscripts(root, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    from cityscapesscripts.helpers.labels import id2label, labels, trainId2label
    from sgr_d2.evaluation import SGRSemSegEvaluator

    # detectron2 ignores exactly the pixels cityscapesscripts leaves out of the evaluation
    assert all(lab.ignoreInEval == (lab.trainId in (255, -1)) for lab in labels if lab.id >= 0)

    rng = np.random.RandomState(0)
    # GT: road, sidewalk, building, car, person + void ids; predictions use train ids 0..6 and 13
    gt_ids = [rng.choice([0, 1, 4, 7, 8, 11, 24, 26], size=(H, W)) for _ in range(2)]
    preds = [rng.choice([0, 1, 2, 3, 4, 5, 6, 13], size=(H, W)) for _ in range(2)]
    preds[0][: H // 2] = np.vectorize(lambda i: max(id2label[i].trainId, 0) % 255)(gt_ids[0][: H // 2])
    maps = {("val", "lindau", f"lindau_00000{k}_000019"): gt_ids[k] for k in range(2)}
    maps[("train", "aachen", "aachen_000000_000019")] = gt_ids[0]  # the script wants both splits
    base, _ = _make_cityscapes(root, maps)
    city_prep.main([])

    dataset = "cityscapes_fine_sem_seg_val"
    dicts = sorted(DatasetCatalog.get(dataset), key=lambda d: d["file_name"])
    evaluator = SGRSemSegEvaluator(dataset, distributed=False)
    evaluator.reset()
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    pred_files, gt_files = [], []
    for d, pred in zip(dicts, preds):
        logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 19).permute(2, 0, 1).float()
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": logits}])
        # cityscapesscripts compares label ids: write the prediction as label ids
        as_ids = np.vectorize(lambda t: trainId2label[t].id)(pred)
        pred_file = pred_dir / Path(d["file_name"]).name
        _png(pred_file, as_ids)
        pred_files.append(str(pred_file))
        gt_files.append(d["sem_seg_file_name"].replace("labelTrainIds", "labelIds"))
    d2_miou = evaluator.evaluate()["sem_seg"]["mIoU"] / 100

    args = copy.copy(cs_eval.args)
    args.quiet, args.JSONOutput = True, False
    args.evalInstLevelScore, args.evalPixelAccuracy = False, False
    args.colorized, args.bold, args.nocol = False, "", ""
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    scores = {n: s for n, s in result["classScores"].items() if not _cs_ignored(n)}
    assert len(scores) == 19
    # cityscapesscripts gives a class IoU of nan when TP+FP+FN == 0 (absent from GT and from the
    # predictions on evaluated pixels) and averages over the other classes; so does sgr_d2
    # (sem_seg_metrics), on detectron2 v0.6 and upstream main alike (upstream's own evaluator
    # leaves out the classes predicted but absent from GT). Both cases occur here:
    values = np.array(list(scores.values()), dtype=float)
    assert np.isnan(values).any() and (values == 0).any()  # both cases are exercised
    cs_miou = float(np.nanmean(values))
    assert cs_miou == pytest.approx(result["averageScoreClasses"], abs=1e-12)
    assert d2_miou == pytest.approx(cs_miou, abs=1e-4)
    assert 0.05 < cs_miou < 0.95


def _cs_ignored(name):
    from cityscapesscripts.helpers.labels import name2label

    return name2label[name].ignoreInEval


# ---------------------------------------- the generated toy dataset, first used by several processes
def _generate_and_read(root, barrier, queue):
    """One of several processes using a fresh toy folder at once: generate, then read it all."""
    import hashlib

    from sgr_d2.data import toy

    try:
        barrier.wait(timeout=120)  # every process starts generating at the same moment
        toy.generate_toy_split("val", root)
        reads = []
        for _ in range(3):  # reading on while the others may still be writing
            reads.append({sub: [(f.name, hashlib.sha1(f.read_bytes()).hexdigest())
                                for f in sorted((root / sub / "val").iterdir())]
                          for sub in ("images", "annotations", "instances")})
        queue.put(("ok", reads))
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        queue.put(("error", f"{type(e).__name__}: {e}"))


def test_toy_generation_is_safe_for_concurrent_first_use(tmp_path):
    import multiprocessing as mp

    from sgr_d2.data.toy import TOY_SPLITS, draw_scene

    root = tmp_path / "sgr_toy"
    ctx = mp.get_context("fork")  # cheap: the children share this process's imports
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_generate_and_read, args=(root, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok"] * n, [r[1] for r in results if r[0] != "ok"]
    reads = [read for r in results for read in r[1]]
    count, seed = TOY_SPLITS["val"]
    assert all(len(read[sub]) == count for read in reads for sub in read)  # complete
    assert all(read == reads[0] for read in reads)  # and identical for every process, every time
    # the labels are the scenes drawn from the split's seeds (PNG is lossless)
    for i in (0, count - 1):
        sem = np.asarray(Image.open(root / "annotations" / "val" / f"{i:04d}.png"))
        np.testing.assert_array_equal(sem, draw_scene(seed + i)[1])
    assert not [p.name for p in root.iterdir() if "-tmp-" in p.name]  # no temporary folder left
