"""Fetch TransformerLens's own test-suite and run a subset of it with a tl_plugins plugin enabled.

The tests come from TransformerLens's source distribution on PyPI (the installed version), cached
under ``tl_plugins.models.cache.cache_dir()/tl-tests/<version>`` so later runs are offline. Only
the ``tests/`` folder is unpacked: the tests import the *installed* ``transformer_lens``.

``run_suite`` runs the selected files in a pytest subprocess with ``tl_conformance_inject`` loaded
(see that module: it enables the plugin on every model built and writes a JSON report), and
``compare`` lines a plugin run up against the baseline run, test id by test id. Two suites:
``hooked`` (``SELECTED``: HookedTransformer, transformer-lens 3.x) and ``bridge``
(``BRIDGE_SELECTED``: TransformerBridge, 3.x and 4.x).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The TransformerLens test files run under every configuration, and why each is in the subset.
SELECTED = {
    "tests/unit/components/test_attention.py": "attention module: rotary, causal/local masks, log-n, NTK",
    "tests/integration/test_grouped_query_attention.py": "grouped-query attention vs repeated K/V",
    "tests/unit/test_split_qkv.py": "use_split_qkv_input gives the same outputs",
    "tests/unit/test_use_attn_result.py": "use_attn_result / hook_result",
    "tests/integration/test_hooks.py": "hook add/remove/context managers, backward hooks, conditional hooks",
    "tests/integration/test_cache_hook_names.py": "run_with_cache hook names",
    "tests/integration/test_cache_pos_slice.py": "run_with_cache pos_slice, local attention model",
    "tests/integration/test_attention_mask.py": "attention masks, hooks on attn scores / pattern",
    "tests/integration/test_kv_cache.py": "KV cache == full forward, padding, freeze, start_at_layer",
    "tests/unit/test_generate_no_tokenizer.py": "generate with and without the KV cache",
    "tests/integration/test_start_at_layer.py": "start_at_layer",
    "tests/integration/test_stop_at_layer.py": "stop_at_layer",
    "tests/acceptance/test_activation_cache.py": "ActivationCache: head/neuron results, decompositions",
    "tests/unit/test_direct_path_patching.py": "path patching through hooks",
    "tests/acceptance/test_hook_tokens.py": "hook_tokens",
    "tests/unit/test_patching.py": "activation patching (transformer_lens.patching)",
    "tests/integration/test_head_detector.py": "head detector on attention patterns",
    "tests/integration/test_left_padding.py": "left/right padding: attention masks, positions",
    "tests/integration/test_generation_compatibility.py": "generate: output logits, KV cache, batches",
}

_BRIDGE = "TransformerBridge.boot_transformers needs the model hub"
# Selected tests left out, by node id prefix, with the reason (also listed in docs/conformance.md).
DESELECTED: dict[str, str] = {
    "tests/integration/test_generation_compatibility.py::TestTransformerBridgeGenerationModelOutput":
        _BRIDGE,
    "tests/integration/test_generation_compatibility.py::TestTransformerBridgeHFGenerate": _BRIDGE,
    "tests/integration/test_generation_compatibility.py::TestGenerationBackwardCompatibility::"
    "test_bridge_basic_generation_unchanged": _BRIDGE,
    "tests/integration/test_generation_compatibility.py::TestBlockBridgeBatchCompatibility": _BRIDGE,
    **{f"tests/integration/test_head_detector.py::{name}":
       "asserts head scores of the real solu-2l weights (hub); the stand-in is random"
       for name in ("Test_specific_heads", "Test_detect_head_successful",
                    "test_detect_head_exclude_bos", "test_detect_head_exclude_current_token",
                    "test_detect_head_with_cache")},
    "tests/integration/test_head_detector.py::test_detect_head_with_invalid_head_name":
        "needs jaxtyping/beartype runtime checks (TL's --jaxtyping-packages addopt, not installed here)",
}

SUITES = ("hooked", "bridge")

# TransformerLens's TransformerBridge tests (in the 4.x sdist, most also in 3.9's), run with the
# plugin enabled on every bridge they build and on every bare attention bridge they wire by hand.
# Hub names they boot ("gpt2", "distilgpt2") boot an offline random GPT-2 of the same
# architecture and depth (tl_conformance_inject.OFFLINE_BRIDGE_MODELS): these tests check the
# bridge against itself (cache vs full forward, padded vs unpadded, split vs fused), not against
# the real checkpoint's numbers.
BRIDGE_SELECTED = {
    "tests/unit/model_bridge/test_component_hooks_fire.py":
        "hook_q/k/v/z fire on every PositionEmbeddingsAttentionBridge adapter (bare, wired by hand)",
    "tests/unit/model_bridge/generalized_components/test_kv_cache.py":
        "KV cache: rectangular causal mask, _update_kv_cache, _reconstruct_attention with q < kv",
    "tests/unit/model_bridge/generalized_components/test_joint_qkv_attention.py":
        "joint-QKV attention: split QKV, hooks, reconstruction (bare JointQKVAttentionBridge)",
    "tests/unit/model_bridge/generalized_components/test_attention_helpers.py":
        "attention helpers (_get_n_heads, weight reshaping); builds no attention to enable",
    "tests/unit/model_bridge/test_per_head_hooks_component.py":
        "per-head hooks: hook_result sums to hook_out, split q/k/v inputs, attn_in, MHA and GQA",
    "tests/unit/model_bridge/test_loss_attention_mask.py":
        "padding-aware loss, 2D/4D/bool masks, on local GPT-2, Llama and MPT bridges",
    "tests/unit/model_bridge/compatibility/test_split_qkv.py":
        "use_split_qkv_input / use_attn_in leave the logits unchanged (gpt2 stand-in)",
    "tests/unit/model_bridge/compatibility/test_use_attn_result.py":
        "use_attn_result: hook_result fires and sums to the output (gpt2 stand-in)",
    "tests/unit/model_bridge/test_bridge_generate_kv_cache.py":
        "generate with the KV cache == without, single and batched (distilgpt2 stand-in)",
    "tests/unit/model_bridge/test_batched_string_padding.py":
        "batched string input: padding side, masks, per-row logits (distilgpt2 stand-in)",
    "tests/integration/model_bridge/test_bridge_manual_kv_cache.py":
        "forward(past_key_values=...) token by token / chunked == full forward (distilgpt2)",
    "tests/integration/model_bridge/test_left_padding_positions.py":
        "left/right padding: logits at real positions do not depend on padding (distilgpt2)",
    "tests/integration/model_bridge/test_generate_attention_mask.py":
        "generate from a pre-padded prompt with attention_mask / padding_side (distilgpt2)",
    "tests/integration/model_bridge/test_joint_qkv_attention_hook_compatibility.py":
        "hooks on q/k/v/scores/pattern of the joint-QKV bridge (distilgpt2)",
    "tests/integration/model_bridge/generalized_components/"
    "test_joint_qkv_attention_bridge_integration.py":
        "joint-QKV bridge against the HF attention it wraps (distilgpt2)",
    "tests/integration/model_bridge/test_attention_score_sentinel.py":
        "compatibility mode: masked scores are -inf, gradients through padded scores (distilgpt2)",
}
BRIDGE_DESELECTED: dict[str, str] = {
    "tests/integration/model_bridge/test_left_padding_positions.py::test_self_deriving_model_is_left_alone":
        "boots hf-internal-testing/tiny-random-OPTForCausalLM from the model hub (OPT, not GPT-2)",
    "tests/unit/model_bridge/compatibility/test_split_qkv.py::test_block_level_hook_alias_parity":
        "fails in the baseline: the test before it monkeypatches the module-scoped bridge's "
        "`blocks`, and the restore leaves the bridge without `blocks` (test-order issue in TL 4.3)",
    "tests/integration/model_bridge/test_attention_score_sentinel.py::"
    "test_gpt2_compatibility_scores_use_negative_infinity":
        "compares the bridge's scores with real GPT-2's: HookedTransformer.from_pretrained('gpt2') "
        "in TL 3.9 (hub), frozen HookedTransformer goldens in TL 4.3 (not in the sdist; it skips)",
}

DENSE_K = 10**9  # larger than any sequence in the TL tests: every row keeps all its keys
KERNEL_FRACTION = 0.9999

# label -> how to run it: plugin name, enable() options ("$d_mlp" = the model's d_mlp), and the
# module to register by hand for the plugins that live in this folder
CONFIGS = {
    "passthrough": dict(plugin="conformance-passthrough", config={},
                        plugin_module="conformance_passthrough"),
    "topk-dense": dict(plugin="topk", config={"k": DENSE_K}),
    "topk-dense-ff": dict(plugin="topk", config={"k": DENSE_K, "ff_k": "$d_mlp"}),
    # k as a fraction just under 1: every row still keeps all its valid keys (ceil(0.9999 n) = n
    # for n <= 10000), but the plugin cannot tell statically, so its top-k kernels really run
    "topk-kernel": dict(plugin="topk", config={"k": KERNEL_FRACTION, "chunk_size": 3}),
    # really sparse top-k, enabled and at once disabled on every model: what disable leaves behind
    # must not change a single TL test
    "topk-cycled": dict(plugin="topk", config={"k": 2, "ff_k": 2}, cycle=True),
}
# the negative control: must fail TL's padding / KV-cache tests (only the files it needs, for time)
BROKEN = dict(plugin="conformance-broken-padding", config={}, plugin_module="conformance_broken",
              files=["tests/integration/test_left_padding.py", "tests/integration/test_kv_cache.py",
                     "tests/integration/test_attention_mask.py"])

# The bridge suite's configurations (suite="bridge"): the same plugins, enabled on every
# TransformerBridge and every bare attention bridge the TL bridge tests build
BRIDGE_CONFIGS = {
    "bridge-passthrough": dict(plugin="conformance-passthrough", config={},
                               plugin_module="conformance_passthrough", suite="bridge"),
    "bridge-topk-dense": dict(plugin="topk", config={"k": DENSE_K}, suite="bridge"),
    "bridge-topk-cycled": dict(plugin="topk", config={"k": 2, "ff_k": 2}, cycle=True,
                               suite="bridge"),
}
# the bridge suite's negative control: the same broken plugin, on the padding / mask files
BRIDGE_BROKEN = dict(BROKEN, suite="bridge", files=[
    "tests/integration/model_bridge/test_left_padding_positions.py",
    "tests/integration/model_bridge/test_generate_attention_mask.py",
    "tests/unit/model_bridge/test_batched_string_padding.py",
    "tests/unit/model_bridge/generalized_components/test_joint_qkv_attention.py",
])

PER_TEST_TIMEOUT_S = 180
SUITE_TIMEOUT_S = 480


class FetchError(RuntimeError):
    """The source distribution could not be downloaded (PyPI unreachable, ...)."""


def tl_version() -> str:
    return metadata.version("transformer-lens")


def hooked_available() -> bool:
    """False on transformer-lens 4.x, which removed HookedTransformer (the hooked suite skips)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _cache_root() -> Path:
    from tl_plugins.models import cache

    return cache.cache_dir() / "tl-tests"


def fetch_tl_tests(version: str | None = None) -> Path:
    """Return a folder holding TransformerLens ``version``'s ``tests/`` (downloaded once, cached).

    Raises ``FetchError`` when the download fails.
    """
    version = version or tl_version()
    root = _cache_root() / version
    if (root / "tests" / "conftest.py").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", f"transformer_lens=={version}", "-d", tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:
            raise FetchError(f"pip download of transformer_lens=={version} timed out") from exc
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"pip download transformer_lens=={version} (sdist) failed: {' | '.join(tail)}"
            )
        staging = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) >= 2 and parts[1] == "tests" and (m.isfile() or m.isdir()):
                    m.name = str(Path(*parts[1:]))
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        (staging / "tl-conformance.ini").write_text(
            "[pytest]\n"
            "pythonpath = .\n"
            "markers =\n    slow: slow\n    multigpu: multi-GPU\n"
            "filterwarnings =\n    ignore::DeprecationWarning\n    ignore::FutureWarning\n"
            "    ignore::UserWarning\n"
        )
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root


@dataclass
class SuiteResult:
    """One run of the selected TL tests under one configuration."""

    label: str
    plugin: str
    config: dict
    outcomes: dict[str, str]
    longrepr: dict[str, str]
    model_enables: int
    module_enables: int
    refused: list[dict]
    enables_per_test: dict[str, int]
    seconds: float
    returncode: int
    output_tail: str = ""
    attention_calls: int = 0
    mlp_activation_calls: int = 0
    cycle_leftovers: list = field(default_factory=list)
    attention_calls_per_test: dict = field(default_factory=dict)
    bare_unsupported: dict = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    def counts(self) -> dict[str, int]:
        return {o: self.count(o) for o in ("passed", "failed", "error", "skipped")}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [{"test": k, "outcome": v, "enables": self.enables_per_test.get(k, 0)}
             for k, v in sorted(self.outcomes.items())]
        )

    def _repr_html_(self) -> str:
        return f"<b>{self.label}</b> {self.counts()}<br>" + self.to_frame()._repr_html_()


def selected_files(root: Path, suite: str = "hooked") -> list[str]:
    """The selected files of ``suite`` present in this source distribution."""
    return [f for f in (SELECTED if suite == "hooked" else BRIDGE_SELECTED) if (root / f).exists()]


def run_suite(root: Path, label: str, plugin: str = "", config: dict | None = None,
              plugin_module: str = "", files: list[str] | None = None,
              workdir: Path | None = None, cycle: bool = False,
              suite: str = "hooked") -> SuiteResult:
    """Run the selected TL tests in a pytest subprocess with ``plugin`` enabled on every model.

    ``suite``: "hooked" (HookedTransformer tests, ``SELECTED``) or "bridge" (TransformerBridge
    tests, ``BRIDGE_SELECTED``; the plugin is enabled on every bridge)."""
    if suite not in SUITES:
        raise ValueError(f"suite: got {suite!r}; accepted: {', '.join(SUITES)}")
    config = dict(config or {})
    files = files if files is not None else selected_files(root, suite)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="tl-conformance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / f"{label}.json"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TL_CONFORMANCE_PLUGIN=plugin,
        TL_CONFORMANCE_CONFIG=json.dumps(config),
        TL_CONFORMANCE_PLUGIN_MODULE=plugin_module,
        TL_CONFORMANCE_CYCLE="1" if cycle else "",
        TL_CONFORMANCE_SUITE=suite,
        TL_CONFORMANCE_REPORT=str(report),
        TL_CONFORMANCE_TOKENIZER_DIR=str(root.parent / "tokenizers"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TOKENIZERS_PARALLELISM="false",
    )
    # load only the plugin under test (the others' imports cost time and are not under test)
    env.pop("TL_PLUGINS_BLOCK", None)
    if plugin_module or not plugin:
        env["TL_PLUGINS_AUTOLOAD"] = "0"
    else:
        env["TL_PLUGINS_LOAD"] = plugin
    cmd = [
        sys.executable, "-m", "pytest", "-c", str(root / "tl-conformance.ini"),
        "--rootdir", str(root), "-p", "tl_conformance_inject", "-p", "no:cacheprovider",
        "-q", "-rN", "--no-header", f"--timeout={PER_TEST_TIMEOUT_S}",
    ]
    for prefix in (DESELECTED if suite == "hooked" else BRIDGE_DESELECTED):
        cmd += ["--deselect", prefix]
    cmd += files
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False,
                              timeout=SUITE_TIMEOUT_S)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -9, f"suite timed out after {SUITE_TIMEOUT_S} s\n{exc.stdout or ''}"
    seconds = time.time() - start
    if not report.exists():
        raise RuntimeError(f"conformance run {label!r} wrote no report (rc={rc}):\n{out[-4000:]}")
    data = json.loads(report.read_text())
    return SuiteResult(
        label=label,
        plugin=plugin,
        config=config,
        outcomes=data["outcomes"],
        longrepr=data["longrepr"],
        model_enables=data["model_enables"],
        module_enables=data["module_enables"],
        refused=data["refused"],
        enables_per_test=data["enables_per_test"],
        seconds=round(seconds, 1),
        returncode=rc,
        output_tail=out[-3000:],
        attention_calls=data.get("attention_calls", 0),
        mlp_activation_calls=data.get("mlp_activation_calls", 0),
        cycle_leftovers=data.get("cycle_leftovers", []),
        attention_calls_per_test=data.get("attention_calls_per_test", {}),
        bare_unsupported=data.get("bare_unsupported", {}),
    )


@dataclass
class Comparison:
    """A plugin run against the baseline, test id by test id."""

    baseline: SuiteResult
    run: SuiteResult
    regressions: dict[str, str] = field(default_factory=dict)  # test id -> outcome with plugin
    fixed: dict[str, str] = field(default_factory=dict)  # failed without the plugin, pass with it
    missing: list[str] = field(default_factory=list)  # collected without, absent with the plugin
    extra: list[str] = field(default_factory=list)

    def message(self, limit: int = 6) -> str:
        lines = [(f"{self.run.label}: {len(self.regressions)} test(s) pass without the plugin "
                  f"but not with it ({self.run.counts()} vs baseline {self.baseline.counts()})")]
        for tid, outcome in sorted(self.regressions.items())[:limit]:
            lines.append(f"--- {tid}: {outcome}\n{self.run.longrepr.get(tid, '')[-1500:]}")
        if self.missing:
            lines.append(f"missing with the plugin: {self.missing[:limit]}")
        return "\n".join(lines)


def compare(baseline: SuiteResult, run: SuiteResult) -> Comparison:
    """Tests that passed (or were skipped) without the plugin must do the same with it."""
    cmp = Comparison(baseline, run)
    for tid, before in baseline.outcomes.items():
        after = run.outcomes.get(tid)
        if after is None:
            cmp.missing.append(tid)
        elif before in ("passed", "skipped") and after != before:
            cmp.regressions[tid] = after
        elif before in ("failed", "error") and after == "passed":
            cmp.fixed[tid] = after
    cmp.extra = sorted(set(run.outcomes) - set(baseline.outcomes))
    return cmp


def main(argv: list[str] | None = None) -> int:
    """``python tests/conformance/harness.py [LABEL ...]``: run configurations, print a summary.

    Labels starting with ``bridge-`` run the TransformerBridge suite (its baseline,
    ``bridge-baseline``, is run with them); the others the HookedTransformer suite."""
    import argparse

    specs = {"baseline": {}, **CONFIGS, "broken-padding": BROKEN,
             "bridge-baseline": {"suite": "bridge"}, **BRIDGE_CONFIGS,
             "bridge-broken-padding": BRIDGE_BROKEN}
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("labels", nargs="*", default=["baseline", "passthrough"], choices=list(specs))
    parser.add_argument("--workdir", default=None, help="where the JSON reports go")
    args = parser.parse_args(argv)
    root = fetch_tl_tests()

    def suite_of(label: str) -> str:
        return specs[label].get("suite", "hooked")

    labels: list[str] = []
    for label in args.labels:
        base_label = "bridge-baseline" if suite_of(label) == "bridge" else "baseline"
        for wanted in (base_label, label):
            if wanted not in labels:
                labels.append(wanted)
    results = {label: run_suite(root, label, workdir=args.workdir, **specs[label]) for label in labels}

    def baseline_for(label: str) -> SuiteResult:
        base = results["bridge-baseline" if suite_of(label) == "bridge" else "baseline"]
        files = tuple(specs[label].get("files") or ())
        if not files:
            return base
        return dataclasses.replace(
            base, outcomes={t: o for t, o in base.outcomes.items() if t.startswith(files)})

    for suite in SUITES:
        if any(suite_of(label) == suite for label in labels):
            print(f"TransformerLens {tl_version()} {suite} tests, "
                  f"{len(selected_files(root, suite))} files")
    print(f"{'config':<22}{'passed':>7}{'failed':>7}{'error':>6}{'skipped':>8}{'enables':>9}"
          f"{'refused':>8}{'attn calls':>11}{'mlp calls':>10}{'regressions':>12}{'seconds':>8}")
    for label, res in results.items():
        c = res.counts()
        reg = 0 if label.endswith("baseline") else len(compare(baseline_for(label), res).regressions)
        print(f"{label:<22}{c['passed']:>7}{c['failed']:>7}{c['error']:>6}{c['skipped']:>8}"
              f"{res.model_enables + res.module_enables:>9}{len(res.refused):>8}"
              f"{res.attention_calls:>11}{res.mlp_activation_calls:>10}{reg:>12}"
              f"{res.seconds:>8}")
    for label, res in results.items():
        cmp = compare(baseline_for(label), res)
        if not label.endswith("baseline") and (cmp.regressions or cmp.missing):
            print(cmp.message())
    return 0


if __name__ == "__main__":
    sys.exit(main())
