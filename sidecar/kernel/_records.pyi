# Types of the C module built from _records.c.

from collections.abc import Callable
from typing import Any

ABI_VERSION: int

class Decoder:
    def __init__(
        self,
        task: type,
        exec: type,
        fork: type,
        exit: type,
        connect: type,
        socket: type,
        unix: type,
        verdicts: tuple[Any, ...],
        hooks: tuple[Any, ...],
        address: Callable[[bytes, int], Any],
    ) -> None: ...
    def decode(self, records: list[bytes]) -> tuple[list[Any], list[int]]: ...
