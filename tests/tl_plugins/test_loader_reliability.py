"""Loaders validate options by type, wrap damaged files with the path and the fix, and rebuild a
damaged cache entry of the zoo's real model instead of failing on every load."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_plugins.errors import ModelFetchError
from tl_plugins.models import local, tiny


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf = tiny.hf_model("llama")
    hf.save_pretrained(folder)
    tiny.word_tokenizer(hf.config.vocab_size).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("options, error, match", [
    (dict(processed="no"), TypeError, "processed: got 'no'; accepted: True or False"),
    (dict(processed=1), TypeError, "processed: got 1"),
    (dict(n_ctx=0), ValueError, "n_ctx: got 0"),
    (dict(n_ctx=True), ValueError, "n_ctx: got True"),
    (dict(n_ctx=-5), ValueError, "n_ctx: got -5"),
    (dict(dtype="float32"), TypeError, "dtype: got 'float32'"),
    (dict(dtype=torch.int64), TypeError, "dtype: got torch.int64"),
    (dict(device="gpu9"), ValueError, "device: got 'gpu9'"),
])
def test_options_are_checked_by_type(hf_folder, options, error, match):
    with pytest.raises(error, match=match):
        local.load_hf_folder(hf_folder, **options)
    with pytest.raises(error, match=match):
        tl_plugins.models.load("smollm2-135m", **options)  # refused before any fetch or load


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_and_tokenizer_name_the_path_and_the_fix(hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "weights")
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFetchError, match=r"path: could not read the model files in .*weights.*truncated"):
        local.load_hf_folder(bad)
    bad = _copy(hf_folder, tmp_path / "tok")
    (bad / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ModelFetchError, match=r"path: could not read the tokenizer files in .*tok"):
        local.load_hf_folder(bad)


def test_a_good_folder_loads_and_tilde_expands(hf_folder, monkeypatch):
    monkeypatch.setenv("HOME", str(hf_folder.parent))
    model = local.load_hf_folder(f"~/{hf_folder.name}")
    assert model.cfg.d_vocab == 97


@pytest.mark.slow
def test_damaged_smollm2_cache_is_rebuilt(tmp_path, monkeypatch):
    """Copy the real cache (GGUF + HF folder), truncate the cached weights, load: rebuilt from the GGUF."""
    import shutil

    from tl_plugins.models import smollm2

    src = smollm2.model_dir()
    smollm2.ensure_hf_folder()
    monkeypatch.setenv("TL_PLUGINS_CACHE", str(tmp_path / "cache"))
    dst = smollm2.model_dir()
    dst.mkdir(parents=True)
    for name in [p.name for p in src.iterdir() if p.suffix == ".gguf"]:
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "hf", dst / "hf")
    weights = next((dst / "hf").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    hf, tok = smollm2.load_hf(progress=False)
    assert hf.config.num_hidden_layers == 30 and tok("hello")["input_ids"]
    assert weights.stat().st_size > (1 << 20)  # rewritten whole
