"""tl_embedspace: every weight of a TransformerLens model read in vocabulary space (Dar et al., ACL 2023).

    from tl_embedspace import EmbeddingSpace
    space = EmbeddingSpace(model)
    space.ov(18, 6).topk_pairs(100)        # exact, never materialises the vocab x vocab matrix

Modules, bottom to top: ``factored_topk`` (exact streaming top-k of factored products; its compiled
scan is ``cpp_scan``, kernel source in ``cpp/``), ``projections``
(vectors to token scores, filters), ``results`` (dataclasses), ``space`` (the model-aware view),
``align`` and ``stitch`` (two models sharing a vocabulary), ``evaluations`` (the paper's checks),
``sweep`` (rank a whole model to files), ``reference`` (the brute-force oracles the results are
checked against), ``plugin`` (hookimpls; ``cli``, ``bench``, ``report`` beside it).
"""

from tl_embedspace.align import AlignResult, align
from tl_embedspace.config import EmbedSpaceConfig
from tl_embedspace.evaluations import EvalResult, hidden_state_overlap, related_pairs
from tl_embedspace.factored_topk import top1_diag_accuracy, topk_per_row, topk_product
from tl_embedspace.results import ComponentHits, RowTopk, TokenPairs, TokenScores
from tl_embedspace.space import EmbeddingSpace, ProcessedWeightsWarning, VocabMatrix
from tl_embedspace.stitch import Translator, stitched_forward, translator
from tl_embedspace.sweep import sweep

__all__ = [
    "AlignResult",
    "ComponentHits",
    "EmbedSpaceConfig",
    "EmbeddingSpace",
    "EvalResult",
    "ProcessedWeightsWarning",
    "RowTopk",
    "TokenPairs",
    "TokenScores",
    "Translator",
    "VocabMatrix",
    "align",
    "hidden_state_overlap",
    "related_pairs",
    "stitched_forward",
    "sweep",
    "top1_diag_accuracy",
    "topk_per_row",
    "topk_product",
    "translator",
]
