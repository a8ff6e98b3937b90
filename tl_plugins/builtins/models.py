"""Built-in plugin: the model zoo (``tl_plugins.models.zoo``) behind ``tl_plugins.models.load(name)``."""

from __future__ import annotations

from tl_plugins.hookspecs import RegisterModel, hookimpl


@hookimpl(trylast=True)
def tl_plugins_register_models(register: RegisterModel) -> None:
    from tl_plugins.models import zoo

    zoo.register_builtin_models(register)
