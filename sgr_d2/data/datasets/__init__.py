"""Dataset registration: importing this package registers every dataset sgr_d2 knows.

Registered names (see ``datasets/README.md`` for the folder layouts and preparation scripts):

* ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` (ADE20K, 150 classes),
* ``coco_2017_train_stuff_10k_sem_seg`` / ``coco_2017_test_stuff_10k_sem_seg`` (COCO-Stuff-10K,
  171 classes),
* ``ade20k_panoptic_train`` / ``_val`` and ``ade20k_instance_train`` / ``_val`` (Mask2Former's
  names and layouts, :mod:`.register_ade20k_panoptic`),
* ``coco_2017_train`` / ``_val`` (instances), ``coco_2017_train_panoptic`` / ``_val_panoptic``
  and their ``_with_sem_seg`` variants (:mod:`.register_coco`),
* ``cityscapes_fine_sem_seg_*``, ``cityscapes_fine_panoptic_*``, ``cityscapes_fine_instance_seg_*``
  (``train`` / ``val``; registered by detectron2 itself; sgr_d2 makes their loaders resolve the
  root when they run and completes their metadata, see :mod:`.register_cityscapes`).

``folder_sem_seg_train`` / ``folder_sem_seg_val`` (your own folder, docs/own_data.md) are
registered by :mod:`.folder` when a config with ``DATASETS.FOLDER.ROOT`` is loaded, and
``folder_instance_*`` / ``folder_panoptic_*`` (COCO-format JSON in that folder) by
:mod:`.folder_coco` when the config uses them.

Registration never touches the disk. Each loader resolves the dataset root when it *runs*:
the root given to ``register_all_*`` if any, else ``$DETECTRON2_DATASETS`` at call time
(default ``./datasets``), and refreshes the path entries of the dataset's metadata
(``image_root``, ``sem_seg_root``, ...) to the folders it actually read.

The helpers shared by the ``register_*`` modules live in :mod:`.layout` (re-exported here).
"""
from .layout import (  # noqa: F401
    DATASETS_ENV,
    DatasetLayoutError,
    INSTANCE_FROM_COMPONENTS,
    INSTANCE_FROM_FILE,
    INSTANCE_FROM_PANOPTIC,
    datasets_root,
    instance_map_path,
    require_dir,
    require_file,
    replace_dataset,
    refresh_metadata_paths,
    refresh_paths,
    register_paths,
)

from . import register_ade20k  # noqa: F401
from . import register_ade20k_panoptic  # noqa: F401
from . import register_coco  # noqa: F401
from . import register_coco_stuff_10k  # noqa: F401
from . import register_cityscapes  # noqa: F401
