"""tl_iclgd: in-context learning vs gradient descent on cached activations (Deutch et al., NAACL 2024).

    import tl_plugins, tl_iclgd
    model = tl_plugins.models.load("smollm2-135m")          # unprocessed weights
    res = tl_iclgd.compare(model, "antonyms", tl_iclgd.GDConfig(lr=0.1),
                           methods=("gd", "lcgd"), baselines=("untrained",))
    res.table()                                               # mean ± std over seeds

Models are reached only through their backend (``tl_plugins.backends.detect``), so a HookedTransformer
and a TransformerBridge (transformer-lens 3.x and 4.x) both work.

Layout: ``metrics`` (pure tensor functions), ``linear_attention`` (the von Oswald et al. identity),
``tasks`` (tasks and token ids), ``capture`` (hooks), ``gd`` (vanilla and layer-causal SGD),
``baselines`` (the references: untrained models, random updates), ``compare`` (the pipeline),
``lr_select`` (learning rate on held-out demonstrations), ``grid`` (tasks x rates, sharded under
torchrun), ``threads`` (a torch thread-count context manager); ``plugin`` (hookimpls) on top, with
``cli``, ``bench`` and ``report`` beside it.
"""

from tl_iclgd.baselines import random_updates_like, untrained_like
from tl_iclgd.capture import Capture, capture
from tl_iclgd.compare import AccuracyCurve, Comparison, compare, icl_accuracy_curve
from tl_iclgd.gd import FinetuneResult, GDConfig, Trace, check_unprocessed, finetune, select_params
from tl_iclgd.grid import compare_grid
from tl_iclgd.linear_attention import gd_weights, linear_self_attention
from tl_iclgd.lr_select import LRSelection, select_lr
from tl_iclgd.metrics import kendall_tau, rec2ftp, simam, simam_delta, simaou
from tl_iclgd.tasks import BUILTIN_TASKS, Task, TokenizedTask, get_task, tokenize_task
from tl_iclgd.threads import torch_threads

__all__ = [
    "compare", "Comparison", "compare_grid", "icl_accuracy_curve", "AccuracyCurve", "GDConfig", "finetune",
    "FinetuneResult", "Trace", "select_params", "check_unprocessed", "select_lr", "LRSelection",
    "untrained_like", "capture", "Capture", "Task", "TokenizedTask", "tokenize_task", "get_task",
    "BUILTIN_TASKS", "simaou", "simam", "simam_delta", "rec2ftp", "kendall_tau", "random_updates_like",
    "linear_self_attention", "gd_weights", "torch_threads",
]
