"""Reading study YAML (study files, override files, ``--set`` values) as untrusted input.

A study file is a few kilobytes of plain mappings written by hand, so anything far from that is refused
before it is parsed or before it grows: files over :data:`MAX_STUDY_BYTES`, bytes that are not UTF-8,
control characters, a key given twice in one mapping (YAML would keep the last silently, so
``runs_dir: /`` further down would win unseen), nesting deeper than :data:`MAX_DEPTH` (the parser
recurses per level), and documents that hold more than :data:`MAX_VALUES` values once every alias is
counted as the copy it stands for (a few hundred bytes of nested aliases expand tenfold per level, and
everything downstream, validation, error messages, ``run.json``, pays for each copy).

Every refusal is a :class:`~servinglab.errors.ParamsError` of one line naming the source, the place
(line and column where known) and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver
from yaml.scanner import ScannerError

from .errors import ParamsError

MAX_STUDY_BYTES = 1024 * 1024
"""Largest study or override file read; the shipped studies are under 10 KB."""

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists; a study needs about 6 levels."""

MAX_VALUES = 20_000
"""Most values (scalars, mappings, lists) in one document, each alias counted as a copy of its target."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


_CParser: Any
try:
    # libyaml scans and parses some 30 times faster than PyYAML's Python code: a megabyte in milliseconds.
    from yaml._yaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml
    _CParser = None


class _Bounds(Composer, SafeConstructor):
    """The bounds above, checked while the document is composed and constructed; a loader puts a parser
    and a resolver beside it."""

    # From the parser the loader puts beside this class.
    check_event: Any
    peek_event: Any

    def _start_bounds(self) -> None:
        self._depth = 0
        self._values = 0
        # id(node) → (values under it, levels under it), for nodes composed so far; an alias costs its target's.
        self._measured: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            return self._compose_alias()
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measured[id(node)] = self._measure(node)
        self._count(1, node.start_mark)
        return node

    def _compose_alias(self) -> Any:
        event = self.peek_event()
        node = super().compose_node(None, None)
        measured = self._measured.get(id(node))
        if measured is None:
            problem = f"alias *{event.anchor} refers to a value that contains it"
            raise ComposerError(None, None, problem, event.start_mark)
        values, levels = measured
        if self._depth + levels > MAX_DEPTH:
            raise ComposerError(
                None, None, f"alias *{event.anchor} nests the study more than {MAX_DEPTH} levels deep", event.start_mark
            )
        self._count(values, event.start_mark, alias=event.anchor)
        return node

    def _measure(self, node: Node) -> tuple[int, int]:
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            return 1, 1
        sizes = [self._measured.get(id(child), (1, 1)) for child in children]
        return 1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0)

    def _count(self, values: int, mark: Any, alias: str | None = None) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            what = f"alias *{alias} expands the document" if alias else "the document grows"
            raise ComposerError(None, None, f"{what} beyond {MAX_VALUES} values (each alias counts as a copy)", mark)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise ConstructorError(
                    None, None, f"key '{clip(key)}' is given twice (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            # An integer of thousands of digits or a timestamp in year 99999 fail in Python, not in YAML.
            raise ConstructorError(None, None, f"cannot read the value: {clip(exc)}", node.start_mark) from exc


if _CParser is not None:

    class _BoundedLoader(_Bounds, _CParser, Resolver):
        """libyaml's parser; PyYAML's composer (where the bounds are checked) and safe constructor."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._start_bounds()

else:

    class _BoundedLoader(_Bounds, yaml.SafeLoader):  # type: ignore[no-redef]
        """PyYAML's safe loader, all in Python."""

        def __init__(self, stream: str) -> None:
            yaml.SafeLoader.__init__(self, stream)
            self._start_bounds()

        def fetch_flow_collection_start(self, TokenClass: Any) -> None:
            # Refused as the scanner meets it: each open bracket may start a key, so the scanner would
            # otherwise read on up to 1024 characters, rechecking every open level at each, before the
            # composer saw one (libyaml does the same in C, fast enough, and stops at 1000 levels).
            if self.flow_level >= MAX_DEPTH:
                raise ScannerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self.get_mark())
            super().fetch_flow_collection_start(TokenClass)


def clip(value: Any, limit: int = 60) -> str:
    """``value`` as text, cut to ``limit`` characters: error messages quote input, never all of it."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _where(text: str, position: int) -> str:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return f"line {line}, column {column}"


def parse_text(text: str, source: str) -> Any:
    """Parse one YAML document of a study within the bounds of this module.

    Parameters
    ----------
    text : str
        The document.
    source : str
        Where it comes from (a file path, a ``--set`` item), the start of every error message.

    Returns
    -------
    Any
        The document as plain Python data (``None`` when empty).

    Raises
    ------
    ParamsError
        One line naming ``source``, the place and the problem.
    """
    try:
        # The reader checks every character as it is constructed, so the constructor belongs in the try.
        loader = _BoundedLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        character = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        position = exc.position
        if _CParser is not None:  # libyaml counts bytes of the UTF-8 text, Python characters
            position = len(text.encode("utf-8")[:position].decode("utf-8", errors="ignore"))
        raise ParamsError(
            f"{source}: invalid YAML at {_where(text, position)}: character {character} is not allowed in YAML text"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{source}: invalid YAML{where}: {problem}") from None


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """Read a study or override file: bounded in size, strict UTF-8, one YAML mapping.

    Parameters
    ----------
    path : Path
        The file.
    what : str
        What the file is to the user ("study file", "override file (from SERVINGLAB_OVERRIDES)").

    Returns
    -------
    dict
        The top-level mapping (empty for an empty file).

    Raises
    ------
    ParamsError
        One line naming the file and the problem, before any of it is used.
    """
    if not path.is_file():
        raise ParamsError(f"{path}: {what} not found")
    try:
        with path.open("rb") as handle:
            # One byte past the bound tells a file over it from one at it, whatever the file grows to meanwhile.
            data = handle.read(MAX_STUDY_BYTES + 1)
    except OSError as exc:
        raise ParamsError(f"{path}: {what} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_STUDY_BYTES:
        raise ParamsError(f"{path}: {what} is larger than {MAX_STUDY_BYTES // 1024} KiB; a study is a few KB of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = _where(data.decode("utf-8", errors="replace"), len(data[: exc.start].decode("utf-8", errors="replace")))
        raise ParamsError(
            f"{path}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at {where}); save it as UTF-8"
        ) from None
    document = parse_text(text, str(path))
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of keys, not {type(document).__name__}")
    return document
