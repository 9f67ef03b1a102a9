"""Name -> builder tables: how a config value (``train.optimizer: adamw``) finds its code.

Each concern owns its table (optimizers and schedulers in ``optim``, losses per head kind in
``losses``, level-2 models in ``level2``, TTA view sets in ``tta``); the typed config checks names
against them, so adding an option is one function plus one ``@TABLE.register("name")`` line.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator


class Registry:
    def __init__(self, key: str):
        self.key = key  # the config key whose values this table holds, for messages
        self._items: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.key}: '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return add

    def check(self, name: str) -> str:
        """``name`` if registered, else a ValueError listing the allowed names (the schema reports it)."""
        if name not in self._items:
            raise ValueError(f"unknown value; allowed: {', '.join(self._items)}")
        return name

    def __getitem__(self, name: str) -> Callable:
        from pipeline.errors import ConfigError

        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{self.key}: unknown value '{name}'; allowed: {', '.join(self._items)}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
