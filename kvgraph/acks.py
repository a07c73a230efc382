"""End-to-end acknowledgement: a source learns when every sink downstream has confirmed the
events of one of its batches (the JetStream ``nats`` source acks its messages only then).

A source wraps what it emits with an :class:`Ack`. Each queue that takes the batch holds the
ack once; a transform's output batches inherit the acks of the input being processed (and a
transform that holds events back, like ``batch``, passes them on only when it holds nothing);
a sink releases them after a flush confirmed delivery. When every hold is released the ack is
done; if the batch was dropped on the way (a full edge with a drop policy, a failed node) it is
failed instead, and the source lets the message be redelivered. Batches without acks cost
nothing: the whole mechanism lives in :class:`Tracked` batches only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


class Ack:
    __slots__ = ("pending", "failed", "_done", "_fail")

    def __init__(self, on_done: Callable[[], None], on_fail: Callable[[], None]):
        self.pending = 1  # the source's own hold, released after it emitted
        self.failed = False
        self._done, self._fail = on_done, on_fail

    def hold(self) -> None:
        self.pending += 1

    def fail(self) -> None:
        self.failed = True

    def release(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            (self._fail if self.failed else self._done)()


class Tracked(list):  # type: ignore[type-arg]
    """A batch that carries acks."""

    __slots__ = ("acks",)

    def __init__(self, items: Iterable[Any], acks: tuple[Ack, ...]):
        super().__init__(items)
        self.acks = acks


def acks_of(batch: Any) -> tuple[Ack, ...]:
    return batch.acks if type(batch) is Tracked else ()


def release_all(acks: Iterable[Ack], failed: bool = False) -> None:
    for a in acks:
        if failed:
            a.fail()
        a.release()
