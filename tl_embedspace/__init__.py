"""tl_embedspace: every weight of a TransformerLens model read in vocabulary space (Dar et al., ACL 2023).

    from tl_embedspace import EmbeddingSpace
    space = EmbeddingSpace(model)
    space.ov(18, 6).topk_pairs(100)        # exact, never materialises the vocab x vocab matrix

Modules, bottom to top: ``topk`` (exact streaming top-k of factored products), ``projections``
(vectors to token scores, filters), ``results`` (dataclasses), ``space`` (the model-aware view),
``align`` and ``stitch`` (two models sharing a vocabulary), ``evaluations`` (the paper's checks),
``sweep`` (rank a whole model to files), ``plugin`` (CLI, benchmark, report section).
"""

from tl_embedspace.factored_topk import top1_diag_accuracy, topk_per_row, topk_product
from tl_embedspace.space import EmbeddingSpace, ProcessedWeightsWarning, VocabMatrix

__all__ = [
           "EmbeddingSpace",
           "ProcessedWeightsWarning",
           "VocabMatrix",
           "top1_diag_accuracy",
           "topk_per_row",
           "topk_product",
]
