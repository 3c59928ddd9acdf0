"""What the ``register_*`` modules share: where the dataset root is, the checks of a dataset's
folders (errors that name the folder and the expected layout), re-registration, and where an
image's instance map is."""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DATASETS_ENV",
    "DatasetLayoutError",
    "INSTANCE_FROM_COMPONENTS",
    "INSTANCE_FROM_FILE",
    "INSTANCE_FROM_PANOPTIC",
    "datasets_root",
    "instance_map_path",
    "require_dir",
    "require_file",
    "replace_dataset",
    "unregister",
    "refresh_metadata_paths",
    "register_paths",
    "refresh_paths",
]

DATASETS_ENV = "DETECTRON2_DATASETS"
_DEFAULT_ROOT = "datasets"

# Instance annotations used by the instance-level token metrics. The value is stored in each
# dataset's metadata under ``instance_source``.
INSTANCE_FROM_FILE = "instance_file"  # an instance-id image per image (Cityscapes)
INSTANCE_FROM_COMPONENTS = "connected_components"  # components of each class in the label map
INSTANCE_FROM_PANOPTIC = "panoptic_segments"  # the thing segments of the panoptic annotation

_CITYSCAPES_LABEL_SUFFIXES = ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png")
_CITYSCAPES_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder or file is missing: the message names it and the expected layout."""


def datasets_root(root: Optional[str] = None) -> str:
    """``root`` if given, else ``$DETECTRON2_DATASETS`` read now, else ``./datasets``."""
    if root is not None:
        return root
    return os.environ.get(DATASETS_ENV) or _DEFAULT_ROOT


def _layout_error(path: str, what: str, dataset: str, layout: str, prepare: Optional[str]) -> DatasetLayoutError:
    hint = ""
    if prepare:  # a script of datasets/ or a whole command
        hint = f"Run `{'python ' + prepare if prepare.endswith('.py') else prepare}` to generate it. "
    return DatasetLayoutError(
        f"{dataset}: {what} not found: {path!r}.\n"
        f"Expected layout under ${DATASETS_ENV} (now {datasets_root()!r}):\n{layout}\n"
        f"{hint}See datasets/README.md."
    )


def require_dir(path: str, *, dataset: str, layout: str, prepare: Optional[str] = None) -> None:
    """Raise :class:`DatasetLayoutError` naming ``path``, ``layout`` and the script or command that
    makes it (``prepare``) unless ``path`` is a folder."""
    if not os.path.isdir(path):
        raise _layout_error(path, "folder", dataset, layout, prepare)


def require_file(path: str, *, dataset: str, layout: str, prepare: Optional[str] = None) -> None:
    """:func:`require_dir` for a file."""
    if not os.path.isfile(path):
        raise _layout_error(path, "file", dataset, layout, prepare)


def unregister(name: str) -> None:
    """Remove ``name`` from detectron2's dataset and metadata catalogs (nothing where it is not)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def replace_dataset(name: str, loader: Callable[[], list], metadata: Mapping[str, object]) -> None:
    """Register ``loader`` and ``metadata`` under ``name``, replacing any earlier registration.

    detectron2's ``builtin`` module registers a few of the same names (``ade20k_sem_seg_*``) at
    import time with loaders bound to the root of that moment; we replace them rather than
    registering a second name for the same data.
    """
    unregister(name)
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


_PATH_FUNCTIONS: dict = {}


def register_paths(name: str, paths: Callable[[], Mapping[str, str]]) -> None:
    """Remember how the path entries of ``name``'s metadata follow from the dataset root:
    ``paths()`` (it reads ``$DETECTRON2_DATASETS`` when called, and never the disk)."""
    _PATH_FUNCTIONS[name] = paths


def refresh_paths(name: str) -> None:
    """Point ``name``'s metadata paths at ``$DETECTRON2_DATASETS`` as it is now, without loading
    the dataset (what an evaluator that reads ``json_file`` or ``panoptic_json`` when it is built
    needs); nothing for a name without :func:`register_paths`."""
    paths = _PATH_FUNCTIONS.get(name)
    if paths is not None:
        refresh_metadata_paths(name, **paths())


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
