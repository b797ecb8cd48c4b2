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
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (thousands of levels); a config is a few levels deep") from None
    finally:
        loader.dispose()
    try:
        size = expanded_size(data)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (hundreds of levels); a config is a few levels deep") from None
    if size > MAX_VALUES:
        raise ConfigError(
            f"{source}: its aliases (*name) expand to {size} values, more than {MAX_VALUES} "
            "(an alias bomb?); write the values out or use fewer aliases"
        )
    return data


#: Values a config may hold once its aliases are expanded (a real config holds a few hundred).
MAX_VALUES = 100_000


def expanded_size(data: Any) -> int:
    """The number of values in ``data`` with every shared (aliased) node counted each time it is
    used, computed once per distinct node: a "billion laughs" document is measured, not expanded."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a cycle counts once
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(item) for item in items)
        return sizes[id(node)]

    return size(data)
