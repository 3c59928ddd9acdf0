"""Panoptic and instance datasets: the prepare scripts and registered loaders on fixtures in the
raw official layouts (tests/fixtures_layouts.py), and the panoptic / instance / LSJ mappers.

Every expectation is written by hand from the two scenes of fixtures_layouts (scene 0: sky 480
px, road 580 px in two pieces, persons A and B of 128 px touching, a car of 176 px, a crowd of
12 px, a VOID patch of 32 px; scene 1: sky 768, road 528, car 240).
"""
import sgr_d2  # noqa: F401  (must precede detectron2 imports: compatibility shims)

import json
import os

import fixtures_layouts as fl
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image

from sgr_d2.config import load_config
from sgr_d2.data import InstanceDatasetMapper, PanopticDatasetMapper, SemSegDatasetMapper, build_mapper
from sgr_d2.data.augmentation import PhotometricDistortion
from sgr_d2.data.datasets import DatasetLayoutError

H, W = fl.H, fl.W


def _read(path):
    return np.asarray(Image.open(path))


def _rect(rows, cols, shape=(H, W)):
    m = np.zeros(shape, dtype=bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


PERSON_A, PERSON_B = _rect((12, 28), (4, 12)), _rect((12, 28), (12, 20))
CAR_0 = _rect((10, 32), (28, 36))


def _segments(d):
    return [(s["id"], s["category_id"], s.get("isthing"), s["iscrowd"]) for s in d["segments_info"]]


# ----------------------------------------------------------------------------------------- COCO
def test_coco_semantic_maps_loaders_and_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    base = fl.write_coco(tmp_path)
    with pytest.raises(DatasetLayoutError) as e:  # before preparation: names the folder and the script
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert str(base / "panoptic_semseg_val2017") in str(e.value)
    assert "prepare_coco_semantic_annos_from_panoptic_annos.py" in str(e.value)
    fl.prepare("prepare_coco_semantic_annos_from_panoptic_annos", tmp_path)
    sem = _read(base / "panoptic_semseg_val2017" / "000000000001.png")
    # index among the 133 panoptic categories: sky-other-merged 119, road 100, person 0, car 2;
    # the crowd keeps its class, VOID is 255
    assert sem.dtype == np.uint8 and sem.shape == (H, W)
    assert (sem[:10] == 119).all() and sem[10, 0] == 100 and sem[31, 47 - 8] == 100
    assert (sem[PERSON_A | PERSON_B] == 0).all() and (sem[CAR_0] == 2).all()
    assert (sem[29:, :4] == 0).all() and (sem[28:, 40:] == 255).all()
    assert dict(zip(*np.unique(sem, return_counts=True))) == {0: 268, 2: 176, 100: 580, 119: 480, 255: 32}
    assert dict(zip(*np.unique(_read(base / "panoptic_semseg_val2017" / "000000000002.png"),
                               return_counts=True))) == {2: 240, 100: 528, 119: 768}

    dicts = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert [d["image_id"] for d in dicts] == [1, 2]
    d = dicts[0]
    assert d["file_name"] == str(base / "val2017" / "000000000001.jpg")
    assert d["pan_seg_file_name"] == str(base / "panoptic_val2017" / "000000000001.png")
    assert d["sem_seg_file_name"] == str(base / "panoptic_semseg_val2017" / "000000000001.png")
    assert _segments(d) == [(5263440, 119, False, 0), (2301, 100, False, 0), (9934, 0, True, 0),
                            (9935, 0, True, 0), (4180097, 2, True, 0), (777, 0, True, 1)]
    plain = DatasetCatalog.get("coco_2017_val_panoptic")
    assert "sem_seg_file_name" not in plain[0] and _segments(plain[0]) == _segments(d)
    inst = DatasetCatalog.get("coco_2017_val")[0]
    assert [(a["category_id"], a["iscrowd"]) for a in inst["annotations"]] == [(0, 0), (0, 0), (2, 0), (0, 1)]

    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    plain_meta = MetadataCatalog.get("coco_2017_val_panoptic")
    assert meta.evaluator_type == plain_meta.evaluator_type == "coco_panoptic_seg"
    assert meta.panoptic_json == str(base / "annotations" / "panoptic_val2017.json")
    assert meta.json_file == str(base / "annotations" / "instances_val2017.json")
    assert len(meta.thing_classes) == 80 and len(meta.stuff_classes) == 133 and meta.label_divisor == 1000
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 133 and len(plain_meta.stuff_dataset_id_to_contiguous_id) == 53
    assert meta.thing_dataset_id_to_contiguous_id[3] == 2 and meta.stuff_dataset_id_to_contiguous_id[187] == 119
    assert MetadataCatalog.get("coco_2017_val").evaluator_type == "coco"

    ann = json.loads((base / "annotations" / "panoptic_train2017.json").read_text())
    ann["annotations"][1]["segments_info"][0]["category_id"] = 183  # not a panoptic category
    (base / "annotations" / "panoptic_train2017.json").write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="category id 183") as e:
        fl.prepare("prepare_coco_semantic_annos_from_panoptic_annos", tmp_path)
    assert str(base / "panoptic_train2017" / "000000000002.png") in str(e.value)


# --------------------------------------------------------------------------------------- ADE20K
def test_ade20k_panoptic_and_instance_annotations(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    base = fl.write_ade20k(tmp_path)
    # the two raw annotations overlap, as in ADE20K: the car's instance covers one more column,
    # which the semantic map calls road
    inst_file = base / "annotations_instance" / "validation" / "ADE_val_00000001.png"
    inst = _read(inst_file).copy()
    inst[10:32, 36] = (9, 3, 0)
    Image.fromarray(inst).save(inst_file)
    for step in fl.PREPARE_STEPS["ade20k"]:
        fl.prepare(step, tmp_path)

    pan = json.loads((base / "ade20k_panoptic_val.json").read_text())
    assert pan["images"][0] == {"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "width": W, "height": H}
    assert len(pan["categories"]) == 150 and sum(c["isthing"] for c in pan["categories"]) == 100
    assert pan["categories"][12] == {"id": 12, "name": "person", "isthing": 1, "color": [150, 5, 61]}
    assert pan["categories"][6]["isthing"] == 0  # road
    a0 = pan["annotations"][0]
    assert a0["image_id"] == "ADE_val_00000001" and a0["file_name"] == "ADE_val_00000001.png"
    # stuff first (one segment per class), then the objects; ids (class + 1) * 1000 + instance id;
    # the road's area is its semantic area before the car is drawn over it (the official numbers)
    assert [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in a0["segments_info"]] == [
        (3000, 2, 480, [0, 0, 48, 10]), (7000, 6, 580, [0, 10, 48, 22]), (13001, 12, 128, [4, 12, 8, 16]),
        (13002, 12, 128, [12, 12, 8, 16]), (21003, 20, 198, [28, 10, 9, 22])]
    ids = _read(base / "ade20k_panoptic_val" / "ADE_val_00000001.png").astype(np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    assert (ids[10:32, 36] == 21003).all() and (ids == 7000).sum() == 558
    assert (ids[29:, :4] == 0).all()  # person in the semantic map, no instance: VOID
    assert (ids[28:, 40:] == 0).all() and (ids[PERSON_B] == 13002).all()

    ins = json.loads((base / "ade20k_instance_val.json").read_text())
    assert len(ins["categories"]) == 100 and ins["categories"][3] == {"id": 12, "name": "person"}
    assert [(a["id"], a["image_id"], a["category_id"], a["area"], a["iscrowd"]) for a in ins["annotations"]] == [
        (1, "ADE_val_00000001", 12, 128, 0), (2, "ADE_val_00000001", 12, 128, 0),
        (3, "ADE_val_00000001", 20, 198, 0), (4, "ADE_val_00000002", 20, 240, 0)]
    assert ins["annotations"][1]["bbox"] == [12, 12, 8, 16]
    np.testing.assert_array_equal(mask_util.decode(ins["annotations"][0]["segmentation"]), PERSON_A)

    d = DatasetCatalog.get("ade20k_panoptic_val")[1]
    assert d["file_name"] == str(base / "images" / "validation" / "ADE_val_00000002.jpg")
    assert d["sem_seg_file_name"] == str(base / "annotations_detectron2" / "validation" / "ADE_val_00000002.png")
    assert _segments(d) == [(3000, 2, False, 0), (7000, 6, False, 0), (21001, 20, True, 0)]
    d = DatasetCatalog.get("ade20k_instance_val")[0]
    assert [a["category_id"] for a in d["annotations"]] == [3, 3, 8]  # person, car among the 100 things
    meta = MetadataCatalog.get("ade20k_panoptic_val")
    assert meta.evaluator_type == "ade20k_panoptic_seg" and meta.json_file == str(base / "ade20k_instance_val.json")
    assert meta.thing_dataset_id_to_contiguous_id[12] == 12 and 6 not in meta.thing_dataset_id_to_contiguous_id
    assert len(meta.stuff_dataset_id_to_contiguous_id) == 150 and meta.thing_classes[3] == "person"
    imeta = MetadataCatalog.get("ade20k_instance_val")
    assert imeta.evaluator_type == "coco" and imeta.thing_dataset_id_to_contiguous_id[20] == 8

    outputs = [base / "ade20k_panoptic_val.json", base / "ade20k_instance_val.json",
               *sorted((base / "ade20k_panoptic_val").iterdir())]
    before = {p: os.stat(p).st_mtime_ns for p in outputs}
    fl.prepare("prepare_ade20k_pan_seg", tmp_path)
    fl.prepare("prepare_ade20k_ins_seg", tmp_path)
    assert {p: os.stat(p).st_mtime_ns for p in outputs} == before  # up to date: nothing rewritten


def test_ade20k_prepare_errors_name_the_missing_input(tmp_path):
    base = fl.write_ade20k(tmp_path)
    missing = base / "annotations_instance" / "validation" / "ADE_val_00000002.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as e:
        fl.prepare("prepare_ade20k_pan_seg", tmp_path)
    assert str(missing) in str(e.value) and "annotations_instance" in str(e.value)
    assert not (base / "ade20k_panoptic_train").exists()  # checked before writing anything
    Image.fromarray(np.full((H, W, 3), (101, 1, 0), dtype=np.uint8)).save(missing)  # category 101
    with pytest.raises(ValueError, match=r"category values \[101\]") as e:
        fl.prepare("prepare_ade20k_ins_seg", tmp_path)
    assert str(missing) in str(e.value)


# ----------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_panoptic_and_instance_loaders(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    base = fl.write_cityscapes(tmp_path)
    fl.prepare("prepare_cityscapes_sem_seg", tmp_path)
    with pytest.raises(DatasetLayoutError) as e:
        DatasetCatalog.get("cityscapes_fine_panoptic_val")
    assert str(base / "gtFine" / "cityscapes_panoptic_val.json") in str(e.value)
    assert "createPanopticImgs" in str(e.value)
    fl.prepare("cityscapes_panoptic", tmp_path)

    d = sorted(DatasetCatalog.get("cityscapes_fine_panoptic_val"), key=lambda d: d["image_id"])[0]
    assert d["image_id"] == "lindau_000000_000019"
    assert d["sem_seg_file_name"].endswith("lindau_000000_000019_gtFine_labelTrainIds.png")
    # label-id segments: road 7, sky 23, the persongroup 24 (a crowd), persons 24000/24001, car 26000;
    # categories are train ids: road 0, sky 10, person 11, car 13
    assert sorted((s["id"], s["category_id"], s["iscrowd"], s["area"]) for s in d["segments_info"]) == [
        (7, 0, 0, 580), (23, 10, 0, 480), (24, 11, 1, 12), (24000, 11, 0, 128), (24001, 11, 0, 128),
        (26000, 13, 0, 176)]
    meta = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert meta.panoptic_root == str(base / "gtFine" / "cityscapes_panoptic_val")
    assert meta.gt_dir == str(base / "gtFine" / "val") and meta.evaluator_type == "cityscapes_panoptic_seg"
    inst = {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get("cityscapes_fine_instance_seg_val")}
    annotations = inst["lindau_000000_000019_leftImg8bit.png"]["annotations"]
    # detectron2's contiguous thing ids: person 0, car 2; the persongroup is a crowd
    assert sorted((a["category_id"], bool(a["iscrowd"])) for a in annotations) == [
        (0, False), (0, False), (0, True), (2, False)]
    assert MetadataCatalog.get("cityscapes_fine_instance_seg_val").gt_dir == str(base / "gtFine" / "val")


# -------------------------------------------------------------------------------------- mappers
def _panoptic_mapper(component_mode="connected", augmentations=(), lsj=False, pad_size=(40, 56)):
    return PanopticDatasetMapper(True, augmentations=list(augmentations), image_format="RGB", ignore_label=255,
                                 num_classes=133, pad_size=pad_size, image_pad_value=128, lsj=lsj,
                                 component_mode=component_mode, thing_classes=frozenset(range(80)))


def _dict(name, i=0):
    return sorted(DatasetCatalog.get(name), key=lambda d: d["file_name"])[i]


@pytest.fixture
def layouts(layouts_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(layouts_root))
    return layouts_root


def test_panoptic_mapper_masks_labels_and_both_component_modes(layouts):
    d = _dict("coco_2017_val_panoptic_with_sem_seg")
    out = _panoptic_mapper()(d)
    image = out["image"].numpy()
    assert image.shape == (3, 40, 56) and (image[:, 32:] == 128).all() and (image[:, :, 48:] == 128).all()
    np.testing.assert_array_equal(image[:, :32, :48], read_image(d["file_name"], "RGB").transpose(2, 0, 1))
    sem = out["sem_seg"].numpy()
    np.testing.assert_array_equal(sem[:32, :48], _read(d["sem_seg_file_name"]))
    assert (sem[32:] == 255).all() and (sem[:, 48:] == 255).all()
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [119, 100, 0, 0, 2]  # the crowd has no mask
    masks = inst.gt_masks.numpy()
    assert masks.shape == (5, 40, 56) and masks.dtype == bool
    np.testing.assert_array_equal(masks[2, :32, :48], PERSON_A)
    np.testing.assert_array_equal(masks[4, :32, :48], CAR_0)
    assert masks.sum(axis=(1, 2)).tolist() == [480, 580, 128, 128, 176]
    labels = out["components"]["labels"].numpy()
    # connected: the touching persons are one component, the road (cut by the car) two
    assert out["components"]["classes"].tolist() == [0, 2, 100, 100, 119]
    assert labels[12, 4] == labels[12, 19] == 0 and labels[10, 0] == 2 and labels[10, 47] == 3
    assert labels[30, 1] == labels[30, 45] == labels[35, 50] == -1  # crowd, VOID, padding
    out = _panoptic_mapper("instances")(d)
    labels = out["components"]["labels"].numpy()
    # instances: persons A and B, the car, then the road's two pieces and the sky
    assert out["components"]["classes"].tolist() == [0, 0, 2, 100, 100, 119]
    assert labels[12, 4] == 0 and labels[12, 19] == 1 and labels[20, 30] == 2
    assert labels[30, 1] == labels[30, 45] == -1


def test_panoptic_mapper_transforms_the_panoptic_map_with_the_image(layouts):
    d = _dict("coco_2017_val_panoptic_with_sem_seg")
    out = _panoptic_mapper(augmentations=[T.RandomFlip(prob=1.0)], pad_size=None)(d)
    np.testing.assert_array_equal(out["image"].numpy(), read_image(d["file_name"], "RGB")[:, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(out["sem_seg"].numpy(), _read(d["sem_seg_file_name"])[:, ::-1])
    np.testing.assert_array_equal(out["instances"].gt_masks[2].numpy(), PERSON_A[:, ::-1])
    assert out["components"]["labels"][12, 47 - 4] == out["components"]["labels"][12, 47 - 19] >= 0


def test_lsj_mappers_output_image_size_with_the_official_padding(layouts):
    cfg = load_config("", ["INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0",
                           "INPUT.RANDOM_FLIP", "none", "INPUT.DATASET_MAPPER_NAME", "coco_panoptic_lsj",
                           "DATASETS.TRAIN", "('coco_2017_train_panoptic',)",
                           "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "133"])
    mapper = build_mapper(cfg, True)
    assert isinstance(mapper, PanopticDatasetMapper) and mapper.lsj
    out = mapper(_dict("coco_2017_train_panoptic"))
    # 32x48 scaled by min(64/32, 64/48) = 4/3 to 43x64, padded with 128 to 64x64
    image = out["image"].numpy()
    assert image.shape == (3, 64, 64) and (image[:, 43:] == 128).all() and not (image[:, :43] == 128).all()
    inst = out["instances"]
    assert "sem_seg" not in out and inst.gt_masks.shape == (5, 64, 64) and not inst.gt_masks[:, 43:].any()
    # nearest resampling: output row r shows input row floor((r + 0.5) * 32 / 43); rows 0-12 are sky
    assert inst.gt_boxes.tensor[0].tolist() == [0, 0, 64, 13]
    cfg.defrost()
    cfg.INPUT.DATASET_MAPPER_NAME, cfg.DATASETS.TRAIN = "coco_instance_lsj", ("coco_2017_train",)
    out = build_mapper(cfg, True)(_dict("coco_2017_train"))
    assert out["image"].shape == (3, 64, 64) and (out["image"][:, 43:] == 128).all()
    assert out["padding_mask"][43:].all() and not out["padding_mask"][:43].any()
    assert out["instances"].gt_classes.tolist() == [0, 0, 2] and out["instances"].gt_boxes.tensor.shape == (3, 4)


def test_instance_mapper_drops_crowds_pads_and_splits_components(layouts):
    d = _dict("coco_2017_val")
    kwargs = dict(augmentations=[], image_format="RGB", ignore_label=255, num_classes=80, pad_size=(40, 56),
                  image_pad_value=128)
    out = InstanceDatasetMapper(True, component_mode="connected", **kwargs)(d)
    assert (out["image"][:, 32:] == 128).all()
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 0, 2] and inst.gt_masks.shape == (3, 40, 56)
    np.testing.assert_array_equal(inst.gt_masks[1, :32, :48].numpy(), PERSON_B)
    assert out["components"]["classes"].tolist() == [0, 2]  # A and B touch: one component
    assert out["components"]["labels"][30, 1] == -1  # the crowd is dropped
    out = InstanceDatasetMapper(True, component_mode="instances", **kwargs)(d)
    assert out["components"]["classes"].tolist() == [0, 0, 2]
    assert out["components"]["labels"][12, 4] != out["components"]["labels"][12, 19]


def test_build_mapper_follows_the_official_recipes_by_name(layouts):
    base = ["DATASETS.TRAIN", "('ade20k_panoptic_train',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150",
            "INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "(16, 16)"]
    cfg = load_config("", base + ["INPUT.DATASET_MAPPER_NAME", "mask_former_panoptic"])
    mapper = build_mapper(cfg, True)
    assert [type(a) for a in mapper.augmentations.augs] == [
        T.ResizeShortestEdge, T.RandomCrop_CategoryAreaConstraint, PhotometricDistortion, T.RandomFlip]
    assert mapper.thing_classes == frozenset(MetadataCatalog.get("ade20k_panoptic_train").thing_dataset_id_to_contiguous_id)
    cfg = load_config("", base + ["INPUT.DATASET_MAPPER_NAME", "mask_former_instance",
                                  "DATASETS.TRAIN", "('ade20k_instance_train',)"])
    mapper = build_mapper(cfg, True)
    assert isinstance(mapper, InstanceDatasetMapper) and not mapper.lsj
    assert [type(a) for a in mapper.augmentations.augs] == [
        T.ResizeShortestEdge, T.RandomCrop, PhotometricDistortion, T.RandomFlip]
    cfg = load_config("", base + ["INPUT.DATASET_MAPPER_NAME", "mask_former_semantic"])
    assert type(build_mapper(cfg, True)) is SemSegDatasetMapper and build_mapper(cfg, True).class_masks
    assert type(build_mapper(cfg, False, "ade20k_panoptic_val")) is SemSegDatasetMapper
    cfg.defrost()
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptics"
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME is 'mask_former_panoptics'"):
        build_mapper(cfg, True)


def test_instance_components_need_instances(layouts):
    with pytest.raises(ValueError, match="MODEL.SGR.COMPONENTS is 'instance'"):
        load_config("", ["MODEL.SGR.COMPONENTS", "instance"])
    cfg = load_config("", ["MODEL.SGR.COMPONENTS", "instances", "DATASETS.TRAIN", "('ade20k_sem_seg_train',)"])
    with pytest.raises(ValueError, match="MODEL.SGR.COMPONENTS is 'instances' but dataset 'ade20k_sem_seg_train'"):
        build_mapper(cfg, True)
    cfg.defrost()
    cfg.DATASETS.TRAIN = ("cityscapes_fine_sem_seg_val",)  # instance maps: *_gtFine_instanceIds.png
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.COLOR_AUG = (32,), 48, False
    mapper = build_mapper(cfg, True)
    mapper.augmentations = T.AugmentationList([])
    d = [d for d in DatasetCatalog.get("cityscapes_fine_sem_seg_val") if "lindau_000000" in d["file_name"]][0]
    out = mapper(d)
    # train ids: road 0, sky 10, person 11, car 13. Instances: persons A, B, the car; then the
    # road's two pieces, the sky, and the crowd (a person region without an instance)
    assert out["components"]["classes"].tolist() == [11, 11, 13, 0, 0, 10, 11]
    mapper.component_mode = "connected"
    assert mapper(d)["components"]["classes"].tolist() == [0, 0, 10, 11, 11, 13]  # A+B, crowd
