"""A resumed sweep never mixes settings, checks what it resumes from, and writes only where asked."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import tl_plugins
from tl_embedspace import EmbeddingSpace
from tl_embedspace.sweep import sweep


@pytest.fixture(scope="module")
def space():
    return EmbeddingSpace(tl_plugins.models.load("tiny-llama"))


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_other_settings_are_refused_before_anything_is_written(space, tmp_path):
    out = tmp_path / "run"
    sweep(space, out, k=5, k_neurons=3, progress=False)
    before = {p: (out / p).read_bytes() for p in _files(out)}
    for kw, what in ((dict(k=7, k_neurons=3), "k=5 there, 7 now"), (dict(k=5, k_neurons=4), "k_neurons"),
                     (dict(k=5, k_neurons=3, fmt="json"), "format")):
        with pytest.raises(ValueError, match=f"out_dir: .* holds a sweep with other settings.*{what}"):
            sweep(space, out, progress=False, **kw)
    other = EmbeddingSpace(space.model, read_basis="unembed")
    with pytest.raises(ValueError, match="basis"):
        sweep(other, out, k=5, k_neurons=3, progress=False)
    assert {p: (out / p).read_bytes() for p in _files(out)} == before


def test_resume_skips_intact_files_and_recomputes_damaged_ones(space, tmp_path):
    out = tmp_path / "run"
    first = sweep(space, out, k=5, k_neurons=3, progress=False)
    reference = {p: pd.read_parquet(out / p) for p in _files(out) if p.endswith(".parquet")}
    truncated = out / "neurons" / "values_L1.parquet"
    truncated.write_bytes(truncated.read_bytes()[:40])
    (out / "heads" / "ov_L0H2.parquet").unlink()
    again = sweep(space, out, k=5, k_neurons=3, progress=False)
    assert again["written"] == 2 and again["recomputed_damaged"] == 1
    assert again["skipped_existing"] == first["items"] - 2
    for p, df in reference.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / p), df)


def test_result_files_without_settings_are_refused(space, tmp_path):
    out = tmp_path / "run"
    sweep(space, out, k=5, k_neurons=3, progress=False)
    (out / "settings.json").unlink()
    with pytest.raises(ValueError, match="no settings.json"):
        sweep(space, out, k=5, k_neurons=3, progress=False)


def test_bad_arguments_create_no_folder_and_tilde_is_the_home(space, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexError, match="layer"):
        sweep(space, tmp_path / "bad", k=5, layers=[9], progress=False)
    with pytest.raises(ValueError, match="k"):
        sweep(space, tmp_path / "bad", k=0, progress=False)
    assert not (tmp_path / "bad").exists()
    sweep(space, "~/swept", k=3, k_neurons=2, layers=[0], progress=False)
    assert (tmp_path / "swept" / "settings.json").is_file() and not (tmp_path / "~").exists()
    assert json.loads((tmp_path / "swept" / "settings.json").read_text())["k"] == 3
