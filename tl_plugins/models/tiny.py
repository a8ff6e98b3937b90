"""Tiny random models built from configs: GPT-2-like and Llama-like (GQA, rotary, RMSNorm, gated MLP).

Seeded, and built inside ``torch.random.fork_rng()`` so loading one never moves the caller's global
RNG (``HookedTransformerConfig(seed=...)`` reseeds it otherwise).

``backend="hooked"`` builds a HookedTransformer from a TransformerLens config (random TL init, no
tokenizer); ``backend="bridge"`` builds the equivalent Hugging Face model (random HF init) with a
word-level tokenizer ("w4 w5 ...", ids 0-3 special) and boots a TransformerBridge on it, offline;
``"auto"`` is hooked where HookedTransformer exists (transformer-lens 3.x), bridge on 4.x.
:func:`hf_pair` gives a HookedTransformer and a bridge on the *same* weights, for parity checks.
:func:`build` on a transformer-lens without HookedTransformer builds the equivalent bridge for the
config fields that have a Hugging Face equivalent and refuses the others naming the field.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from tl_plugins.models.local import BACKENDS, hf_to_bridge, hf_to_hooked, hooked_available, resolve_backend  # noqa: F401


def _hooked_transformer():
    resolve_backend("hooked")  # explains a transformer-lens without HookedTransformer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer, HookedTransformerConfig


TINY_GPT2 = dict(
    n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=101, n_ctx=128,
    act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
    original_architecture="GPT2LMHeadModel",
)

TINY_LLAMA = dict(
    n_layers=2, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=97,
    n_ctx=128, act_fn="silu", normalization_type="RMS", final_rms=True,
    positional_embedding_type="rotary", rotary_dim=16, rotary_base=10000,
    rotary_adjacent_pairs=False, gated_mlp=True, original_architecture="LlamaForCausalLM",
    default_prepend_bos=False,
)


def build(base: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
          **overrides: Any):
    """Build a random HookedTransformer from ``base`` config fields updated with ``overrides``.

    On a transformer-lens without HookedTransformer (4.x) this builds the equivalent
    TransformerBridge instead (random Hugging Face init, see :func:`bridge_fields`): the fields with a
    Hugging Face equivalent are translated, any other field raises ``UnsupportedModelError`` naming it.
    """
    if not hooked_available():
        kind, hf_overrides = bridge_fields(base, **overrides)
        return tiny_bridge(kind, seed=seed, dtype=dtype, device=device, **hf_overrides)
    HookedTransformer, HookedTransformerConfig = _hooked_transformer()
    fields = {**base, **overrides}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(seed=seed, dtype=dtype, device=device, **fields)
        model = HookedTransformer(cfg)
    model.eval()
    from tl_plugins.processing import record_processing

    record_processing(model, fold_ln=False, center_writing_weights=False, center_unembed=False,
                      fold_value_biases=False)
    return model


#: TransformerLens config fields that :func:`build` translates to a Hugging Face config.
HF_EQUIVALENT_FIELDS = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp",
                        "d_vocab", "n_ctx", "act_fn")
_KINDS_BY_ARCH = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
# TL act_fn names that mean the same function in transformers' ACT2FN
_HF_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")


def bridge_fields(base: dict, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """(kind, overrides for :func:`hf_model`) of the bridge equivalent to ``build(base, **overrides)``.

    ``base`` must be :data:`TINY_GPT2` or :data:`TINY_LLAMA` (or agree with one on every field that is
    not in :data:`HF_EQUIVALENT_FIELDS`); those fields may be changed, ``rotary_base`` too for Llama.
    Anything else (``attn_only``, ALiBi or other positions, SoLU, local attention, ...) has no
    Hugging Face equivalent here and raises ``UnsupportedModelError`` naming the field.
    """
    from tl_plugins.errors import UnsupportedModelError

    arch = base.get("original_architecture", overrides.get("original_architecture"))
    kind = _KINDS_BY_ARCH.get(arch)
    if kind is None:
        raise UnsupportedModelError(
            f"original_architecture: got {arch!r}; a tiny bridge is built for "
            f"{', '.join(sorted(_KINDS_BY_ARCH))} (use tiny_bridge(kind) for gemma2, gemma3, qwen2)")
    canonical = TINY_GPT2 if kind == "gpt2" else TINY_LLAMA
    fields = {**base, **overrides}
    translatable = set(HF_EQUIVALENT_FIELDS) | ({"rotary_base", "rotary_dim"} if kind == "llama" else set())

    def refuse(key: str, why: str) -> None:
        raise UnsupportedModelError(
            f"{key}: got {fields[key]!r}; {why} (transformer-lens {_tl_version()} has no HookedTransformer, "
            f"so tiny.build makes the equivalent TransformerBridge, which translates only "
            f"{', '.join(sorted(translatable))})")

    for key in fields:
        if key in translatable:
            continue
        if key in canonical and fields[key] == canonical[key]:
            continue  # a fact of the architecture the Hugging Face model has anyway
        refuse(key, "this config field has no Hugging Face equivalent for a tiny "
                    f"{'GPT-2' if kind == 'gpt2' else 'Llama'} bridge")
    act = fields.get("act_fn")
    if act not in _HF_ACTS:
        refuse("act_fn", f"accepted for a bridge: {', '.join(_HF_ACTS)}")
    if kind == "gpt2":
        kv = fields.get("n_key_value_heads")
        if kv is not None and kv != fields["n_heads"]:
            refuse("n_key_value_heads", "GPT-2 has no grouped K/V heads (accepted: None or n_heads)")
        if fields["d_head"] * fields["n_heads"] != fields["d_model"]:
            refuse("d_head", f"GPT-2 needs d_head * n_heads == d_model ({fields['d_model']})")
        out = {k: fields[k] for k in HF_EQUIVALENT_FIELDS if k in fields and k != "n_key_value_heads"}
        # HookedTransformer's random init has its own W_U; GPT2LMHeadModel would tie it to W_E
        out["tie_word_embeddings"] = False
        return kind, out
    if fields.get("rotary_dim", fields["d_head"]) != fields["d_head"]:
        refuse("rotary_dim", f"Hugging Face Llama rotates the whole head (d_head {fields['d_head']}); "
                             "pass rotary_dim equal to d_head")
    return kind, {k: fields[k] for k in (*HF_EQUIVALENT_FIELDS, "rotary_base") if k in fields}


def _tl_version() -> str:
    from importlib import metadata

    return metadata.version("transformer-lens")


def tiny_gpt2(*, backend: str = "auto", **options: Any):
    """2 layers, d_model 64, 4 heads, vocab 101, LayerNorm, GELU, learned positions; random weights."""
    if resolve_backend(backend) == "bridge":
        return tiny_bridge("gpt2", **options)
    return build(TINY_GPT2, **options)


def tiny_llama(*, backend: str = "auto", **options: Any):
    """2 layers, d_model 64, 4 query heads over 2 K/V heads, rotary, RMSNorm, gated SiLU; random."""
    if resolve_backend(backend) == "bridge":
        return tiny_bridge("llama", **options)
    return build(TINY_LLAMA, **options)


def hf_model(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """The tiny model as a random Hugging Face model (``kind`` "llama" or "gpt2"), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "llama":
        b = {**TINY_LLAMA, **overrides}
        cfg = LlamaConfig(vocab_size=b["d_vocab"], hidden_size=b["d_model"], intermediate_size=b["d_mlp"],
                          num_hidden_layers=b["n_layers"], num_attention_heads=b["n_heads"],
                          num_key_value_heads=b.get("n_key_value_heads") or b["n_heads"],
                          head_dim=b["d_head"], max_position_embeddings=b["n_ctx"], rms_norm_eps=1e-5,
                          rope_theta=float(b["rotary_base"]), hidden_act=b["act_fn"], tie_word_embeddings=False,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cls = LlamaForCausalLM
    elif kind == "gpt2":
        b = {**TINY_GPT2, **overrides}
        cfg = GPT2Config(vocab_size=b["d_vocab"], n_embd=b["d_model"], n_layer=b["n_layers"],
                         n_head=b["n_heads"], n_inner=b["d_mlp"], n_positions=b["n_ctx"],
                         activation_function=b["act_fn"], layer_norm_epsilon=1e-5,
                         tie_word_embeddings=bool(b.get("tie_word_embeddings", True)),
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cls = GPT2LMHeadModel
    elif kind in _OTHER_KINDS:
        cls, cfg = _other_hf(kind, **overrides)
    else:
        raise ValueError(f"kind: got {kind!r}; accepted: llama, gpt2, {', '.join(_OTHER_KINDS)}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = cls(cfg).to(dtype).eval()
    return model


_OTHER_KINDS = ("gemma2", "gemma3", "qwen2")


def _other_hf(kind: str, **overrides: Any):
    """Tiny configs of other bridge families: Gemma 2 (soft-capping, sliding window every other
    layer), Gemma 3 (QK-norm, one KV head, local/global layers, query_pre_attn_scalar) and Qwen2
    (q/k/v biases). Bridge only: HookedTransformer has no offline converter for them here."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if kind == "gemma2":
        cfg = Gemma2Config(**{**common, "num_hidden_layers": 2, "num_key_value_heads": 2, "sliding_window": 4,
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                              "query_pre_attn_scalar": 8, **overrides})
        return Gemma2ForCausalLM, cfg
    if kind == "gemma3":
        cfg = Gemma3TextConfig(**{**common, "num_hidden_layers": 3, "num_key_value_heads": 1, "sliding_window": 4,
                                  "query_pre_attn_scalar": 8,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                                  **overrides})
        return Gemma3ForCausalLM, cfg
    cfg = Qwen2Config(**{**common, "num_hidden_layers": 2, "num_key_value_heads": 2, **overrides})
    return Qwen2ForCausalLM, cfg


def word_tokenizer(d_vocab: int):
    """A word-level tokenizer over ``d_vocab`` ids: <unk> <bos> <eos> <pad>, then "w4" ... (offline).

    Saved once under the user cache and loaded from there: HookedTransformer re-reads a tokenizer
    from its folder to add a BOS token.
    """
    import os
    import shutil
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tl_plugins.models.cache import cache_dir

    folder = cache_dir() / f"tiny-tokenizer-{int(d_vocab)}"
    if not (folder / "tokenizer.json").is_file():
        vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}
        vocab.update({f"w{i}": i for i in range(4, d_vocab)})
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                                       eos_token="<eos>", pad_token="<pad>")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        fast.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(folder)


def tiny_bridge(kind: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                compatibility_mode: bool = False, **overrides: Any):
    """The tiny model of ``kind`` ("llama", "gpt2", "gemma2", "gemma3", "qwen2") as a
    TransformerBridge booted offline with TransformerLens's own ``boot_transformers``."""

    hf = hf_model(kind, seed=seed, dtype=dtype, **overrides)
    tok = word_tokenizer(hf.config.vocab_size)
    # booting splits GPT-2's fused QKV into freshly built nn.Linear modules, whose default
    # initialisation draws from the global RNG: keep it inside a seeded fork
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bridge = hf_to_bridge(hf, tok, processed=compatibility_mode, device=device)
    if kind == "llama":
        bridge.cfg.default_prepend_bos = False  # as the hooked tiny-llama
    return bridge


def hf_pair(kind: str, *, seed: int = 0, **overrides: Any):
    """(HookedTransformer, TransformerBridge) on the same random weights (transformer-lens 3.x)."""
    import copy


    hf = hf_model(kind, seed=seed, **overrides)
    tok = word_tokenizer(hf.config.vocab_size)
    with torch.random.fork_rng(devices=[]):  # as in tiny_bridge: booting may draw from the RNG
        torch.manual_seed(seed)
        hooked = hf_to_hooked(hf, tok)
        bridge = hf_to_bridge(copy.deepcopy(hf), tok)
    if kind == "llama":
        bridge.cfg.default_prepend_bos = False
    return hooked, bridge
