"""The reference computations tl_embedspace is checked and measured against, in one place.

- ``materialized_topk(A, B, k, mode)``: form ``A @ B`` densely and take its top-k. The oracle of the
  streaming top-k in the tests, and the baseline of its speed-up in ``tl-plugins bench embedspace``.
  It is written beside the streaming search it checks (``factored_topk.py``) and named here.
- ``reference_hooks(backend, interventions)``: the ``steer`` plugin's edits as plain TransformerLens
  forward hooks, which the debugger's tests compare the plugin against.

The paper's baselines (partners shuffled within a layer in ``evaluations``, raw feature space in
``align``) belong to the score they are reported beside, and stay with it.
"""

from __future__ import annotations

from tl_embedspace.debugger.steer import reference_hooks
from tl_embedspace.factored_topk import materialized_topk

__all__ = ["materialized_topk", "reference_hooks"]
