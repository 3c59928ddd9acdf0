"""Cityscapes (fine annotations) for semantic (19 train ids), panoptic and instance segmentation.

detectron2's ``builtin`` module already registers ``cityscapes_fine_sem_seg_{train,val}``
(loader ``load_cityscapes_semantic``, ``evaluator_type="cityscapes_sem_seg"``),
``cityscapes_fine_panoptic_{train,val}`` (``load_cityscapes_panoptic`` of the files made by
cityscapesscripts' ``createPanopticImgs``, ``evaluator_type="cityscapes_panoptic_seg"``) and
``cityscapes_fine_instance_seg_{train,val}`` (``load_cityscapes_instances`` from the polygon
files, ``evaluator_type="cityscapes_instance"``), each bound to ``$DETECTRON2_DATASETS`` at
import time. We keep those names, loaders and metadata; each loader is replaced by one that
resolves the root when it runs, checks the folders and files it needs (errors name the missing
one and how to make it) and refreshes the metadata's paths. The semantic names also get
what sgr_d2 needs:

* the loader resolves the root when it runs (detectron2's binds ``$DETECTRON2_DATASETS`` at
  import time), checks the folders and the ``*_gtFine_labelTrainIds.png`` files made by
  ``datasets/prepare_cityscapes_sem_seg.py``, and refreshes ``image_dir``/``gt_dir``/
  ``instance_root`` in the metadata to the folders it read;
* metadata ``stuff_colors`` (the train-id colors of ``cityscapesscripts.helpers.labels``),
  ``instance_root`` (the ``gtFine/<split>`` folder), ``instance_suffix`` and
  ``instance_source="instance_file"``: the instance map of a dataset dict is the
  ``*_gtFine_instanceIds.png`` beside its label file, see
  :func:`sgr_d2.data.datasets.layout.instance_map_path`.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.cityscapes import load_cityscapes_instances, load_cityscapes_semantic
from detectron2.data.datasets.cityscapes_panoptic import load_cityscapes_panoptic

from .layout import (
    INSTANCE_FROM_FILE,
    INSTANCE_FROM_PANOPTIC,
    DatasetLayoutError,
    datasets_root,
    refresh_metadata_paths,
    register_paths,
    require_dir,
    require_file,
)

__all__ = ["CITYSCAPES_TRAIN_ID_COLORS", "load_cityscapes_sem_seg", "load_cityscapes_panoptic_checked",
           "load_cityscapes_instances_checked", "register_all_cityscapes"]

_SPLITS = {"cityscapes_fine_sem_seg_train": "train", "cityscapes_fine_sem_seg_val": "val"}
_PREPARE = "datasets/prepare_cityscapes_sem_seg.py"
_PREPARE_PANOPTIC = ("CITYSCAPES_DATASET=$DETECTRON2_DATASETS/cityscapes "
                     "python -m cityscapesscripts.preparation.createPanopticImgs")
_LAYOUT = """\
cityscapes/
  leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
  gtFine/{train,val}/<city>/<name>_gtFine_{labelIds.png,instanceIds.png,polygons.json}
  gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   (made by prepare_cityscapes_sem_seg.py)
  gtFine/cityscapes_panoptic_{train,val}.json, gtFine/cityscapes_panoptic_{train,val}/
                                      (made by cityscapesscripts' createPanopticImgs)"""
_TRAIN_IDS = ("_gtFine_labelTrainIds.png", f"Run `python {_PREPARE}` to generate the train-id label files. ")
_POLYGONS = ("_gtFine_polygons.json", "")
_INSTANCE_IDS = ("_gtFine_instanceIds.png", "")


def _train_id_colors() -> list[list[int]]:
    from cityscapesscripts.helpers.labels import labels

    by_train_id = {}
    for label in labels:
        if 0 <= label.trainId < 255 and label.trainId not in by_train_id:
            by_train_id[label.trainId] = list(label.color)
    return [by_train_id[k] for k in range(len(by_train_id))]


CITYSCAPES_TRAIN_ID_COLORS = _train_id_colors()


def _split_dirs(root: str, split: str) -> tuple[str, str]:
    base = os.path.join(root, "cityscapes")
    return os.path.join(base, "leftImg8bit", split), os.path.join(base, "gtFine", split)


def _check_label_files(image_dir: str, gt_dir: str, dataset: str, files=(_TRAIN_IDS, _POLYGONS)) -> None:
    """Every image needs its ``files`` (ending, hint): by default its train-id map and polygon
    file (read by detectron2's semantic loader)."""
    suffix = "_leftImg8bit.png"
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            continue
        for image in sorted(os.listdir(city_dir)):
            if not image.endswith(suffix):
                continue
            stem = os.path.join(gt_dir, city, image[: -len(suffix)])
            for ending, hint in files:
                if not os.path.isfile(stem + ending):
                    raise DatasetLayoutError(
                        f"{dataset}: file not found: {stem + ending!r} (for image "
                        f"{os.path.join(city_dir, image)!r}).\nExpected layout:\n{_LAYOUT}\n"
                        f"{hint}See datasets/README.md."
                    )


def _require_split(root: str, split: str, dataset: str) -> tuple[str, str]:
    """The split's image and gtFine folders, which must exist (with ``cityscapes/`` itself)."""
    image_dir, gt_dir = _split_dirs(root, split)
    for path in (os.path.join(root, "cityscapes"), image_dir, gt_dir):
        require_dir(path, dataset=dataset, layout=_LAYOUT)
    return image_dir, gt_dir


def load_cityscapes_sem_seg(split: str, root: Optional[str] = None,
                            name: Optional[str] = None) -> list:
    """detectron2's ``load_cityscapes_semantic`` on ``<root>/cityscapes``, root resolved now.

    Raises :class:`DatasetLayoutError` naming the missing folder or label file.
    """
    root = datasets_root(root)
    dataset = name or f"Cityscapes {split}"
    image_dir, gt_dir = _require_split(root, split, dataset)
    _check_label_files(image_dir, gt_dir, dataset)
    dicts = load_cityscapes_semantic(image_dir, gt_dir)
    if name is not None:
        refresh_metadata_paths(name, **_metadata_paths(root, split, "sem_seg"))
    return dicts


def load_cityscapes_panoptic_checked(split: str, root: Optional[str] = None,
                                     name: Optional[str] = None) -> list:
    """detectron2's ``load_cityscapes_panoptic`` on ``<root>/cityscapes``, root resolved now;
    needs each image's ``*_gtFine_labelTrainIds.png`` (``sem_seg_file_name``) and the panoptic
    files of cityscapesscripts' ``createPanopticImgs``."""
    root = datasets_root(root)
    dataset = name or f"Cityscapes panoptic {split}"
    image_dir, gt_dir = _require_split(root, split, dataset)
    pan_dir = os.path.join(root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}")
    require_file(pan_dir + ".json", dataset=dataset, layout=_LAYOUT, prepare=_PREPARE_PANOPTIC)
    require_dir(pan_dir, dataset=dataset, layout=_LAYOUT, prepare=_PREPARE_PANOPTIC)
    _check_label_files(image_dir, gt_dir, dataset, files=(_TRAIN_IDS,))
    meta = MetadataCatalog.get(name or "cityscapes_fine_panoptic_" + split)
    if name is not None:
        refresh_metadata_paths(name, **_metadata_paths(root, split, "panoptic"))
    return load_cityscapes_panoptic(image_dir, pan_dir, pan_dir + ".json", meta.as_dict())


def load_cityscapes_instances_checked(split: str, root: Optional[str] = None,
                                      name: Optional[str] = None) -> list:
    """detectron2's ``load_cityscapes_instances`` (from the polygon files, as the official
    Mask2Former reads them; it needs ``shapely``) on ``<root>/cityscapes``, root resolved now."""
    root = datasets_root(root)
    dataset = name or f"Cityscapes instance {split}"
    image_dir, gt_dir = _require_split(root, split, dataset)
    _check_label_files(image_dir, gt_dir, dataset, files=(_POLYGONS, _INSTANCE_IDS))
    if name is not None:
        refresh_metadata_paths(name, **_metadata_paths(root, split, "instance"))
    return load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)


def _replace_loader(name: str, loader) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)  # same name, same data: only the loader is replaced
    DatasetCatalog.register(name, loader)


def _metadata_paths(root: Optional[str], split: str, task: str) -> dict:
    image_dir, gt_dir = _split_dirs(datasets_root(root), split)
    if task == "panoptic":
        pan_dir = os.path.join(os.path.dirname(gt_dir), f"cityscapes_panoptic_{split}")
        return dict(image_root=image_dir, panoptic_root=pan_dir, panoptic_json=pan_dir + ".json", gt_dir=gt_dir)
    if task == "instance":
        return dict(image_dir=image_dir, gt_dir=gt_dir)
    return dict(image_dir=image_dir, gt_dir=gt_dir, instance_root=gt_dir)


def register_all_cityscapes(root: Optional[str] = None) -> None:
    """Complete detectron2's registration of the train and val splits (see module docstring)."""
    for split in ("train", "val"):
        for task, load in (("panoptic", load_cityscapes_panoptic_checked),
                           ("instance_seg", load_cityscapes_instances_checked)):
            name = f"cityscapes_fine_{task}_{split}"
            _replace_loader(name, functools.partial(load, split, root, name))
            paths = functools.partial(_metadata_paths, root, split, task.split("_")[0])
            refresh_metadata_paths(name, **paths())
            register_paths(name, paths)
        name = f"cityscapes_fine_panoptic_{split}"
        if "instance_source" not in MetadataCatalog.get(name).__dict__:
            MetadataCatalog.get(name).set(instance_source=INSTANCE_FROM_PANOPTIC)
    for name, split in _SPLITS.items():
        _replace_loader(name, functools.partial(load_cityscapes_sem_seg, split, root, name))
        meta = MetadataCatalog.get(name)
        if "stuff_classes" not in meta.__dict__:  # only if detectron2 did not register it
            from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

            meta.set(evaluator_type="cityscapes_sem_seg", ignore_label=255,
                     **_get_builtin_metadata("cityscapes"))
        paths = functools.partial(_metadata_paths, root, split, "sem_seg")
        refresh_metadata_paths(name, **paths())
        register_paths(name, paths)
        for key, value in dict(
            stuff_colors=[list(c) for c in CITYSCAPES_TRAIN_ID_COLORS],
            instance_suffix="_gtFine_instanceIds.png",
            instance_source=INSTANCE_FROM_FILE,
        ).items():
            if key not in meta.__dict__:
                meta.set(**{key: value})


register_all_cityscapes()
