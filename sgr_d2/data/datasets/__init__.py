"""Dataset registration: importing this package registers every dataset sgr_d2 knows.

Registered names (see ``datasets/README.md`` for the folder layouts and preparation scripts):

* ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` (ADE20K, 150 classes),
* ``coco_2017_train_stuff_10k_sem_seg`` / ``coco_2017_test_stuff_10k_sem_seg`` (COCO-Stuff-10K,
  171 classes),
* ``cityscapes_fine_sem_seg_train`` / ``cityscapes_fine_sem_seg_val`` (registered by detectron2
  itself; sgr_d2 only completes them, see :mod:`.register_cityscapes`).

Registration never touches the disk. Each loader resolves the dataset root when it *runs*:
the root given to ``register_all_*`` if any, else ``$DETECTRON2_DATASETS`` at call time
(default ``./datasets``), and refreshes the path entries of the dataset's metadata
(``image_root``, ``sem_seg_root``, ...) to the folders it actually read.

The helpers below are shared by the ``register_*`` modules; they are defined before those
modules are imported at the bottom of this file.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DATASETS_ENV",
    "DatasetLayoutError",
    "INSTANCE_FROM_COMPONENTS",
    "INSTANCE_FROM_FILE",
    "datasets_root",
    "instance_map_path",
    "require_dir",
    "replace_dataset",
    "refresh_metadata_paths",
]

DATASETS_ENV = "DETECTRON2_DATASETS"
_DEFAULT_ROOT = "datasets"

# Instance annotations used by the instance-level token metrics. The value is stored in each
# dataset's metadata under ``instance_source``.
INSTANCE_FROM_FILE = "instance_file"  # an instance-id image per image (Cityscapes)
INSTANCE_FROM_COMPONENTS = "connected_components"  # components of each class in the label map

_CITYSCAPES_LABEL_SUFFIXES = ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png")
_CITYSCAPES_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder or file is missing: the message names it and the expected layout."""


def datasets_root(root: Optional[str] = None) -> str:
    """``root`` if given, else ``$DETECTRON2_DATASETS`` read now, else ``./datasets``."""
    if root is not None:
        return root
    return os.environ.get(DATASETS_ENV) or _DEFAULT_ROOT


def require_dir(path: str, *, dataset: str, layout: str, prepare: Optional[str] = None) -> None:
    """Raise :class:`DatasetLayoutError` naming ``path`` and ``layout`` unless ``path`` is a folder."""
    if os.path.isdir(path):
        return
    hint = f"Run `python {prepare}` to generate it. " if prepare else ""
    raise DatasetLayoutError(
        f"{dataset}: folder not found: {path!r}.\n"
        f"Expected layout under ${DATASETS_ENV} (now {datasets_root()!r}):\n{layout}\n"
        f"{hint}See datasets/README.md."
    )


def replace_dataset(name: str, loader: Callable[[], list], metadata: Mapping[str, object]) -> None:
    """Register ``loader`` and ``metadata`` under ``name``, replacing any earlier registration.

    detectron2's ``builtin`` module registers a few of the same names (``ade20k_sem_seg_*``) at
    import time with loaders bound to the root of that moment; we replace them rather than
    registering a second name for the same data.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def refresh_metadata_paths(name: str, **paths: str) -> None:
    """Set path entries of ``name``'s metadata in place, even if they were set before.

    ``Metadata.set`` refuses to change a value; the paths legitimately change when
    ``$DETECTRON2_DATASETS`` differs between import time and load time, so we write them
    directly. The Metadata object stays the same (references held elsewhere see the update).
    """
    meta = MetadataCatalog.get(name)
    for key, value in paths.items():
        if meta.__dict__.get(key) != value:
            meta.__dict__[key] = value


def instance_map_path(dataset_dict: Mapping[str, object]) -> Optional[str]:
    """Path of the instance-id image of one dataset dict, or None when it has none.

    * an explicit ``"instance_file_name"`` entry is returned as is;
    * Cityscapes dicts (``sem_seg_file_name`` ending in ``_gtFine_labelTrainIds.png`` or
      ``_gtFine_labelIds.png``) give the ``_gtFine_instanceIds.png`` beside it (pixel value
      ``label_id * 1000 + k`` for instance k of a "thing" class, ``label_id`` elsewhere);
    * anything else (ADE20K, COCO-Stuff-10K) gives None: instances are then the connected
      components of each class in the label map (see datasets/README.md).

    Only the path is computed; the file is not opened nor checked for existence.
    """
    explicit = dataset_dict.get("instance_file_name")
    if explicit:
        return str(explicit)
    sem = dataset_dict.get("sem_seg_file_name")
    if isinstance(sem, str):
        for suffix in _CITYSCAPES_LABEL_SUFFIXES:
            if sem.endswith(suffix):
                return sem[: -len(suffix)] + _CITYSCAPES_INSTANCE_SUFFIX
    return None


# The register_* modules import the helpers above; keep these imports last.
from . import register_ade20k  # noqa: E402,F401
from . import register_coco_stuff_10k  # noqa: E402,F401
from . import register_cityscapes  # noqa: E402,F401
