"""``MaskFormerHead``: a pixel decoder plus a transformer decoder (SEM_SEG_HEADS_REGISTRY), and
the reading of both layouts its files come in (:func:`upgrade_head_layout`)."""
from __future__ import annotations

from typing import Dict, Iterable, MutableMapping, Optional

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead", "TRANSFORMER_IN_FEATURES", "upgrade_head_layout", "upgrade_head_layouts",
           "older_head_layout"]

# Inputs of the transformer decoder that are not backbone features.
TRANSFORMER_IN_FEATURES = ("transformer_encoder", "pixel_embedding", "multi_scale_pixel_decoder")


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """``forward(features)`` returns the transformer decoder's predictions (a dict with
    ``pred_logits``, ``pred_masks`` and ``aux_outputs``); the losses are the meta-architecture's.

    ``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE`` picks what the decoder reads: a backbone feature
    (MaskFormer: ``res5``), the pixel decoder's ``transformer_encoder`` output, its mask features
    (``pixel_embedding``), or its three ``multi_scale_pixel_decoder`` levels (Mask2Former).

    ``_version`` 2, the official head's: the pixel decoder's tensors sit under ``pixel_decoder.``.
    sgr_d2's checkpoints record it (torch's state-dict metadata), so the official code reads them
    without converting; :func:`upgrade_head_layout` reads the files of the older layout.
    """

    _version = 2

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, num_classes: int, pixel_decoder: nn.Module,
                 transformer_predictor: nn.Module, transformer_in_feature: str, loss_weight: float = 1.0,
                 ignore_value: int = 255):
        super().__init__()
        self.in_features = list(input_shape)
        self.num_classes = num_classes
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        sh, mf = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        feature = mf.TRANSFORMER_IN_FEATURE
        missing = [f for f in sh.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES is {list(sh.IN_FEATURES)}, but the backbone does "
                             f"not output {missing}; its outputs are {sorted(input_shape)}")
        head_shape = {k: input_shape[k] for k in sh.IN_FEATURES}
        decoder_name = mf.TRANSFORMER_DECODER_NAME
        if decoder_name == "MultiScaleMaskedTransformerDecoder" and feature != "multi_scale_pixel_decoder":
            raise ValueError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE is {feature!r}; "
                             "MultiScaleMaskedTransformerDecoder needs 'multi_scale_pixel_decoder'")
        if feature == "transformer_encoder":
            if sh.PIXEL_DECODER_NAME == "BasePixelDecoder":
                raise ValueError("MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE 'transformer_encoder' needs a pixel "
                                 "decoder with a transformer encoder (MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME "
                                 "'TransformerEncoderPixelDecoder' or 'MSDeformAttnPixelDecoder'), not "
                                 "'BasePixelDecoder'")
            in_channels = sh.CONVS_DIM
        elif feature == "pixel_embedding":
            in_channels = sh.MASK_DIM
        elif feature == "multi_scale_pixel_decoder":
            in_channels = sh.CONVS_DIM
        elif feature in input_shape:
            in_channels = input_shape[feature].channels
        else:
            raise ValueError(f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE is {feature!r}; expected one of "
                             f"{list(TRANSFORMER_IN_FEATURES)} or a backbone feature {sorted(input_shape)}")
        return dict(
            input_shape=head_shape,
            num_classes=sh.NUM_CLASSES,
            pixel_decoder=build_pixel_decoder(cfg, input_shape),
            transformer_predictor=build_transformer_decoder(cfg, in_channels, mask_classification=True),
            transformer_in_feature=feature,
            loss_weight=sh.LOSS_WEIGHT,
            ignore_value=sh.IGNORE_VALUE,
        )

    def forward(self, features, mask=None):
        return self.layers(features, mask)

    def layers(self, features, mask=None):
        mask_features, encoder_features, multi_scale = self.pixel_decoder.forward_features(features)
        f = self.transformer_in_feature
        if f == "multi_scale_pixel_decoder":
            return self.predictor(multi_scale, mask_features, mask)
        if f == "transformer_encoder":
            return self.predictor(encoder_features, mask_features, mask)
        if f == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[f], mask_features, mask)


def upgrade_head_layout(state: MutableMapping, prefix: str = "sem_seg_head.",
                        expected: Optional[Iterable[str]] = None) -> int:
    """Bring a file of the older ``MaskFormerHead`` layout to the current one, in place; returns
    how many tensors moved (0: nothing to do).

    In the older layout (files from before the head's version 2) the pixel decoder's tensors sit
    directly under ``prefix`` (``sem_seg_head.adapter_1.weight``, ``sem_seg_head.mask_features.*``,
    ...), the predictor's under ``prefix + "predictor."`` as now. The layout is read off the keys:
    a file with tensors under ``prefix`` outside ``predictor.`` and none under ``pixel_decoder.``
    is the older one, and those tensors move under ``prefix + "pixel_decoder."``. A file with any
    tensor under ``pixel_decoder.`` is left as it is, with or without version metadata. (The
    official ``MaskFormerHead._load_from_state_dict`` decides from the metadata alone and takes a
    file without it for the older layout, so it mis-reads a current-layout file that has none,
    such as a ``.pkl`` of plain arrays: its issues #95 and #129.) ``expected``: the model's tensor
    names; when given, nothing moves unless a moved name is one of them (a per-pixel head's file
    is not a MaskFormerHead's).
    """
    decoder, predictor = prefix + "pixel_decoder.", prefix + "predictor."
    keys = [k for k in state if k.startswith(prefix)]
    if any(k.startswith(decoder) for k in keys):
        return 0
    old = {k: decoder + k[len(prefix):] for k in keys if not k.startswith(predictor)}
    if not old or (expected is not None and not set(old.values()) & set(expected)):
        return 0
    items = list(state.items())
    state.clear()
    state.update((old.get(k, k), v) for k, v in items)
    return len(old)


def upgrade_head_layouts(state: MutableMapping, model) -> int:
    """:func:`upgrade_head_layout` for every ``MaskFormerHead`` of ``model`` (under its own
    name); what the checkpointer runs on every file before its fit check."""
    expected = set(model.state_dict())
    return sum(upgrade_head_layout(state, f"{name}." if name else "", expected)
               for name, module in model.named_modules() if isinstance(module, MaskFormerHead))


def older_head_layout(state: MutableMapping, prefix: str = "sem_seg_head.") -> int:
    """The converse of :func:`upgrade_head_layout`, in place: the pixel decoder's tensors from
    ``prefix + "pixel_decoder."`` directly under ``prefix``; returns how many moved. The layout in
    which the official code reads a file without version metadata (a plain name -> array dict:
    ``tools/convert_checkpoint.py --official``)."""
    decoder = prefix + "pixel_decoder."
    moved = {k: prefix + k[len(decoder):] for k in state if k.startswith(decoder)}
    items = list(state.items())
    state.clear()
    state.update((moved.get(k, k), v) for k, v in items)
    return len(moved)
