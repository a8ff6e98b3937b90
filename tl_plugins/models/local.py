"""Load a user's own local Llama- or GPT-2-family files into a HookedTransformer, with no model hub.

``load_hf_folder(path)``: a Hugging Face folder (config.json + safetensors/bin, tokenizer files).
``load_gguf(path)``: a GGUF file (dequantised to float by transformers + gguf).
Weights are loaded unprocessed by default (``processed=False``), as embedding-space projections
and gradient-descent comparisons need; ``processed=True`` applies TransformerLens's defaults.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from tl_plugins.checks import is_int
from tl_plugins.errors import ModelFetchError, UnsupportedModelError

_FIX_HINT = "pip install 'tl-plugins[gguf]'  (gguf, transformers, safetensors)"


BACKENDS = ("auto", "hooked", "bridge")


def _tl_major() -> int:
    from importlib import metadata

    return int(metadata.version("transformer-lens").split(".")[0])


def hooked_available() -> bool:
    """True when transformer-lens has HookedTransformer (3.x). An ImportError for any other reason
    (a broken install, a missing dependency) is raised with its own message, not guessed at."""
    if _tl_major() >= 4:
        return False
    from transformer_lens import HookedTransformer  # noqa: F401

    return True


def resolve_backend(backend: Any) -> str:
    """``"hooked"`` or ``"bridge"`` for a zoo ``backend`` option (``"auto"``: hooked where it exists)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; accepted: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "hooked" if hooked_available() else "bridge"
    if backend == "hooked" and not hooked_available():
        import importlib.metadata as md

        raise ImportError(
            f"backend='hooked': transformer-lens {md.version('transformer-lens')} has no HookedTransformer "
            "(4.0 removed it); use backend='bridge' or 'auto', or install transformer-lens 3.x")
    return backend


def check_load_options(*, processed: Any, n_ctx: Any, dtype: Any, device: Any) -> None:
    """Validate the options every loader shares (by type, not by truthiness: ``n_ctx=0`` and
    ``processed="no"`` are errors, not defaults)."""
    if not isinstance(processed, bool):
        raise TypeError(f"processed: got {processed!r}; accepted: True or False")
    if n_ctx is not None and (not is_int(n_ctx) or n_ctx <= 0):
        raise ValueError(f"n_ctx: got {n_ctx!r}; accepted: a positive int or None (the model's own)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: got {dtype!r}; accepted: a floating torch.dtype such as torch.float32")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: got {device!r}; accepted: 'cpu', 'cuda', 'cuda:0', ...") from exc


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelFetchError(f"loading local model files needs transformers: {_FIX_HINT}") from exc
    return transformers


def hooked_config_from_hf(hf_cfg: Any, *, n_ctx: Optional[int] = None, dtype=torch.float32,
                          device: str = "cpu") -> Any:
    """A HookedTransformerConfig for a Hugging Face Llama or GPT-2 config (no hub needed)."""
    from transformer_lens import HookedTransformerConfig

    arch = (getattr(hf_cfg, "architectures", None) or [type(hf_cfg).__name__])[0]
    mt = getattr(hf_cfg, "model_type", "")
    if mt == "llama" or arch == "LlamaForCausalLM":
        rope = getattr(hf_cfg, "rope_parameters", None) or {}
        scaling = getattr(hf_cfg, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UnsupportedModelError(f"path: rope scaling {scaling!r} is not supported; accepted: none")
        base = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
        n_heads = hf_cfg.num_attention_heads
        d_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
        n_kv = getattr(hf_cfg, "num_key_value_heads", None) or n_heads
        fields = dict(
            d_model=hf_cfg.hidden_size, d_head=d_head, n_heads=n_heads,
            n_key_value_heads=n_kv if n_kv != n_heads else None,
            d_mlp=hf_cfg.intermediate_size, n_layers=hf_cfg.num_hidden_layers,
            n_ctx=n_ctx or min(int(hf_cfg.max_position_embeddings), 2048),
            eps=hf_cfg.rms_norm_eps, d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.hidden_act,
            normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
            rotary_dim=d_head, rotary_base=base, rotary_adjacent_pairs=False, gated_mlp=True,
            original_architecture="LlamaForCausalLM", default_prepend_bos=False,
            dtype=dtype, device=device,
        )
        return HookedTransformerConfig(**fields)
    if mt == "gpt2" or arch == "GPT2LMHeadModel":
        return HookedTransformerConfig(
            d_model=hf_cfg.n_embd, d_head=hf_cfg.n_embd // hf_cfg.n_head, n_heads=hf_cfg.n_head,
            d_mlp=hf_cfg.n_inner or 4 * hf_cfg.n_embd, n_layers=hf_cfg.n_layer,
            n_ctx=n_ctx or hf_cfg.n_positions, eps=hf_cfg.layer_norm_epsilon,
            d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.activation_function, normalization_type="LN",
            positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
            dtype=dtype, device=device,
        )
    raise UnsupportedModelError(
        f"path: model_type {mt!r} (architecture {arch!r}) is not supported; accepted: llama, gpt2"
    )


def hf_to_hooked(hf_model: Any, tokenizer: Any = None, *, processed: bool = False,
                 n_ctx: Optional[int] = None, dtype=torch.float32, device: str = "cpu"):
    """Convert an in-memory HF Llama/GPT-2 model into a HookedTransformer with TL's converters."""
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights


    cfg = hooked_config_from_hf(hf_model.config, n_ctx=n_ctx, dtype=dtype, device=device)
    convert = convert_llama_weights if cfg.original_architecture == "LlamaForCausalLM" else convert_gpt2_weights
    state_dict = convert(hf_model, cfg)
    if "unembed.b_U" not in state_dict:  # GPT-2's lm_head has no bias; HookedTransformer has one
        state_dict["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=cfg.dtype)
    return hooked_from_state_dict(cfg, state_dict, tokenizer, processed=processed, device=device)


def hooked_from_state_dict(cfg: Any, state_dict: dict, tokenizer: Any = None, *, processed: bool = False,
                           device: str = "cpu"):
    """A HookedTransformer of ``cfg`` holding ``state_dict`` (TransformerLens names), unprocessed or
    with TransformerLens's default processing, in eval mode, its processing recorded; the global RNG
    is left as it was (construction draws no random init: loading overwrites it)."""
    from transformer_lens import HookedTransformer

    from tl_plugins.processing import record_processing

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Skip the random init that loading overwrites, for this construction only: model.cfg is
        # cfg, and HookedTransformer(model.cfg) elsewhere (an untrained baseline) must initialise.
        cfg.init_weights = False
        try:
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
        finally:
            cfg.init_weights = True
        flags = dict(fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
                     fold_value_biases=processed)
        if processed:
            model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **flags)
        else:
            load_unprocessed(model, state_dict)
    model.to(device)
    model.eval()
    record_processing(model, **flags)
    return model


def hf_to_bridge(hf_model: Any, tokenizer: Any = None, *, processed: bool = False,
                 n_ctx: Optional[int] = None, device: str = "cpu"):
    """Boot a TransformerBridge on an in-memory HF model, offline (TransformerLens's own
    ``boot_transformers``); ``processed=True`` turns on compatibility mode (TransformerLens's weight
    processing: fold_ln, centering). The bridge rewires ``hf_model``: pass a copy you do not reuse."""
    from tl_plugins.backends.bridge import boot
    from tl_plugins.processing import record_processing

    bridge = boot(hf_model, tokenizer, device=device)
    if n_ctx is not None:
        bridge.cfg.n_ctx = int(n_ctx)
    if processed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge.enable_compatibility_mode(disable_warnings=True)
    flags = dict(fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
                 fold_value_biases=processed)
    record_processing(bridge, **flags)
    return bridge


def load_unprocessed(model: Any, state_dict: dict) -> None:
    """One ``load_state_dict`` call instead of TransformerLens's per-parameter loop (seconds faster).

    Only buffers (masks, rotary tables) may be missing from a converted state dict; a missing
    parameter would stay uninitialised (``init_weights=False``), so that is an error.
    """
    result = model.load_state_dict(state_dict, strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        raise ModelFetchError(
            f"converted weights do not fit the model: missing parameters {missing[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )


def load_hf_model(path: str | os.PathLike):
    """The HF model and tokenizer of a local folder, float32, on CPU."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelFetchError(f"path: {str(path)!r} has no config.json; expected a Hugging Face model folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ModelFetchError(
            f"path: could not read the model files in {str(path)!r} ({type(exc).__name__}: {exc}); a "
            "weights file (safetensors/bin) or config.json may be truncated or corrupt: delete the folder "
            "and fetch or save the model again") from exc
    has_tok = (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(path) if has_tok else None
    except Exception as exc:
        raise ModelFetchError(
            f"path: could not read the tokenizer files in {str(path)!r} ({type(exc).__name__}: {exc}); "
            "tokenizer.json may be truncated or corrupt: save the tokenizer again") from exc
    hf.eval()
    return hf, tok


def load_hf_folder(path: str | os.PathLike, *, processed: bool = False, n_ctx: Optional[int] = None,
                   dtype=torch.float32, device: str = "cpu", backend: str = "auto"):
    """Load a local Hugging Face folder as a HookedTransformer (Llama or GPT-2 family) or, with
    ``backend="bridge"`` (the default on transformer-lens 4.x), as a TransformerBridge."""

    check_load_options(processed=processed, n_ctx=n_ctx, dtype=dtype, device=device)
    kind = resolve_backend(backend)
    hf, tok = load_hf_model(path)
    if kind == "bridge":
        return hf_to_bridge(hf.to(dtype), tok, processed=processed, n_ctx=n_ctx, device=device)
    return hf_to_hooked(hf, tok, processed=processed, n_ctx=n_ctx, dtype=dtype, device=device)


def read_gguf(path: str | os.PathLike):
    """Parse and dequantise a GGUF file into an HF model and tokenizer (about 20 s for 135M params)."""
    _require_transformers()
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelFetchError(f"reading GGUF files needs the gguf package: {_FIX_HINT}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelFetchError(f"path: GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelFetchError(f"path: {str(path)!r} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelFetchError(
            f"path: could not read GGUF file {str(path)!r} ({type(exc).__name__}: {exc}); the file may be "
            "truncated or corrupt: delete it and fetch it again"
        ) from exc
    cfg = hf.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    hf.eval()
    return hf, tok


def load_gguf(path: str | os.PathLike, *, processed: bool = False, n_ctx: Optional[int] = None,
              dtype=torch.float32, device: str = "cpu", backend: str = "auto"):
    """Load a local GGUF file as a HookedTransformer (Llama or GPT-2 family) or a TransformerBridge
    (``backend``, as in :func:`load_hf_folder`); weights dequantised."""

    check_load_options(processed=processed, n_ctx=n_ctx, dtype=dtype, device=device)
    kind = resolve_backend(backend)
    hf, tok = read_gguf(path)
    if kind == "bridge":
        return hf_to_bridge(hf.to(dtype), tok, processed=processed, n_ctx=n_ctx, device=device)
    return hf_to_hooked(hf, tok, processed=processed, n_ctx=n_ctx, dtype=dtype, device=device)
