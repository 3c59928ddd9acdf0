"""PQ / mask AP / mIoU of the panoptic and instance datasets, through ``Trainer.test`` (what
``--eval-only`` and the periodic evaluation run: the test loader, ``build_evaluators``,
detectron2's ``inference_on_dataset``), on the raw-layout fixtures of tests/fixtures_layouts.py
with a stub model returning the official output formats.

The degraded predictions (scene 0 of fixtures_layouts; scene 1 stays perfect), with the PQ they
give by the official definition (panopticapi's ``pq_compute``):

* persons A and B (128 px each) predicted as one segment: IoU 128/256 = 0.5 with each, not
  > 0.5, so no match: person TP 0, FN 2, FP 1;
* a person segment on the crowd region: more than half of it is crowd of its class, so it is
  no false positive;
* the car (176 px) without its last column (22 px, left VOID): IoU 154/176 = 0.875, matched;
* the road predicted over the VOID patch too: the VOID part leaves the union, IoU 1.

So PQ = (sky 1 + road 1 + car 0.9375 + person 0) / 4 = 73.4375, SQ the same, RQ = 3/4; things
46.875 / 46.875 / 50, stuff 100. The instance output misses person B: person AP = 51/101
(precision 1 up to recall 0.5 on COCO's 101 recall points), car 1, mask AP = 75.2475; on
cityscapesscripts' AP person 0.5, car 1: 75. The semantic output calls the car's last column
road: mIoU = (sky 1 + person 1 + road 1108/1130 + car 394/416) / 4.
"""
import sgr_d2  # noqa: F401  (must precede detectron2 imports: compatibility shims)

import importlib.util
import math

import fixtures_layouts as fl
import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator
from detectron2.structures import Boxes, Instances

from sgr_d2.config import load_config
from sgr_d2.engine.trainer import Trainer
from sgr_d2.evaluation import InstanceSegEvaluator, SGRSemSegEvaluator, TokenSemanticsEvaluator, build_evaluators
from sgr_d2.evaluation.build import CityscapesScriptsSemSegEvaluator

# dataset -> (class -> contiguous id, number of classes); per dataset which outputs it evaluates
CLASSES = {
    "coco_2017_val_panoptic": ({"sky": 119, "road": 100, "person": 0, "car": 2}, 133),
    "coco_2017_val_panoptic_with_sem_seg": ({"sky": 119, "road": 100, "person": 0, "car": 2}, 133),
    "ade20k_panoptic_val": ({"sky": 2, "road": 6, "person": 12, "car": 20}, 150),
    "cityscapes_fine_panoptic_val": ({"sky": 10, "road": 0, "person": 11, "car": 13}, 19),
    "coco_2017_val": ({"person": 0, "car": 2}, 80),
    "ade20k_instance_val": ({"person": 3, "car": 8}, 100),
    "cityscapes_fine_instance_seg_val": ({"person": 0, "car": 2}, 8),
}
SCENE_OF = {"000000000001": 0, "000000000002": 1, "ADE_val_00000001": 0, "ADE_val_00000002": 1,
            **{f"{frame}_leftImg8bit": i for i, (_, frame) in enumerate(fl.CITYSCAPES_FRAMES["val"])}}
MIOU_DEGRADED = 100 * (2 + 1108 / 1130 + 394 / 416) / 4
PQ_DEGRADED = {"PQ": 73.4375, "SQ": 73.4375, "RQ": 75.0, "PQ_th": 46.875, "SQ_th": 46.875, "RQ_th": 50.0,
               "PQ_st": 100.0, "SQ_st": 100.0, "RQ_st": 100.0}
AP_DEGRADED = 100 * (51 / 101 + 1) / 2


def _scene(file_name):
    stem = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return SCENE_OF[stem]


class StubModel(torch.nn.Module):
    """Returns, for each input, the official outputs of a perfect model (or the degraded ones of
    the module docstring on scene 0) in the dataset's class ids: ``panoptic_seg`` (int32 ids,
    segments_info with id / isthing / category_id), ``instances`` (pred_masks, pred_boxes zeros
    as Mask2Former's, scores, pred_classes), ``sem_seg`` (C, H, W) scores."""

    def __init__(self, dataset, degraded):
        super().__init__()
        self.classes, self.num_classes = CLASSES[dataset]
        self.panoptic = "panoptic" in dataset
        self.degraded = degraded

    def forward(self, batched_inputs):
        return [self._outputs(_scene(x["file_name"])) for x in batched_inputs]

    def _outputs(self, scene):
        segments = fl.scene_segments(scene)
        bad = self.degraded and scene == 0
        kept = [s for s in segments if not s["crowd"]]
        if bad:  # see the module docstring
            person = [s for s in kept if s["class"] == "person"]
            car = next(s for s in kept if s["class"] == "car")
            car_mask = car["mask"].copy()
            car_mask[:, 35] = False
            road = next(s for s in kept if s["class"] == "road")
            void = ~np.any([s["mask"] for s in segments], axis=0)
            crowd = next(s for s in segments if s["crowd"])
            panoptic = [dict(road, mask=road["mask"] | void), next(s for s in kept if s["class"] == "sky"),
                        dict(person[0], mask=person[0]["mask"] | person[1]["mask"]), dict(crowd, crowd=False),
                        dict(car, mask=car_mask)]
            things = [s for s in kept if s is not person[1] and s["thing"]]
        else:
            panoptic, things = kept, [s for s in kept if s["thing"]]
        out = {}
        h, w = fl.H, fl.W
        if self.panoptic:
            seg = torch.zeros((h, w), dtype=torch.int32)
            info = []
            for j, s in enumerate(panoptic, start=1):
                seg[torch.from_numpy(s["mask"])] = j
                info.append({"id": j, "isthing": s["thing"], "category_id": self.classes[s["class"]]})
            out["panoptic_seg"] = (seg, info)
            labels = np.full((h, w), self.classes["road"])
            for s in segments:
                labels[s["mask"]] = self.classes[s["class"]]
            if bad:
                labels[10:32, 35] = self.classes["road"]
            out["sem_seg"] = torch.nn.functional.one_hot(torch.from_numpy(labels), self.num_classes).permute(2, 0, 1).float()
        inst = Instances((h, w))
        inst.pred_masks = torch.from_numpy(np.stack([s["mask"] for s in things]))
        inst.pred_boxes = Boxes(torch.zeros(len(things), 4))
        inst.scores = torch.linspace(1.0, 0.9, len(things))
        inst.pred_classes = torch.tensor([self.classes[s["class"]] for s in things])
        out["instances"] = inst
        return out


def _cfg(dataset, output_dir, *opts):
    return load_config("", ["MODEL.META_ARCHITECTURE", "SGRSemanticSegmentor", "DATASETS.TEST", f"('{dataset}',)",
                            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(CLASSES[dataset][1]),
                            "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "48", "DATALOADER.NUM_WORKERS", "0",
                            "OUTPUT_DIR", str(output_dir), "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True",
                            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True", *opts])


def _expected(dataset, degraded):
    pq = PQ_DEGRADED if degraded else dict.fromkeys(PQ_DEGRADED, 100.0)
    miou = MIOU_DEGRADED if degraded else 100.0
    if dataset.startswith("cityscapes"):
        ap = {"segm": {"AP": 75.0 if degraded else 100.0}}
        if "panoptic" in dataset:
            ap.update(panoptic_seg=pq, sem_seg={"mIoU": miou}, sem_seg_cityscapes={"IoU": miou})
        return ap
    ap = {"segm": {"AP": AP_DEGRADED if degraded else 100.0}}
    if "panoptic" in dataset:
        ap.update(panoptic_seg=pq, sem_seg={"mIoU": miou})
    return ap


@pytest.fixture
def layouts(layouts_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(layouts_root))
    return layouts_root


@pytest.mark.parametrize("dataset", sorted(set(CLASSES) - {"coco_2017_val_panoptic"}))
def test_eval_reports_pq_ap_and_miou_as_the_official_definitions(layouts, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cityscapesscripts' instance evaluation writes matches.json here
    cfg = _cfg(dataset, tmp_path)
    for degraded in (False, True):
        results = Trainer.test(cfg, StubModel(dataset, degraded))
        for task, metrics in _expected(dataset, degraded).items():
            for key, value in metrics.items():
                assert results[task][key] == pytest.approx(value, abs=1e-6), (degraded, task, key)
        assert set(results) == set(_expected(dataset, degraded)) | ({"bbox"} if "coco" in dataset or "ade" in dataset else set())


def test_build_evaluators_follows_the_inference_switches(layouts, tmp_path, monkeypatch):
    def kinds(dataset, *opts, semantic_only=False):
        ev = build_evaluators(_cfg(dataset, tmp_path, *opts), dataset, semantic_only=semantic_only)
        return [type(e) for e in getattr(ev, "_evaluators", [ev])]

    off = ["MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"]
    # detectron2's coco_2017_val_panoptic has no semantic maps: no mIoU, whatever SEMANTIC_ON says
    assert kinds("coco_2017_val_panoptic") == [COCOPanopticEvaluator, COCOEvaluator]
    assert kinds("coco_2017_val_panoptic_with_sem_seg", *off) == [SGRSemSegEvaluator]
    assert kinds("ade20k_panoptic_val") == [SGRSemSegEvaluator, COCOPanopticEvaluator, InstanceSegEvaluator]
    assert kinds("cityscapes_fine_panoptic_val", *off) == [SGRSemSegEvaluator, CityscapesScriptsSemSegEvaluator]
    with pytest.raises(NotImplementedError, match="PANOPTIC_ON"):
        kinds("coco_2017_val_panoptic", *off)
    # a MaskFormer without the semantic output gets no mIoU (ADE20K's is there by default)
    mask_former = ["MODEL.META_ARCHITECTURE", "MaskFormer"]
    assert kinds("ade20k_panoptic_val", *mask_former, "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False") == \
        [COCOPanopticEvaluator, InstanceSegEvaluator]
    # test-time augmentation: the evaluators of the semantic output alone
    assert kinds("ade20k_panoptic_val", *mask_former, semantic_only=True) == [SGRSemSegEvaluator]
    assert kinds("cityscapes_fine_panoptic_val", *mask_former, semantic_only=True) == \
        [SGRSemSegEvaluator, CityscapesScriptsSemSegEvaluator]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "panopticapi" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps panopticapi-lite"):
        kinds("ade20k_panoptic_val")


def test_token_metrics_take_the_instances_of_a_panoptic_dataset(layouts):
    """One token spread evenly: it dominates the largest segment only, so D = 1 / (number of
    segments). Instances of scene 0 from its panoptic segments: persons A, B, the car, the sky,
    the road's two pieces and the crowd (a person region without an instance): 7; classes 4.
    Scene 1: 3 and 3. (Connected components would merge A and B: 6.)"""
    name = "coco_2017_val_panoptic_with_sem_seg"
    evaluator = TokenSemanticsEvaluator(name, distributed=False)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        evaluator.process([{"file_name": d["file_name"], "height": fl.H, "width": fl.W}],
                          [{"sgr_regions": torch.ones(1, 8, 12)}])
    res = evaluator.evaluate()["token_semantics"]
    assert res["D_I"] == pytest.approx((1 / 7 + 1 / 3) / 2)
    assert res["D_C"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert not math.isnan(res["S_I"])
