"""What each of tunesmith's registries (methods, objectives, strategies, regularisers) checks when a
pydantic config class registers: a ``name`` field with a default (``name: Literal['x'] = 'x'``), a
one-line ``summary``, and a name no other class has taken. Imports no torch."""
from __future__ import annotations

import importlib
import pkgutil


def import_all(package: str, skip=frozenset()) -> None:
    """Import every module of ``package`` (each registers itself), but ``_private`` ones and ``skip``."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def config_name(cls) -> str:
    """The name a config class registers under: its ``name`` field's default."""
    return cls.model_fields["name"].default


def add_config(table: dict, cls, what: str) -> str:
    """Add config class ``cls`` to ``table`` under its name (returned); ``what`` names the registry."""
    name = config_name(cls)
    if not isinstance(name, str) or not getattr(cls, "summary", ""):
        raise ValueError(f"{cls.__name__}: a {what} config needs name: Literal['x'] = 'x' and a summary")
    if table.get(name, cls) is not cls:
        raise ValueError(f"{what} name {name!r} registered twice")
    table[name] = cls
    return name


def registered_name(cls, configs: dict, what: str, where: str) -> str:
    """The name of implementation ``cls``, whose ``Config`` must already be registered in ``configs``."""
    name = config_name(cls.Config)
    if configs.get(name) is not cls.Config:
        raise ValueError(f"{what} {cls.__name__}: its Config {cls.Config.__name__} is not registered "
                         f"(@register_config in {where})")
    return name
