"""The panoptic toy (sgr_d2/data/toy_panoptic.py): deterministic files in the COCO panoptic format
that detectron2 reads, semantic maps derived from them, objects of one class that touch (one
connected component, several instances), and the PQ / trivial baseline it is compared against."""
import importlib.util
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import REPO
from PIL import Image
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog

from sgr_d2.data import toy_panoptic as tp
from sgr_d2.sgr import component_label_map

VAL = "sgr_toy_panoptic_val_with_sem_seg"


def _decode(path):
    """Segment ids of a panoptic PNG, read with PIL: R + 256 G + 256² B."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _gt(split):
    meta = MetadataCatalog.get(f"sgr_toy_panoptic_{split}_with_sem_seg")
    DatasetCatalog.get(f"sgr_toy_panoptic_{split}_with_sem_seg")  # generates the split
    with open(meta.panoptic_json) as f:
        return meta, json.load(f)


def test_generation_is_deterministic(tmp_path):
    a, b = tp.draw_panoptic_scene(8001), tp.draw_panoptic_scene(8001)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2]
    assert not np.array_equal(a[0], tp.draw_panoptic_scene(8002)[0])
    meta, _ = _gt("val")
    default_root = os.path.dirname(meta.image_root)
    tp.generate_panoptic_split("val", tmp_path)  # a second, independent generation
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and ".lock" not in p.name)
    assert len(files) == 3 * 40 + 2 + 1  # images, panoptic and semantic PNGs, two JSON files, the stamp
    for rel in files:
        assert (tmp_path / rel).read_bytes() == open(os.path.join(default_root, rel), "rb").read(), rel
    # the files are the scenes of the split's seeds
    n, seed = tp.PANOPTIC_SPLITS["val"]
    np.testing.assert_array_equal(_decode(tmp_path / "panoptic_val" / "0039.png"), tp.draw_panoptic_scene(seed + n - 1)[1])
    with pytest.raises(KeyError, match="not 'test'"):
        tp.generate_panoptic_split("test", tmp_path)


def test_panoptic_pngs_decode_to_exactly_the_segments_info():
    assert tp.rgb2id(tp.id2rgb(np.array([[0x030201, 0]]))).tolist() == [[0x030201, 0]]
    assert tp.id2rgb(np.array([[0x030201]])).tolist() == [[[1, 2, 3]]]  # R is the low byte
    meta, gt = _gt("val")
    categories = {c["id"]: c for c in gt["categories"]}
    assert [c["name"] for c in gt["categories"]] == ["ball", "box", "kite", "sky", "grass", "wall"]
    assert [c["isthing"] for c in gt["categories"]] == [1, 1, 1, 0, 0, 0]
    assert {im["id"] for im in gt["images"]} == {a["image_id"] for a in gt["annotations"]}
    big_ids = void_images = 0
    for ann in gt["annotations"]:
        ids = _decode(os.path.join(meta.panoptic_root, ann["file_name"]))
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert len(segments) == len(ann["segments_info"])  # ids unique within the image
        assert set(np.unique(ids).tolist()) - {0} == set(segments)
        void_images += bool((ids == 0).any())
        big_ids += sum(i >= 65536 for i in segments)  # the blue channel carries ids too
        for sid, s in segments.items():
            ys, xs = np.nonzero(ids == sid)
            assert s["area"] == len(ys)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["category_id"] in categories and s["iscrowd"] == 0
        # one segment per stuff class present
        stuff = [s["category_id"] for s in segments.values() if not categories[s["category_id"]]["isthing"]]
        assert len(stuff) == len(set(stuff)) >= 2
    assert big_ids > 100 and 5 <= void_images < 40


def test_semantic_png_is_the_panoptic_mapped_to_contiguous_classes():
    meta, gt = _gt("val")
    contiguous = meta.stuff_dataset_id_to_contiguous_id  # every category: things 0-2, stuff 3-5
    assert contiguous == {2: 0, 4: 1, 7: 2, 10: 3, 12: 4, 15: 5}
    for ann in gt["annotations"][:10]:
        ids = _decode(os.path.join(meta.panoptic_root, ann["file_name"]))
        expected = np.full(ids.shape, 255)
        for s in ann["segments_info"]:
            expected[ids == s["id"]] = contiguous[s["category_id"]]
        sem = np.asarray(Image.open(os.path.join(meta.sem_seg_root, ann["file_name"])))
        assert sem.dtype == np.uint8 and sem.ndim == 2
        np.testing.assert_array_equal(sem, expected)


def test_detectron2_reads_the_dataset_with_the_coco_panoptic_metadata():
    for split, count in (("train", 160), ("val", 40)):
        plain = DatasetCatalog.get(f"sgr_toy_panoptic_{split}")
        with_sem = DatasetCatalog.get(f"sgr_toy_panoptic_{split}_with_sem_seg")
        assert len(plain) == len(with_sem) == count
        assert "sem_seg_file_name" not in plain[0] and os.path.isfile(with_sem[0]["sem_seg_file_name"])
        assert os.path.isfile(plain[-1]["file_name"]) and plain[-1]["file_name"].endswith(".jpg")
        meta = MetadataCatalog.get(f"sgr_toy_panoptic_{split}")
        assert meta.evaluator_type == "coco_panoptic_seg" and meta.label_divisor == 1000 and meta.ignore_label == 255
        assert meta.thing_classes == ["ball", "box", "kite"]
        assert meta.stuff_classes == ["ball", "box", "kite", "sky", "grass", "wall"]
        assert meta.thing_dataset_id_to_contiguous_id == {2: 0, 4: 1, 7: 2}
        assert meta.stuff_dataset_id_to_contiguous_id == {10: 3, 12: 4, 15: 5}  # detectron2's standard
    # load_coco_panoptic_json turned the dataset ids into contiguous ones
    meta, gt = _gt("val")
    d = DatasetCatalog.get(VAL)[3]
    raw = next(a for a in gt["annotations"] if a["image_id"] == d["image_id"])
    assert [(s["id"], s["category_id"], s["isthing"]) for s in d["segments_info"]] == [
        (s["id"], meta.stuff_dataset_id_to_contiguous_id[s["category_id"]], s["category_id"] in (2, 4, 7))
        for s in raw["segments_info"]]
    # the COCO instance file (COCOEvaluator's ground truth): one RLE annotation per thing segment
    coco = COCO(meta.json_file)
    assert sorted(coco.getCatIds()) == sorted(meta.thing_dataset_id_to_contiguous_id)
    ids = _decode(d["pan_seg_file_name"])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[d["image_id"]]))
    things = [s for s in raw["segments_info"] if s["category_id"] in (2, 4, 7)]
    assert len(anns) == len(things) > 0
    for a, s in zip(anns, things):
        assert a["category_id"] == s["category_id"]
        np.testing.assert_array_equal(mask_util.decode(coco.annToRLE(a)).astype(bool), ids == s["id"])


def test_objects_of_one_class_touch_in_one_component():
    # scene 8003, drawn and checked by hand: two balls pressed together, three boxes apart, a kite
    rgb, pan, segments = tp.draw_panoptic_scene(8003)
    names = {c["id"]: c["name"] for c in tp.PANOPTIC_CATEGORIES}
    sem = np.full(pan.shape, 255, np.uint8)
    for s in segments:
        sem[pan == s["id"]] = tp.PANOPTIC_CLASSES.index(names[s["category_id"]])
    labels, classes = component_label_map(sem)
    count = {name: sum(names[s["category_id"]] == name for s in segments) for name in ("ball", "box", "kite")}
    components = {name: int((classes == tp.PANOPTIC_CLASSES.index(name)).sum()) for name in count}
    assert count == {"ball": 2, "box": 3, "kite": 1}
    assert components == {"ball": 1, "box": 3, "kite": 1}  # 2 instances, 1 connected component
    # where the two balls meet, the image shows the boundary: the later ball's dark rim
    a, b = [pan == s["id"] for s in segments if names[s["category_id"]] == "ball"]
    contact = b & (np.roll(a, 1, 0) | np.roll(a, -1, 0) | np.roll(a, 1, 1) | np.roll(a, -1, 1))
    interior = b & ~contact
    brightness = rgb.astype(float).sum(axis=2)
    assert contact.sum() >= 5 and brightness[contact].mean() < 0.75 * brightness[interior].mean()


def test_the_stats_tool_prints_the_figures_of_docs_method(capsys):
    """docs/method.md quotes the tables of `python tools/panoptic_toy_stats.py`; the figures are
    checked against an independent count on the validation split."""
    spec = importlib.util.spec_from_file_location("_pan_stats", f"{REPO}/tools/panoptic_toy_stats.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stats, base = tool.main([])
    out = capsys.readouterr().out
    with open(os.path.join(REPO, "docs", "method.md")) as f:
        doc = f.read()
    tables = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(tables) == 5 and all(line in doc for line in tables), out
    assert 0.6 < stats["val"]["merged_fraction"] < 0.8 and 0.6 < stats["train"]["merged_fraction"] < 0.8
    assert base["stuff_class"] == "grass" and base["PQ_th"] == 0.0
    # independently: count the val objects whose class region also holds another object
    meta, gt = _gt("val")
    merged = total = 0
    for ann in gt["annotations"]:
        ids = _decode(os.path.join(meta.panoptic_root, ann["file_name"]))
        sem = np.asarray(Image.open(os.path.join(meta.sem_seg_root, ann["file_name"])))
        labels, _ = component_label_map(sem)
        things = [s["id"] for s in ann["segments_info"] if s["category_id"] in (2, 4, 7)]
        comp_of = {i: set(np.unique(labels[ids == i]).tolist()) for i in things}
        total += len(things)
        merged += sum(any(comp_of[i] & comp_of[j] for j in things if j != i) for i in things)
    assert (stats["val"]["instances"], stats["val"]["merged"]) == (total, merged)


def _write(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def _pan_png(path, ids):
    ids = np.asarray(ids)
    return _write(path, np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1))


def test_panoptic_quality_on_hand_made_images():
    """Two 4x4 images, categories A (thing, 1), B (stuff, 2), C (thing, 3: absent, not averaged)."""
    cats = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 1}]
    # image 1: gt 1, 2 (A, 4 px each), 3 (B, 7 px), one void pixel
    gt1 = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [3, 3, 3, 0]]
    pred1 = [[5, 5, 5, 6], [5, 5, 6, 6], [6, 6, 6, 7], [7, 7, 7, 7]]
    # pred 5 (A): IoU 4/5 with gt 1, a TP. pred 6 (A): IoU 3/7 with gt 2: gt 2 an FN, pred 6 an FP.
    # pred 7 (B): 4 px of gt 3 and the void pixel: IoU 4 / (5 + 7 - 4 - 1) = 4/7 > 0.5, a TP
    # (without leaving void out of the union, 4/8 would be no match)
    segs1 = ([{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2}],
             [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 7, "category_id": 2}])
    # image 2: gt 4 (B, 8 px), 9 (A, crowd, 4 px), void 4 px. pred 1 = gt 4 (IoU 1); pred 2 (A) on
    # the crowd region and pred 3 (B) on void are ignored, not FPs
    gt2 = [[4, 4, 4, 4], [4, 4, 4, 4], [9, 9, 0, 0], [9, 9, 0, 0]]
    pred2 = [[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    segs2 = ([{"id": 4, "category_id": 2, "iscrowd": 0}, {"id": 9, "category_id": 1, "iscrowd": 1}],
             [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2}])
    res = tp.panoptic_quality([(gt1, segs1[0], pred1, segs1[1]), (gt2, segs2[0], pred2, segs2[1])], cats)
    # A: ΣIoU 0.8, TP 1, FP 1, FN 1 -> PQ 0.4, SQ 0.8, RQ 0.5; B: ΣIoU 4/7 + 1, TP 2 -> PQ = SQ = 11/14, RQ 1
    assert res["PQ_th"] == pytest.approx(40.0) and res["SQ_th"] == pytest.approx(80.0) and res["RQ_th"] == pytest.approx(50.0)
    assert res["PQ_st"] == pytest.approx(100 * 11 / 14) and res["RQ_st"] == pytest.approx(100.0)
    assert res["PQ"] == pytest.approx(100 * (0.4 + 11 / 14) / 2) and res["RQ"] == pytest.approx(75.0)
    with pytest.raises(KeyError, match=r"prediction map holds segment ids \[7\]"):
        tp.panoptic_quality([(gt1, segs1[0], pred1, segs1[1][:2])], cats)


def test_trivial_baseline_on_a_hand_made_two_image_dataset(tmp_path, register):
    """Classes: 0 dot (thing), 1 sea, 2 sand (stuff). The training images hold more dot than
    sand pixels and more sand (6) than sea pixels (3 + 1), but sea in more images: the baseline
    predicts sand everywhere."""
    names = ["dot", "sea", "sand"]
    meta = {"stuff_classes": names, "thing_classes": ["dot"], "thing_dataset_id_to_contiguous_id": {1: 0}}
    train = register([
        {"file_name": "t1.jpg", "image_id": 1, "segments_info": [
            {"id": 3, "category_id": 1, "area": 3, "isthing": False},
            {"id": 1, "category_id": 0, "area": 7, "isthing": True},
            {"id": 2, "category_id": 2, "area": 6, "isthing": False}]},
        {"file_name": "t2.jpg", "image_id": 2, "segments_info": [
            {"id": 3, "category_id": 1, "area": 1, "isthing": False},
            {"id": 1, "category_id": 0, "area": 15, "isthing": True}]}], **meta)
    # val 1: sand 10 px, sea 6 -> sand IoU 10/16 (TP), sea an FN
    pan1 = np.array([[7] * 4, [7] * 4, [7, 7, 8, 8], [8, 8, 8, 8]])
    sem1 = np.where(pan1 == 7, 2, 1)
    # val 2: sand 5, dot 4, sea 5, void 2 -> sand IoU 5/14: an FN and an FP; dot and sea FNs
    pan2 = np.array([[7, 7, 7, 7], [7, 5, 5, 0], [9, 5, 5, 0], [9, 9, 9, 9]])
    sem2 = np.select([pan2 == 7, pan2 == 5, pan2 == 9], [2, 0, 1], 255)
    dicts = []
    for i, (pan, sem, segs) in enumerate(((pan1, sem1, [(7, 2), (8, 1)]), (pan2, sem2, [(7, 2), (5, 0), (9, 1)]))):
        dicts.append({"file_name": str(tmp_path / f"{i}.jpg"), "image_id": i + 1,
                      "pan_seg_file_name": _pan_png(tmp_path / f"pan{i}.png", pan),
                      "sem_seg_file_name": _write(tmp_path / f"sem{i}.png", sem),
                      "segments_info": [{"id": s, "category_id": c, "iscrowd": 0, "isthing": c == 0,
                                         "area": int((pan == s).sum())} for s, c in segs]})
    val = register(dicts, **meta)
    res = tp.trivial_baseline(train, val)
    assert res["stuff_class"] == "sand"
    # sand: ΣIoU 0.625, TP 1, FP 1, FN 1 -> PQ 0.3125; sea and dot 0; averaged over the 3 classes
    assert res["PQ"] == pytest.approx(100 * 0.3125 / 3) and res["PQ_st"] == pytest.approx(100 * 0.3125 / 2)
    assert res["PQ_th"] == 0.0 and res["SQ_st"] == pytest.approx(100 * 0.625 / 2)
    # mIoU: sand 15 px right of 30 labelled pixels (IoU 1/2), sea and dot 0
    assert res["mIoU"] == pytest.approx(100 * 0.5 / 3)


def test_the_panoptic_demo_prints_the_model_beside_the_trivial_baseline_and_draws_both(tmp_path, capsys):
    """tools/demo_toy.py --task panoptic, past its training: a model that predicts the ground
    truth draws a prediction panel equal to the ground-truth panel (a swapped segment map or
    segments_info, or a panel of another image, would differ), and the table puts the model's
    figures beside the trivial baseline's (docs/method.md: PQ 4.31, mIoU 8.07)."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(REPO, "tools"))
    spec = importlib.util.spec_from_file_location("_demo_toy", f"{REPO}/tools/demo_toy.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    d = DatasetCatalog.get(VAL)[0]
    truth = {"panoptic_seg": (torch.as_tensor(tp.read_panoptic(d)), d["segments_info"])}
    metrics = {"panoptic_seg/PQ": 61.25, "panoptic_seg/PQ_th": 50.5, "panoptic_seg/PQ_st": 72.0,
               "segm/AP": 40.75, "sem_seg/mIoU": 80.5}
    _, base = demo._panoptic_report(lambda bgr: truth, metrics, "sgr_toy_panoptic_train", VAL, tmp_path)
    out = capsys.readouterr().out
    rows = {line.split()[0] + (" " + line.split()[1] if not line.split()[1][0].isdigit() else ""):
            line.split()[-2:] for line in out.splitlines() if line[:2] in ("PQ", "ma", "mI")}
    assert rows == {"PQ": ["61.25", "4.31"], "PQ things": ["50.50", "0.00"], "PQ stuff": ["72.00", "8.62"],
                    "mask AP": ["40.75", "0.00"], "mIoU": ["80.50", "8.07"]}
    with Image.open(tmp_path / "panoptic.png") as im:
        fig = np.asarray(im.convert("RGB"))
    assert fig.shape == (400, 1200, 3)  # three 4-inch panels at dpi 100
    # the three panels: the non-white column spans below the titles (which give the segment counts)
    body = fig[40:].astype(int)
    edges = np.flatnonzero(np.diff((body.sum(-1) < 765).any(0).astype(int))) + 1
    assert len(edges) == 6
    image, truth_panel, pred = (body[:, lo:lo + edges[1] - edges[0]] for lo in edges[::2])
    # the same drawing, up to the resampling of the panels' sub-pixel positions (0.33 here; 2.1
    # with thing colours that differ between panels, 20 against the bare image)
    assert np.abs(pred - truth_panel).mean() < 1.0 < 10.0 < np.abs(image - truth_panel).mean()
    assert not (tmp_path / "concept_regions.png").exists()  # no sgr_regions: no concept figure
    # README's `make demo DEMO_TASK=panoptic` reaches this report with the SGR panoptic config
    with open(os.path.join(REPO, "Makefile")) as f:
        assert "tools/demo_toy.py --task $(DEMO_TASK)" in f.read()
    assert demo.CONFIGS["panoptic"] == "configs/toy/mask2former_r18_panoptic_sgr.yaml"
