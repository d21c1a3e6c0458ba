"""The bounds on a configuration file: its size, and the work and memory its YAML may ask for.

The file is read by `serve` at start and at every reload, and by every command: a file that
would take minutes or gigabytes (a 50 MB file, a million aliases, nested anchors that expand
exponentially) or that crashes the parser (a recursive anchor, 50,000 levels of brackets, a
5,000-digit number) is refused with one line, at the line where it goes wrong. Every bound is
far above what a real gateway's configuration needs (README.md, "Limits").
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError

MAX_CONFIG_BYTES = 1024 * 1024   # a 1 MiB file loads in about 5 s (pure-Python YAML, for the line numbers)
MAX_DEPTH = 32                   # mappings and lists inside each other; a real file nests 4 deep
MAX_NODES = 500_000              # keys and values, each alias counted as often as it is used
MAX_NUMBER_CHARS = 30            # digits of a number; the largest real one (a quota) has 9
MAX_SERVERS = 200
MAX_ALIASES = 20_000
MAX_PROBLEMS = 100               # then the load stops: the rest is probably the same mistake

_INT_TAG = "tag:yaml.org,2002:int"


class TooManyProblems(Exception):
    """Raised by the reader at MAX_PROBLEMS problems: reporting (and looking for did-you-means)
    goes no further."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing while it composes the node tree what would make a later
    step crash or run away: nesting deeper than MAX_DEPTH, an anchor used inside itself, more
    than MAX_NODES nodes once aliases are expanded, and numbers longer than MAX_NUMBER_CHARS
    (Python refuses to convert more than 4,300 digits; nothing here needs more than a few)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        # id(node) -> the node's size with its aliases expanded; present once the node is complete
        self._expanded: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded:
                raise ComposerError(None, None, f"the anchor &{event.anchor} is used inside itself "
                                    "(a recursive anchor)", event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None  # composing a node event always gives a node
        self._expanded[id(node)] = size = self._size(node)
        if size > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} keys and values (aliases counted as often as "
                                "they are used)", node.start_mark)
        return node

    def _size(self, node: yaml.Node) -> int:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT_TAG and len(node.value) > MAX_NUMBER_CHARS:
                raise ComposerError(None, None, f"a number of {len(node.value)} characters: at most "
                                    f"{MAX_NUMBER_CHARS} (quote it if it is text)", node.start_mark)
            return 1
        if isinstance(node, yaml.SequenceNode):
            return 1 + sum(self._expanded[id(item)] for item in node.value)
        return 1 + sum(self._expanded[id(key)] + self._expanded[id(value)] for key, value in node.value)
