"""The one error every layer raises for invalid input: :class:`ConfigError`.

It lives apart from :mod:`nsa_lab.config` so that low layers (the attention
registry, say) can raise it without importing the config module, which itself
looks up the attention registry.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value, reported as ``key=value: rule``."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"invalid config: {key}={value!r}: {rule}")
