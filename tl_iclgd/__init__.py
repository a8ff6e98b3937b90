"""tl_iclgd: in-context learning vs gradient descent on cached activations (Deutch et al., NAACL 2024).

    import tl_plugins, tl_iclgd
    model = tl_plugins.models.load("smollm2-135m")          # unprocessed weights
    res = tl_iclgd.compare(model, "antonyms", tl_iclgd.GDConfig(lr=0.1),
                           methods=("gd", "lcgd"), baselines=("untrained",))
    res.table()                                               # mean ± std over seeds

Models are reached only through their backend (``tl_plugins.backends.detect``), so a HookedTransformer
and a TransformerBridge (transformer-lens 3.x and 4.x) both work.

Layout: ``metrics`` (pure tensor functions), ``tasks`` (tasks and token ids), ``capture`` (hooks),
``gd`` (vanilla and layer-causal SGD), ``baselines`` (untrained models), ``compare`` (the pipeline),
``plugin`` (tl_plugins hooks: registration, CLI, benchmark, report section), ``threads`` (a torch
thread-count context manager).
"""

from tl_iclgd.baselines import untrained_like
from tl_iclgd.capture import Capture, capture
from tl_iclgd.compare import AccuracyCurve, Comparison, compare, icl_accuracy_curve
from tl_iclgd.gd import FinetuneResult, GDConfig, Trace, finetune, select_params
from tl_iclgd.metrics import kendall_tau, random_updates_like, rec2ftp, simam, simam_delta, simaou
from tl_iclgd.tasks import BUILTIN_TASKS, Task, TokenizedTask, get_task, tokenize_task

__all__ = [
    "compare", "Comparison", "icl_accuracy_curve", "AccuracyCurve", "GDConfig", "finetune", "FinetuneResult",
    "Trace", "select_params", "untrained_like", "capture", "Capture", "Task", "TokenizedTask", "tokenize_task",
    "get_task", "BUILTIN_TASKS", "simaou", "simam", "simam_delta", "rec2ftp", "kendall_tau",
    "random_updates_like",
]
