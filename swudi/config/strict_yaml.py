"""YAML parsing for configs: safe, and a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys without a word, so ``scale: 1.0`` followed later by
``scale: 0.3`` would merge with 0.3 while the reader of the file sees 1.0. Here the duplicate is
refused with both line numbers.
"""

from __future__ import annotations

from typing import Any

import yaml

from swudi.errors import ConfigError

__all__ = ["load_yaml"]


class _NoDuplicatesLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`ConfigError` on a repeated mapping key."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise ConfigError(
                    f"{self.source} line {line}: key {key!r} appears twice (first on line {first}); keep one of the two"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely; :class:`ConfigError` naming ``source`` (and the line) for
    invalid YAML or a mapping key given twice."""
    loader_class = type("_Loader", (_NoDuplicatesLoader,), {"source": source})
    loader = loader_class(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None
    finally:
        loader.dispose()
