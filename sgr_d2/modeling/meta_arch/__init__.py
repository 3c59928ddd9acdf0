from .sgr_semantic_seg import SGRSemanticSegmentor, build_sgr_criterion, sgr_losses  # noqa: F401
