"""Micro-batch pipelining of split execution: the rows of one forward are cut into micro-batches; the end
runs the head layers of micro-batch i+1 while the cloud runs the middle layers of micro-batch i, and the tail
layers of i while the cloud runs i+1. Requests stay in flight on the Session stream (the cloud answers them in
order), so end and cloud compute at the same time; with one micro-batch it is the plain sequential split."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from itertools import pairwise
from typing import TypeVar

X = TypeVar("X")
R = TypeVar("R")
Y = TypeVar("Y")


def micro_batches(batch: int, parts: int) -> list[slice]:
    """Contiguous row ranges of nearly equal size, at most `parts` of them, none empty."""
    parts = max(1, min(parts, batch))
    bounds = [round(i * batch / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in pairwise(bounds) if b > a]


def run_pipelined(parts: list[slice], head: Callable[[slice], X], send: Callable[[slice, X], Future[R]],
                  tail: Callable[[slice, Future[R]], Y]) -> list[Y]:
    """head(part) on the end -> send(part, x) puts it in flight to the cloud -> tail(part, future) on the end.
    Every head is issued before the first tail waits, so the cloud always has the next micro-batch queued."""
    in_flight = [(p, send(p, head(p))) for p in parts]
    return [tail(p, fut) for p, fut in in_flight]
