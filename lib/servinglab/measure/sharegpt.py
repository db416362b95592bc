"""Conversations from a ShareGPT file on this machine (nothing is downloaded).

The format is the one ``vllm bench serve --dataset-name sharegpt`` reads: a JSON list of objects, each with
``conversations``, a list of turns ``{"from": "human" | "gpt", "value": text}``. Any other key of an object
(``id``, ...) is ignored. The file is checked whole before anything is sent: a mistake is named by the file,
the conversation's index and the key, in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ParamsError

# The public ShareGPT_V3 file is about 0.7 GB; JSON held in memory takes several times its size on disk.
MAX_FILE_BYTES = 1 << 30
ROLES = {"human": "user", "gpt": "assistant"}


def read_conversations(path: str | os.PathLike) -> list[list[tuple[str, str]]]:
    """Every conversation of a ShareGPT file, as (role, text) turns in the file's order.

    Parameters
    ----------
    path : str or path-like
        The ShareGPT JSON file.

    Returns
    -------
    list of list of (str, str)
        Per conversation, its turns: ``human`` read as ``user``, ``gpt`` as ``assistant``, and the text.

    Raises
    ------
    ParamsError
        The file is missing, larger than 1 GiB, not UTF-8 JSON, or not of the format (naming the
        conversation's index and the key).
    """
    source = Path(path)
    data = _load(source)
    if not isinstance(data, list):
        raise ParamsError(f"{source}: not a ShareGPT file (a JSON {_kind(data)}, expected a list of conversations)")
    if not data:
        raise ParamsError(f"{source}: no conversations in it")
    return [_conversation(source, index, item) for index, item in enumerate(data)]


def _load(source: Path) -> Any:
    if not source.is_file():
        raise ParamsError(f"{source}: ShareGPT file not found")
    size = source.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ParamsError(f"{source}: {size} bytes, more than the {MAX_FILE_BYTES} a ShareGPT file may have")
    try:
        return json.loads(source.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ParamsError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _conversation(source: Path, index: int, item: Any) -> list[tuple[str, str]]:
    where = f"{source}: [{index}]"
    if not isinstance(item, dict):
        raise ParamsError(f"{where}: a JSON {_kind(item)}, expected an object with conversations")
    turns = item.get("conversations")
    if not isinstance(turns, list):
        problem = "missing" if "conversations" not in item else f"a JSON {_kind(turns)}, expected a list"
        raise ParamsError(f"{where}.conversations: {problem}")
    out = []
    for number, turn in enumerate(turns):
        at = f"{where}.conversations[{number}]"
        if not isinstance(turn, dict):
            raise ParamsError(f"{at}: a JSON {_kind(turn)}, expected an object with from and value")
        role, text = turn.get("from"), turn.get("value")
        if role not in ROLES:
            shown = "missing" if "from" not in turn else f"{str(role)[:40]!r} is not human or gpt"
            raise ParamsError(f"{at}.from: {shown}")
        if not isinstance(text, str):
            raise ParamsError(f"{at}.value: {'missing' if 'value' not in turn else f'a JSON {_kind(text)}, expected a string'}")
        out.append((ROLES[role], text))
    return out


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
