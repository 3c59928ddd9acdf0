"""The framework-agnostic SGR core: pure PyTorch (plus NumPy/SciPy), no detectron2.

* :class:`SGRModule` — the component (docs/method.md#the-sgr-component);
* :func:`connected_components` — supervision targets (docs/method.md#supervision-from-connected-components);
  :func:`instance_component_map` — the same with ground-truth instances as components;
* :func:`pairwise_cost`, :func:`match_tokens` — the cost matrix and matching;
* :class:`SGRCriterion` — the union, class and diversity losses with the β weighting;
* :func:`autocast_off` — what keeps the sensitive parts in float32 under mixed precision.
"""
from .components import COMPONENT_MODES, component_label_map, connected_components, instance_component_map
from .losses import SGRCriterion, downsample_component_labels, downsample_components, weighted_bce, weighted_dice
from .matching import MATCHING_MODES, match_tokens, pairwise_cost
from .module import SGRModule
from .precision import autocast_off

__all__ = [
    "SGRModule",
    "SGRCriterion",
    "connected_components",
    "component_label_map",
    "instance_component_map",
    "COMPONENT_MODES",
    "match_tokens",
    "pairwise_cost",
    "downsample_components",
    "downsample_component_labels",
    "weighted_bce",
    "weighted_dice",
    "MATCHING_MODES",
    "autocast_off",
]
