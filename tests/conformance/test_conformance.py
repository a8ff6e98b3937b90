"""TransformerLens's own tests, run with a tl_plugins plugin enabled on every model they build.

For each configuration the selected TL test files (see ``harness.SELECTED``) run once in a
subprocess; every test that passes (or is skipped) without a plugin must do the same with it, and
the plugin must really have been enabled (on whole models and on bare attention modules).

Two suites: the HookedTransformer one (``harness.SELECTED``; transformer-lens 3.x only, it skips on
4.x, which removed HookedTransformer) and the TransformerBridge one (``harness.BRIDGE_SELECTED``,
``bridge-*`` configurations; both legs): the plugin on every bridge and every bare attention bridge
the TL bridge tests build.

Configurations:
    passthrough   a plugin declaring attention_seam=True and mlp_seam=True that changes nothing:
                  the host's seams alone (TransformerLens attention re-run through the seam)
    topk-dense    ``topk`` with k larger than any sequence (every row dense, must equal TL)
    topk-dense-ff ``topk`` with k as above and ff_k = d_mlp (top-k feed-forward keeping every unit)
The ``topk`` configurations skip, naming why, while ``tl_plugins.enable(model, "topk", k=...)``
does not work yet.
"""

from __future__ import annotations

import dataclasses

import harness
import pytest

pytestmark = pytest.mark.slow

# Attention variants the host's seam refuses by design (UnsupportedModelError); the TL tests that
# build them run on the plain module and the refusal is listed, not counted as an enable.
SEAM_REFUSALS = ("cfg.clip_qkv=", "cfg.use_logn_attn=", "cfg.load_in_4bit=")
# top-k feed-forward refuses activations for which zeroing pre-activations is not top-k of the
# outputs (documented in docs/topk.md), e.g. SoLU.
FF_REFUSALS = ("ff_k: model act_fn",)

CONFIGS = harness.CONFIGS
BRIDGE_CONFIGS = harness.BRIDGE_CONFIGS

hooked_suite = pytest.mark.skipif(
    not harness.hooked_available(),
    reason=f"transformer-lens {harness.tl_version()} has no HookedTransformer (4.x removed it): "
           "the HookedTransformer suite runs on the TL 3.x leg; the bridge suite runs here")
EXPECTED_REFUSALS = {
    "passthrough": SEAM_REFUSALS,
    "topk-dense": SEAM_REFUSALS,
    "topk-dense-ff": SEAM_REFUSALS + FF_REFUSALS,
    "topk-kernel": SEAM_REFUSALS,
    "topk-cycled": SEAM_REFUSALS + FF_REFUSALS,
}


def topk_unavailable(config: dict):
    """Why ``topk`` with ``config`` cannot be enabled now (None when it can)."""
    import tl_plugins
    from tl_plugins.plugins import entry_points, registry

    if "topk" not in registry():
        status = [r.status for r in entry_points() if r.name == "topk"]
        return f'"topk" is not in the tl_plugins registry yet (entry point: {status or "absent"})'
    fields = {f.name for f in dataclasses.fields(registry()["topk"].config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        return f"the topk config has no field(s) {unknown} (fields: {sorted(fields)})"
    model = tl_plugins.models.load("tiny-gpt2")
    probe = {k: (model.cfg.d_mlp if v == "$d_mlp" else v) for k, v in config.items()}
    try:
        tl_plugins.enable(model, "topk", **probe)
        tl_plugins.disable(model, "topk")
    except Exception as exc:  # noqa: BLE001 - any failure means the plugin is not usable yet
        return f'tl_plugins.enable(tiny-gpt2, "topk", **{probe}) fails: {type(exc).__name__}: {exc}'
    return None


@pytest.fixture(scope="module", params=list(CONFIGS))
def plugin_run(request, conformance_runs):
    if not harness.hooked_available():
        pytest.skip(f"transformer-lens {harness.tl_version()} has no HookedTransformer")
    spec = CONFIGS[request.param]
    if spec["plugin"] == "topk":
        reason = topk_unavailable(spec["config"])
        if reason:
            pytest.skip(reason)
    return conformance_runs(request.param, **spec)


@hooked_suite
def test_sdist_carries_the_selected_files(tl_root):
    missing = [f for f in harness.SELECTED if not (tl_root / f).exists()]
    if harness.tl_version() == "3.9.0":
        assert not missing, f"selected files absent from the 3.9.0 sdist: {missing}"
    else:  # another TL version may have moved some; most must still be there
        assert len(missing) <= len(harness.SELECTED) // 2, missing


@hooked_suite
def test_baseline_runs_offline_and_mostly_passes(baseline):
    counts = baseline.counts()
    collection_errors = {k: v for k, v in baseline.longrepr.items() if "::" not in k}
    assert not collection_errors, f"collection errors in the baseline run: {collection_errors}"
    assert counts["passed"] >= 0.85 * len(baseline.outcomes), (counts, baseline.output_tail)
    # the baseline enables nothing: the enable counters are tied to the plugin under test
    assert baseline.model_enables == 0 and baseline.module_enables == 0


@hooked_suite
def test_plugin_run_matches_baseline(baseline, plugin_run):
    cmp = harness.compare(baseline, plugin_run)
    assert not cmp.missing, cmp.message()
    assert not cmp.regressions, cmp.message()


@hooked_suite
def test_plugin_was_really_enabled(plugin_run):
    assert plugin_run.model_enables > 0, "no HookedTransformer built by the TL tests got the plugin"
    assert plugin_run.module_enables > 0, "no bare attention module built by the TL tests got the plugin"
    files_enabled = {t.split("::")[0] for t, n in plugin_run.enables_per_test.items() if n > 0}
    files_refused = {r["test"].split("::")[0] for r in plugin_run.refused}
    files_run = {t.split("::")[0] for t in plugin_run.outcomes}
    # every selected file builds at least one model or attention module with the plugin on, or
    # builds only models the plugin refuses (checked below to be expected refusals)
    assert files_run <= files_enabled | files_refused, sorted(files_run - files_enabled - files_refused)
    assert len(files_enabled & files_run) >= len(files_run) // 2, sorted(files_run - files_enabled)
    expected = EXPECTED_REFUSALS[plugin_run.label]
    unexpected = [r for r in plugin_run.refused if not any(e in r["reason"] for e in expected)]
    assert not unexpected, f"the plugin refused models it should accept: {unexpected[:5]}"
    # the host contract: a refused enable leaves the model exactly as it was
    dirty = [r for r in plugin_run.refused if r["left_behind"]]
    assert not dirty, f"a refused enable left attributes behind: {dirty[:5]}"
    assert not plugin_run.cycle_leftovers, plugin_run.cycle_leftovers[:5]


@hooked_suite
def test_plugin_code_path_was_taken(plugin_run):
    """The seams were really called during the TL tests (not only installed)."""
    if CONFIGS[plugin_run.label].get("cycle"):
        assert plugin_run.attention_calls == 0, "a disabled plugin's seam was still called"
        return
    assert plugin_run.attention_calls > 0
    assert plugin_run.mlp_activation_calls > 0


@hooked_suite
def test_harness_catches_a_plugin_that_ignores_padding(baseline, conformance_runs):
    """Negative control: a plugin whose attention drops the padding mask must fail TL's tests."""
    run = conformance_runs("broken-padding", **harness.BROKEN)
    assert run.model_enables > 0
    files = tuple(harness.BROKEN["files"])
    base = dataclasses.replace(
        baseline, outcomes={t: o for t, o in baseline.outcomes.items() if t.startswith(files)})
    cmp = harness.compare(base, run)
    caught = {t.split("::")[0] for t in cmp.regressions}
    assert "tests/integration/test_left_padding.py" in caught, cmp.message()


# ------------------------------------------------------------------------------------------------
# The TransformerBridge suite (both legs)
# ------------------------------------------------------------------------------------------------

# Attention bridges the host's seam refuses by design, naming the class (UnsupportedModelError):
# the plain AttentionBridge (boot_native and architectures whose HF module computes attention),
# gated queries (Qwen3.5 / Qwen3-Next adapters, the gated_q_proj test), ALiBi subclasses that
# override the catch point (MPT). Those tests run on the plain model; the refusal is listed.
BRIDGE_REFUSALS = ("which the attention seam does not support",)
# selected files that wire no attention bridge the plugin could take: run for the record
BRIDGE_NO_ATTENTION = {
    "tests/unit/model_bridge/generalized_components/test_attention_helpers.py":
        "tests helper methods on AttentionBridge.__new__ instances; no attention is wired or run",
}


def _topk_skip(spec: dict) -> None:
    if spec["plugin"] == "topk":
        reason = topk_unavailable(spec["config"])
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="module")
def bridge_baseline(conformance_runs):
    return conformance_runs("bridge-baseline", suite="bridge")


@pytest.fixture(scope="module", params=list(BRIDGE_CONFIGS))
def bridge_run(request, conformance_runs):
    spec = BRIDGE_CONFIGS[request.param]
    _topk_skip(spec)
    return conformance_runs(request.param, **spec)


def test_bridge_sdist_carries_the_selected_files(tl_root):
    missing = [f for f in harness.BRIDGE_SELECTED if not (tl_root / f).exists()]
    if int(harness.tl_version().split(".")[0]) >= 4:
        assert not missing, f"selected bridge files absent from the {harness.tl_version()} sdist: {missing}"
    else:  # 3.9 lacks the manual KV-cache file (added in 4.x)
        assert len(missing) <= 2, missing


def test_bridge_baseline_runs_offline_and_passes(bridge_baseline):
    collection_errors = {k: v for k, v in bridge_baseline.longrepr.items() if "::" not in k}
    assert not collection_errors, f"collection errors in the bridge baseline: {collection_errors}"
    counts = bridge_baseline.counts()
    failing = sorted(t for t, o in bridge_baseline.outcomes.items() if o in ("failed", "error"))
    # every failure offline is either fixed in the stand-ins or deselected with its reason
    assert not failing, (failing[:10], bridge_baseline.output_tail)
    assert counts["passed"] >= 0.95 * len(bridge_baseline.outcomes), counts
    assert bridge_baseline.model_enables == 0 and bridge_baseline.module_enables == 0


def test_bridge_plugin_run_matches_baseline(bridge_baseline, bridge_run):
    cmp = harness.compare(bridge_baseline, bridge_run)
    assert not cmp.missing, cmp.message()
    assert not cmp.regressions, cmp.message()


def test_bridge_plugin_was_really_enabled(bridge_run):
    assert bridge_run.model_enables > 0, "no TransformerBridge built by the TL tests got the plugin"
    assert bridge_run.module_enables > 0, "no bare attention bridge built by the TL tests got the plugin"
    expected = BRIDGE_REFUSALS + (FF_REFUSALS if "ff_k" in BRIDGE_CONFIGS[bridge_run.label]["config"] else ())
    unexpected = [r for r in bridge_run.refused if not any(e in r["reason"] for e in expected)]
    assert not unexpected, f"the plugin refused bridges it should accept: {unexpected[:5]}"
    dirty = [r for r in bridge_run.refused if r["left_behind"]]
    assert not dirty, f"a refused enable left attributes behind: {dirty[:5]}"
    assert not bridge_run.cycle_leftovers, bridge_run.cycle_leftovers[:5]


def test_bridge_plugin_code_path_was_taken(bridge_baseline, bridge_run):
    """The seam ran in every selected file that wires attention the plugin takes (session-scoped
    bridges are enabled in the first file that builds them, so calls, not enables, count)."""
    if BRIDGE_CONFIGS[bridge_run.label].get("cycle"):
        assert bridge_run.attention_calls == 0, "a disabled plugin's seam was still called"
        return
    assert bridge_run.attention_calls > 0 and bridge_run.mlp_activation_calls > 0
    called = {t.split("::")[0] for t, n in bridge_run.attention_calls_per_test.items() if n > 0}
    # or every bridge the file builds is one the seam refuses (TL 3.9's loss-mask file: boot_native)
    refused = {r["test"].split("::")[0] for r in bridge_run.refused}
    files_run = {t.split("::")[0] for t in bridge_baseline.outcomes}
    silent = sorted(files_run - called - refused - set(BRIDGE_NO_ATTENTION))
    assert not silent, f"selected bridge files in which the attention seam never ran: {silent}"
    assert len(files_run & called) >= len(files_run) - 2, sorted(files_run - called)


def test_bridge_harness_catches_a_plugin_that_ignores_padding(bridge_baseline, conformance_runs):
    """Negative control on the bridge: attention that drops the padding mask must fail TL's
    bridge padding tests (and the joint-QKV mask tests on bare attention bridges)."""
    run = conformance_runs("bridge-broken-padding", **harness.BRIDGE_BROKEN)
    assert run.model_enables > 0 and run.module_enables > 0
    files = tuple(harness.BRIDGE_BROKEN["files"])
    base = dataclasses.replace(
        bridge_baseline, outcomes={t: o for t, o in bridge_baseline.outcomes.items() if t.startswith(files)})
    cmp = harness.compare(base, run)
    caught = {t.split("::")[0] for t in cmp.regressions}
    assert "tests/integration/model_bridge/test_left_padding_positions.py" in caught, cmp.message()
    assert "tests/unit/model_bridge/generalized_components/test_joint_qkv_attention.py" in caught, cmp.message()
