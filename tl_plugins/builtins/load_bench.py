"""Built-in plugin: the ``load`` benchmark (time and peak memory of ``models.load()``)."""

from __future__ import annotations

from tl_plugins.hookspecs import RegisterBenchmark, hookimpl


@hookimpl(trylast=True)
def tl_plugins_register_benchmarks(register: RegisterBenchmark) -> None:
    from tl_plugins.models.bench import bench_load

    register("load", bench_load, summary="time and peak memory of models.load(), cold and warm")
