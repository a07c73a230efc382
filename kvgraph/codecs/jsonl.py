"""kvgraph's own JSONL format: one event per line, the :class:`~kvgraph.event.Event` fields.

    {"kind":"stored","worker_id":1,"dp_rank":0,"seq":7,"ts":1767225600.04,
     "block_hashes":[12908379700519869583],"parent_hash":null,"token_ids":[...],"block_size":16}

``kind``, ``worker_id`` and ``dp_rank`` are always present; other fields are left out when
unknown (None) or empty. Hashes are unsigned 64-bit
integers written as exact JSON numbers: readers must not parse them as doubles (Python's json
and msgspec are exact; in JavaScript use a BigInt-aware parser). A line from an ``errors`` port
has ``node`` and ``reason`` instead of ``kind``, and the event (if any) under ``event``.
"""

from __future__ import annotations

from typing import Any, Iterable

import msgspec

from ..event import KINDS, Event

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


class JsonlError(ValueError):
    pass


def encode_lines(items: Iterable[Any]) -> bytes:
    """Events (or error records) as newline-terminated JSON lines."""
    return _encoder.encode_lines(list(items))


def decode_line(line: bytes | str) -> Event:
    """One line -> Event; JsonlError says what is wrong."""
    try:
        e = _decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise JsonlError(f"not a kvgraph event: {exc}") from None
    if e.kind not in KINDS:
        raise JsonlError(f"unknown kind {e.kind!r}; expected one of {', '.join(KINDS)}")
    return e
