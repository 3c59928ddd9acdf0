"""Datasets (registered on import) and the training mappers (:func:`build_mapper` picks one by
``INPUT.DATASET_MAPPER_NAME``)."""
from . import datasets  # noqa: F401  (registers ADE20K, COCO, COCO-Stuff-10K, Cityscapes extras)
from . import toy  # noqa: F401  (registers sgr_toy_sem_seg_train / _val)
from . import toy_context  # noqa: F401  (registers sgr_toy_context_sem_seg_train / _val)
from . import toy_instances  # noqa: F401  (registers sgr_toy_instances_train / _val)
from . import toy_panoptic  # noqa: F401  (registers sgr_toy_panoptic_train / _val [_with_sem_seg])
from .dataset_mapper import SemSegDatasetMapper, build_train_augmentations  # noqa: F401
from .mappers import InstanceDatasetMapper, PanopticDatasetMapper, build_mapper  # noqa: F401
