"""The host's built-in plugins, each a module of hookimpls loaded by dotted name from
``tl_plugins.plugins.DEFAULT_PLUGINS`` like any installed plugin, registered ``trylast`` so every
real plugin is asked first:

* ``attention``: dense attention, the fallback answer of the attention seam;
* ``models``: the model zoo (tiny models, SmolLM2, Gemma 3);
* ``model_card``: the report's first section;
* ``load_bench``: the ``load`` benchmark (``tl-plugins bench load``).
"""
