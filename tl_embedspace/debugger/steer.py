"""The ``steer`` plugin: interventions on feed-forward coefficients and on the residual stream, in
explicit units, active under ``generate`` and ``run_with_cache``.

    tl_plugins.enable(model, "steer", interventions=[
        {"layer": 12, "unit": 345, "op": "set", "value": 0.0, "positions": "all"},
        {"layer": 20, "op": "resid_add", "token": " Paris", "value": 8.0, "positions": "last"},
    ])

Ops on the coefficient ``m`` (``hook_post`` of that unit: ``act(gate) * up`` on gated MLPs):
``set`` (m := value), ``scale`` (m := m * value), ``add`` (m := m + value). ``resid_add`` adds a
vector to the residual stream after the layer's block (``hook_resid_post``): ``vector`` (d_model
floats) times ``value`` (default 1), or ``token``: the unit direction of that token's unembedding
column times ``value``. ``positions``: "all", "last" (the last position of each forward call, so each
new token under KV-cached generation), an int, ``[start, stop]`` or "start:stop" (indices of the
forward call's positions, as a TransformerLens hook sees them; ``debugger.generate`` turns the KV
cache off when a range is given so that positions are absolute). ``enabled: false`` keeps an entry
in the list without applying it.

How it is installed: through the host's MLP activation seam. On a gated MLP the seam sees
``act(gate)`` but not ``up`` (the coefficient is their product), so at each seam call the plugin
arms a one-shot forward hook, prepended, on that layer's ``hook_post`` (and ``hook_resid_post`` for
residual edits); the hook edits the tensor once and removes itself before returning. The edit is
therefore exactly the edit a plain TransformerLens hook on ``hook_post`` makes, and it runs before
any cache or user hook there (``run_with_cache`` records the steered values). Nothing stays on a
hook point between calls; ``disable`` removes the seam (and any hook an aborted forward left armed).
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tl_embedspace.debugger.model import (
    check_mlp_supported,
    check_unit,
    parse_unit,
    resolve_token,
    unit_label,
)
from tl_plugins.checks import is_int

PLUGIN = "steer"
COEF_OPS = ("set", "scale", "add")
OPS = COEF_OPS + ("resid_add",)
_RANGE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*$")


def _positions(p: Any, where: str) -> Any:
    if p in ("all", "last"):
        return p
    if isinstance(p, bool):
        raise ValueError(f"{where}positions: got {p!r}; accepted: 'all', 'last', an int, [start, stop] or 'start:stop'")
    if isinstance(p, numbers.Integral):
        return [int(p), int(p) + 1 if int(p) != -1 else None]
    if isinstance(p, str):
        m = _RANGE.match(p)
        if m:
            return [int(m.group(1)) if m.group(1) else None, int(m.group(2)) if m.group(2) else None]
    if isinstance(p, (list, tuple)) and len(p) == 2 and all(
            x is None or is_int(x) for x in p):
        return [None if x is None else int(x) for x in p]
    raise ValueError(f"{where}positions: got {p!r}; accepted: 'all', 'last', an int, [start, stop] or 'start:stop'")


@dataclass
class Intervention:
    """One edit; see the module docstring for the fields."""

    layer: int
    unit: Optional[int] = None
    op: str = "set"
    value: float = 0.0
    positions: Any = "all"
    vector: Optional[list] = None
    token: Optional[Union[str, int]] = None
    enabled: bool = True

    def __post_init__(self):
        where = f"intervention {self.describe()}: "
        if self.op not in OPS:
            raise ValueError(f"{where}op: got {self.op!r}; accepted: {', '.join(OPS)}")
        if not is_int(self.layer):
            raise ValueError(f"{where}layer: got {self.layer!r}; accepted: an int")
        if isinstance(self.value, bool) or not isinstance(self.value, numbers.Real) or not torch.isfinite(
                torch.tensor(float(self.value))):
            raise ValueError(f"{where}value: got {self.value!r}; accepted: a finite number")
        self.value = float(self.value)
        if self.op in COEF_OPS:
            if not is_int(self.unit):
                raise ValueError(f"{where}unit: got {self.unit!r}; accepted: an int (op {self.op!r} edits a "
                                 "coefficient)")
            if self.vector is not None or self.token is not None:
                raise ValueError(f"{where}vector/token: only op 'resid_add' takes them")
        else:
            if self.unit is not None:
                raise ValueError(f"{where}unit: op 'resid_add' edits the residual stream, not a unit; got "
                                 f"unit={self.unit!r}")
            if (self.vector is None) == (self.token is None):
                raise ValueError(f"{where}op 'resid_add' needs exactly one of vector (d_model floats) or token")
            if self.vector is not None:
                self.vector = [float(x) for x in self.vector]
        self.positions = _positions(self.positions, where)
        self.enabled = bool(self.enabled)

    def describe(self) -> str:
        if self.op == "resid_add":
            return f"L{self.layer} resid"
        return unit_label(self.layer, self.unit) if isinstance(self.unit, int) else f"L{self.layer}U{self.unit}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["op"] in COEF_OPS:
            d.pop("vector"), d.pop("token")
        else:
            d.pop("unit")
        return d

    @classmethod
    def coerce(cls, x: Any) -> "Intervention":
        if isinstance(x, Intervention):
            return x
        if isinstance(x, dict):
            x = dict(x)
            if "label" in x:  # "L12U345" from the web app
                layer, unit = parse_unit(x.pop("label"))
                x.setdefault("layer", layer)
                x.setdefault("unit", unit)
            unknown = set(x) - {"layer", "unit", "op", "value", "positions", "vector", "token", "enabled"}
            if unknown:
                raise ValueError(f"interventions: unknown field(s) {sorted(unknown)}; accepted: layer, unit, op, "
                                 "value, positions, vector, token, enabled (or label 'L12U345')")
            if "layer" not in x:
                raise ValueError(f"interventions: {x!r} has no layer")
            return cls(**x)
        if isinstance(x, str):
            layer, unit = parse_unit(x)
            return cls(layer=layer, unit=unit)
        raise ValueError(f"interventions: got {x!r}; accepted: dicts, Intervention objects or 'L12U345' labels")


@dataclass
class SteerConfig:
    """The ``steer`` plugin's config: a list of :class:`Intervention` (dicts are accepted)."""

    interventions: Any = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.interventions, (str, dict, Intervention)):
            self.interventions = [self.interventions]
        if not isinstance(self.interventions, (list, tuple)):
            raise ValueError(f"interventions: got {self.interventions!r}; accepted: a list of interventions")
        self.interventions = [Intervention.coerce(x) for x in self.interventions]
        self._plan: dict = {}

    def to_json(self, **kw) -> str:
        return json.dumps({"interventions": [i.to_dict() for i in self.interventions]}, **kw)

    @classmethod
    def from_json(cls, text: str) -> "SteerConfig":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("interventions", [])
        return cls(interventions=data)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json(indent=2))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SteerConfig":
        return cls.from_json(Path(path).read_text())


def save(path: Union[str, Path], interventions: Any) -> None:
    """Write interventions (list or SteerConfig) as JSON."""
    cfg = interventions if isinstance(interventions, SteerConfig) else SteerConfig(interventions)
    cfg.save(path)


def load(path: Union[str, Path]) -> list:
    """Read interventions from JSON, as a list for ``enable(model, "steer", interventions=...)``."""
    return SteerConfig.load(path).interventions


# -- installation ----------------------------------------------------------------------------
def _hook_slot(model: Any, name: str) -> tuple[Any, str]:
    """(parent module, attribute) holding the hook point ``name`` (an alias resolved to its module),
    so the hook point is looked up at call time (SAELens may replace it)."""
    hp = model.hook_dict[name]
    for mod_name, mod in model.named_modules():
        if mod is hp and mod_name:
            parent, _, attr = mod_name.rpartition(".")
            return (model.get_submodule(parent) if parent else model), attr
    raise KeyError(f"hook point {name!r} is not a submodule of the model")


def install(model: Any, cfg: SteerConfig, backend: Any) -> None:
    """Validate ``cfg`` against the model and record, per layer, what the seam should arm."""
    check_mlp_supported(backend)
    plan: dict = {}
    for i, iv in enumerate(cfg.interventions):
        if iv.op in COEF_OPS:
            check_unit(backend, iv.layer, iv.unit, f"interventions[{i}].unit")
        else:
            backend.check_layer(iv.layer, f"interventions[{i}].layer")
        if not iv.enabled:
            continue
        entry = plan.setdefault(iv.layer, {"coef": [], "resid": [], "armed": []})
        if iv.op in COEF_OPS:
            entry["coef"].append(iv)
        else:
            if iv.vector is not None:
                if len(iv.vector) != backend.d_model:
                    raise ValueError(f"interventions[{i}].vector: {len(iv.vector)} floats; accepted: d_model = "
                                     f"{backend.d_model}")
                vec = torch.tensor(iv.vector, dtype=backend.dtype) * iv.value
            else:
                import tl_plugins

                tid = resolve_token(backend, iv.token, f"interventions[{i}].token")
                col = tl_plugins.weights(model).W_U[:, tid]
                vec = (col / col.norm().clamp_min(1e-12) * iv.value).to(backend.dtype)
            entry["resid"].append((iv, vec.to(backend.device)))
    for layer, entry in plan.items():
        entry["post"] = _hook_slot(model, backend.hook_name("mlp_post", layer)) if entry["coef"] else None
        entry["resid_slot"] = _hook_slot(model, backend.hook_name("resid_post", layer)) if entry["resid"] else None
    cfg._plan = plan


def uninstall(cfg: Optional[SteerConfig]) -> None:
    if cfg is None:
        return
    for entry in getattr(cfg, "_plan", {}).values():
        _disarm(entry)


def _disarm(entry: dict) -> None:
    for handle in entry["armed"]:
        handle.remove()
    entry["armed"].clear()


def _select(pos: Any) -> Any:
    if pos == "all":
        return slice(None)
    if pos == "last":
        return slice(-1, None)
    return slice(pos[0], pos[1])


def edit_coefficients(post: torch.Tensor, edits: list) -> torch.Tensor:
    """The edit a plain hook on ``hook_post`` [batch, pos, d_mlp] makes (a new tensor)."""
    post = post.clone()
    for iv in edits:
        idx = (Ellipsis, _select(iv.positions), iv.unit)
        if iv.op == "set":
            post[idx] = iv.value
        elif iv.op == "scale":
            post[idx] = post[idx] * iv.value
        else:
            post[idx] = post[idx] + iv.value
    return post


def edit_residual(resid: torch.Tensor, edits: list) -> torch.Tensor:
    resid = resid.clone()
    for iv, vec in edits:
        resid[:, _select(iv.positions)] += vec.to(resid.dtype)
    return resid


def arm(cfg: SteerConfig, layer: int) -> None:
    """Called from the MLP seam at ``layer``: arm one-shot hooks for this forward call."""
    entry = cfg._plan.get(layer)
    if not entry:
        return
    _disarm(entry)  # a forward aborted between the seam and the hook point left one armed
    for slot, fn in ((entry["post"], lambda t: edit_coefficients(t, entry["coef"])),
                     (entry["resid_slot"], lambda t: edit_residual(t, entry["resid"]))):
        if slot is None:
            continue
        hp = getattr(*slot)
        box: list = []

        def once(module, inputs, output, fn=fn, box=box):
            box[0].remove()
            if box[0] in entry["armed"]:
                entry["armed"].remove(box[0])
            return fn(output)

        handle = hp.register_forward_hook(once, prepend=True)
        box.append(handle)
        entry["armed"].append(handle)


def mlp_activation_wrapper(call: Any, out: Any) -> Any:
    cfg = call.config(PLUGIN)
    if cfg is not None:
        arm(cfg, call.layer)
    return out


def reference_hooks(backend: Any, interventions: Any) -> list:
    """The same edits as plain TransformerLens forward hooks (the tests' oracle, also handy for
    people who prefer hooks): a list of ``(hook name, fn)`` for ``model.hooks`` / ``run_with_hooks``."""
    cfg = SteerConfig(interventions)
    hooks = []
    for iv in cfg.interventions:
        if not iv.enabled:
            continue
        if iv.op in COEF_OPS:
            hooks.append((backend.hook_name("mlp_post", iv.layer), lambda t, hook, iv=iv: edit_coefficients(t, [iv])))
        else:
            vec = torch.tensor(iv.vector, dtype=backend.dtype) * iv.value if iv.vector is not None else None
            if vec is None:
                raise ValueError("reference_hooks: token directions need the model; pass a vector")
            hooks.append((backend.hook_name("resid_post", iv.layer),
                          lambda t, hook, iv=iv, vec=vec: edit_residual(t, [(iv, vec)])))
    return hooks


def generate(model: Any, prompt: Any, interventions: Any = (), *, max_new_tokens: int = 20,
             compare: bool = True, **kwargs: Any) -> dict:
    """Greedy continuations of ``prompt`` with the interventions applied and (``compare``) without.
    The model's plugins are as they were afterwards, also on error."""
    import tl_plugins
    from tl_embedspace.debugger.model import to_token_rows
    from tl_plugins import backends as _backends

    backend = _backends.detect(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 1024:
        raise ValueError(f"max_new_tokens: got {max_new_tokens!r}; accepted: an int in [1, 1024]")
    rows = to_token_rows(backend, prompt)
    if len(rows) != 1:
        raise ValueError("prompt: one prompt expected")
    toks = rows[0][None].to(backend.device)
    cfg = SteerConfig(list(interventions))
    if any(isinstance(iv.positions, list) for iv in cfg.interventions if iv.enabled):
        kwargs.setdefault("use_past_kv_cache", False)
    out = {"prompt_tokens": toks.shape[1]}

    def run():
        with torch.no_grad():
            res = backend.generate(toks, max_new_tokens, **kwargs)
        ids = res[0, toks.shape[1]:].tolist()
        tok = backend.tokenizer
        return {"ids": ids, "text": tok.decode(ids) if tok is not None else " ".join(map(str, ids))}

    with tl_plugins.enabled(model, PLUGIN, interventions=cfg.interventions):
        out["steered"] = run()
    if compare:
        out["plain"] = run()
    return out
