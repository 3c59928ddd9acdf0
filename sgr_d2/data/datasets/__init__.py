"""Dataset registration: importing this package registers every dataset sgr_d2 knows.

Registered names (see ``datasets/README.md`` for the folder layouts and preparation scripts):

* ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` (ADE20K, 150 classes),
* ``coco_2017_train_stuff_10k_sem_seg`` / ``coco_2017_test_stuff_10k_sem_seg`` (COCO-Stuff-10K,
  171 classes),
* ``cityscapes_fine_sem_seg_train`` / ``cityscapes_fine_sem_seg_val`` (registered by detectron2
  itself; sgr_d2 only completes them, see :mod:`.register_cityscapes`).

``folder_sem_seg_train`` / ``folder_sem_seg_val`` (your own folder, docs/own_data.md) are
registered by :mod:`.folder` when a config with ``DATASETS.FOLDER.ROOT`` is loaded.

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
    datasets_root,
    instance_map_path,
    require_dir,
    replace_dataset,
    refresh_metadata_paths,
)

from . import register_ade20k  # noqa: F401
from . import register_coco_stuff_10k  # noqa: F401
from . import register_cityscapes  # noqa: F401
