"""The host's own built-in plugin: dense attention (the fallback), the model zoo and the model card.

Registered ``trylast`` like any other plugin module, so every real plugin is asked first.
"""

from __future__ import annotations

from tl_plugins import hookimpl


@hookimpl(trylast=True)
def tl_plugins_attention(call):
    return call.dense()


@hookimpl(trylast=True)
def tl_plugins_register_models(register):
    from tl_plugins.models import zoo

    zoo.register_builtin_models(register)


@hookimpl(trylast=True)
def tl_plugins_report_sections(report):
    from tl_plugins.report import model_card_section

    model_card_section(report)


@hookimpl(trylast=True)
def tl_plugins_register_benchmarks(register):
    from tl_plugins.models.bench import bench_load

    register("load", bench_load, summary="time and peak memory of models.load(), cold and warm")
