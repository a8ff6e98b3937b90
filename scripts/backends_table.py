"""Tabulate which TransformerBridge architectures the plugins support (writes docs/backends.md).

For every architecture adapter of the installed transformer-lens (the registry
``transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES`` plus any adapter class
found in ``transformer_lens/model_bridge/supported_architectures/`` that the registry does not name), the
adapter is built with a small fake ``TransformerBridgeConfig`` and its ``component_mapping`` is read: the
attention and MLP bridge classes of each block stack. No model is built and nothing is downloaded. An adapter
that cannot be built with the fake config is listed with the reason and, as a hint, the bridge classes its
source module constructs.

The support columns come from ``tl_plugins.backends.bridge.support_table()`` (attention bridge class name ->
{"topk": ..., "embedspace": ..., "iclgd": ...}); while that function does not exist they read "pending".

Run inside the TransformerLens 4.x environment, from the repository root:

    PYTHONPATH=. .venv-tl4/bin/python scripts/backends_table.py --out docs/backends.md

Without --out the markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PLUGINS = ("topk", "embedspace", "iclgd")
REGEN = "PYTHONPATH=. .venv-tl4/bin/python scripts/backends_table.py --out docs/backends.md"

# Sub-module keys of a block that are attention / feed-forward in the adapters' component mappings.
ATTN_KEYS = ("attn", "self_attn", "cross_attn")
MLP_KEYS = ("mlp", "shared_mlp", "channel_mix", "ffn")

# The fake config: small, grouped-query, every field the adapters commonly read.
FAKE_CFG = dict(d_model=64, d_head=16, n_layers=2, n_ctx=64, n_heads=4, d_vocab=100, d_mlp=256,
                n_key_value_heads=2)


@dataclass
class Row:
    architecture: str
    adapter: str
    module: str
    attn: list[tuple[str, str]] = field(default_factory=list)   # (where, class name)
    mlp: list[tuple[str, str]] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)  # mixers, linear attention, ...
    error: str | None = None
    hint: str | None = None


def tl_version() -> str:
    return metadata.version("transformer-lens")


def registry() -> dict[str, type]:
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except Exception:  # an older layout: fall back to the module walk alone
        return {}
    return dict(SUPPORTED_ARCHITECTURES)


def adapter_classes() -> tuple[dict[type, str], list[tuple[str, str]]]:
    """Every ArchitectureAdapter subclass defined in supported_architectures/ -> its module; import failures."""
    import transformer_lens.model_bridge.supported_architectures as pkg
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    found: dict[type, str] = {}
    failed: list[tuple[str, str]] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{pkg.__name__}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - one broken module must not hide the others
            failed.append((info.name, f"{type(e).__name__}: {e}"))
            continue
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, ArchitectureAdapter) and obj is not ArchitectureAdapter
                    and obj.__module__ == mod.__name__):
                found[obj] = info.name
    return found, failed


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def source_hint(cls: type) -> str:
    """Bridge classes constructed in the adapter's module (for adapters that could not be built)."""
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except Exception:  # noqa: BLE001
        return ""
    names = sorted(set(re.findall(r"\b(\w*(?:AttentionBridge|MLPBridge|MoEBridge))\(", src)))
    return ", ".join(names)


def inspect_adapter(arch: str, cls: type, module: str) -> Row:
    from transformer_lens.config.transformer_bridge_config import TransformerBridgeConfig

    row = Row(arch, cls.__name__, module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = TransformerBridgeConfig(**FAKE_CFG, architecture=arch)
            mapping = cls(cfg).component_mapping
        if not mapping:
            raise ValueError("empty component_mapping")
    except Exception as e:  # noqa: BLE001
        row.error = _short(e)
        row.hint = source_hint(cls)
        return row
    for stack, comp in mapping.items():
        subs = getattr(comp, "submodules", None) or {}
        if not isinstance(subs, dict) or not any(k in subs for k in ATTN_KEYS + MLP_KEYS + ("mixer",)):
            continue
        for key, sub in subs.items():
            where, name = f"{stack}.{key}", type(sub).__name__
            if key in ATTN_KEYS:
                row.attn.append((where, name))
            elif key in MLP_KEYS:
                row.mlp.append((where, name))
            elif not re.match(r"^(ln|norm|pre_ln|attn_norm|ffn_norm)", key) and "Normalization" not in name:
                row.other.append((where, name))
    if not row.attn and not row.mlp and not row.other:
        row.error = "no block stack with attn/mlp sub-modules in component_mapping"
        row.hint = source_hint(cls)
    return row


def collect() -> tuple[list[Row], list[tuple[str, str]]]:
    reg = registry()
    classes, failed_modules = adapter_classes()
    rows = []
    for arch, cls in sorted(reg.items(), key=lambda kv: kv[0].lower()):
        rows.append(inspect_adapter(arch, cls, classes.get(cls, cls.__module__.rsplit(".", 1)[-1])))
    registered = set(reg.values())
    for cls, module in sorted(classes.items(), key=lambda kv: kv[0].__name__):
        if cls not in registered:
            rows.append(inspect_adapter(f"({cls.__name__}, not in the registry)", cls, module))
    return rows, failed_modules


def support() -> tuple[dict[str, dict[str, str]] | None, str]:
    try:
        bridge = importlib.import_module("tl_plugins.backends.bridge")
    except Exception as e:  # noqa: BLE001
        return None, f"tl_plugins.backends.bridge could not be imported ({_short(e, 100)})"
    fn = getattr(bridge, "support_table", None)
    if fn is None:
        return None, "tl_plugins.backends.bridge.support_table() does not exist yet"
    try:
        return fn(), "tl_plugins.backends.bridge.support_table()"
    except Exception as e:  # noqa: BLE001
        return None, f"tl_plugins.backends.bridge.support_table() failed ({_short(e, 100)})"


def attn_class(name: str) -> type | None:
    from transformer_lens.model_bridge import generalized_components as gc

    obj = getattr(gc, name, None)
    return obj if isinstance(obj, type) else None


KEY_METHODS = ("forward", "_reconstruct_attention", "_apply_reconstruct_attention_mask", "_masked_softmax",
               "_update_kv_cache")


def cell_for(cls_name: str, plugin: str, table: dict | None, classes_by_name: dict[str, type]) -> str:
    if table is None:
        return "pending"
    if cls_name in table:
        return table[cls_name].get(plugin, "pending")
    cls = classes_by_name.get(cls_name)
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if cls is None or not issubclass(cls, AttentionBridge):
        return "n/a: not an AttentionBridge"
    # An adapter-private subclass: what the table says about its nearest listed base, marked as unverified,
    # with the methods the subclass overrides (an override of forward may bypass the seam).
    for base in cls.__mro__[1:]:
        if base.__name__ in table:
            own = [m for m in KEY_METHODS if m in vars(cls)]
            over = f", overrides {', '.join(own)}" if own else ""
            return f"unverified (subclass of {base.__name__}{over}; base: {table[base.__name__].get(plugin, 'pending')})"
    return "not in support_table"


def _brief(cell: str) -> str:
    """Per-architecture cells: the long reasons live in the class table."""
    if cell.startswith("refused"):
        return "refused"
    if cell.startswith("unverified"):
        return "unverified"
    return cell


def _uniq(pairs: list[tuple[str, str]]) -> str:
    """'A' when every stack uses A, else 'stack.key: A; ...'."""
    names = {n for _, n in pairs}
    if not pairs:
        return "-"
    if len(names) == 1:
        return f"`{pairs[0][1]}`"
    return "; ".join(f"{w}: `{n}`" for w, n in pairs)


def render(rows: list[Row], failed_modules: list[tuple[str, str]], table: dict | None, source: str) -> str:
    import transformers

    classes_by_name: dict[str, type] = {}
    for r in rows:
        for _, n in r.attn:
            c = attn_class(n)
            if c is not None:
                classes_by_name[n] = c
    # adapter-private classes are not in generalized_components: find them through the adapters' modules
    for r in rows:
        mod = sys.modules.get(f"transformer_lens.model_bridge.supported_architectures.{r.module}")
        for _, n in r.attn:
            if n not in classes_by_name and mod is not None and isinstance(getattr(mod, n, None), type):
                classes_by_name[n] = getattr(mod, n)

    extra = [r for r in rows if r.architecture.startswith("(")]  # adapter classes the registry does not name
    rows = [r for r in rows if not r.architecture.startswith("(")]
    ok = [r for r in rows if r.error is None]
    bad = [r for r in rows if r.error is not None]
    per_attn: dict[str, list[str]] = defaultdict(list)
    for r in ok:
        for n in sorted({n for _, n in r.attn}) or ["(no attention)"]:
            per_attn[n].append(r.architecture)
    per_mlp = Counter(n for r in ok for n in {n for _, n in r.mlp})

    today = _dt.date.today().isoformat()
    out = [
        "# TransformerBridge architectures and plugin support",
        "",
        f"Generated by `scripts/backends_table.py` on {today} from transformer-lens {tl_version()} "
        f"(transformers {transformers.__version__}). The script builds every architecture adapter that "
        "TransformerLens registers with a small fake config (no model, no download) and reads the attention "
        "and MLP bridge classes from the adapter's `component_mapping`; the class an adapter picks can depend "
        "on the real config (for instance on the attention implementation or on a per-layer type), so treat "
        "this as the default choice. The support columns come from " + source + ". Regenerate with:",
        "",
        "```bash",
        REGEN,
        "```",
        "",
        f"{len(rows)} registered architecture names ({len({r.adapter for r in rows})} adapter classes): "
        f"{len(ok)} inspected, "
        f"{len(bad)} could not be inspected (listed at the end). "
        f"{len([n for n in per_attn if not n.startswith('(')])} attention bridge classes "
        f"({len(per_attn.get('(no attention)', []))} architectures have none), "
        f"{len(per_mlp)} MLP bridge classes.",
        "",
        "## Attention bridge classes",
        "",
        "| attention bridge class | architectures | " + " | ".join(PLUGINS) + " |",
        "|---|---|" + "---|" * len(PLUGINS),
    ]
    for n, archs in sorted(per_attn.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        cells = [cell_for(n, p, table, classes_by_name) if n != "(no attention)" else "-" for p in PLUGINS]
        out.append(f"| `{n}` | {len(archs)} | " + " | ".join(cells) + " |")
    out += ["", "## MLP bridge classes", "", "| MLP bridge class | architectures |", "|---|---|"]
    for n, c in per_mlp.most_common():
        out.append(f"| `{n}` | {c} |")
    out += [
        "",
        "## Architectures",
        "",
        "An architecture with several attention classes (encoder-decoders: self- and cross-attention) gets "
        "one support entry per class; \"refused\" and \"unverified\" are explained in the table of attention "
        "classes above. \"other\" lists non-attention mixers (state-space, linear attention, convolutions) that "
        "no plugin changes.",
        "",
        "| architecture | adapter | attention bridge class | MLP bridge class | other | " + " | ".join(PLUGINS) + " |",
        "|---|---|---|---|---|" + "---|" * len(PLUGINS),
    ]
    for r in ok:
        names = sorted({n for _, n in r.attn})
        cells = []
        for p in PLUGINS:
            vals = [(n, _brief(cell_for(n, p, table, classes_by_name))) for n in names]
            if not vals:
                cells.append("-")
            elif len({v for _, v in vals}) == 1:
                cells.append(vals[0][1])
            else:
                cells.append("; ".join(f"{n}: {v}" for n, v in vals))
        other = ", ".join(f"`{n}`" for n in sorted({n for _, n in r.other})) or "-"
        out.append(f"| {r.architecture} | {r.adapter} | {_uniq(r.attn)} | {_uniq(r.mlp)} | {other} | "
                   + " | ".join(cells) + " |")
    if extra:
        out += ["", "## Adapter classes the registry does not name (base classes; not counted above)", "",
                "| adapter | module | attention bridge class | MLP bridge class |", "|---|---|---|---|"]
        for r in extra:
            att = _uniq(r.attn) if r.error is None else f"could not be inspected: {r.error}"
            out.append(f"| {r.adapter} | {r.module} | {att.replace('|', chr(92) + '|')} | "
                       f"{_uniq(r.mlp) if r.error is None else '-'} |")
    if bad or failed_modules:
        out += ["", "## Adapters that could not be inspected", "",
                "| architecture | adapter | reason | bridge classes its module constructs |", "|---|---|---|---|"]
        for r in bad:
            reason = r.error.replace("|", "\\|")
            out.append(f"| {r.architecture} | {r.adapter} | adapter could not be inspected: {reason} | "
                       f"{r.hint or '-'} |")
        for m, e in failed_modules:
            out.append(f"| (module {m}) | - | module could not be imported: {e.replace('|', chr(92) + '|')} | - |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    args = ap.parse_args(argv)
    rows, failed = collect()
    table, source = support()
    text = render(rows, failed, table, source)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        reg = [r for r in rows if not r.architecture.startswith("(")]
        n_bad = sum(r.error is not None for r in reg)
        print(f"wrote {args.out}: {len(reg)} architectures, {n_bad} not inspected; support from {source}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
