"""LM-Debugger (Geva, Caciularu, Dar et al., EMNLP 2022) for any TransformerLens model, offline.

    from tl_embedspace import debugger
    t = debugger.trace(model, "The capital of France is", target=" Paris")   # sub-updates, lens, heads
    index = debugger.ValueIndex.load(model)                                 # top tokens of every value
    index.search([" Paris", " London"])                                      # values promoting tokens
    tl_plugins.enable(model, "steer", interventions=[{"layer": 12, "unit": 345, "op": "set", "value": 0.0}])
    debugger.generate(model, "...", interventions=[...])                     # steered beside plain

Modules, bottom to top: ``core`` (pure tensor functions), ``model`` (weights, tokens, units),
``trace``, ``index``, ``steer`` (the ``steer`` plugin), ``app`` + ``static/`` (the web app), ``cli``,
``bench``, ``repro`` (the method paper's checks), ``report``. Hookimpls live in
``tl_embedspace/plugin.py``.
"""

from tl_embedspace.debugger.index import IndexRebuiltWarning, ValueIndex
from tl_embedspace.debugger.model import parse_unit, unit_label
from tl_embedspace.debugger.steer import Intervention, SteerConfig, generate, load, reference_hooks, save
from tl_embedspace.debugger.trace import TraceResult, coefficients, trace

__all__ = ["IndexRebuiltWarning", "Intervention", "SteerConfig", "TraceResult", "ValueIndex", "coefficients",
           "generate", "load", "parse_unit", "reference_hooks", "save", "trace", "unit_label"]
