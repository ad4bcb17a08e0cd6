# Types of the C module built from _jsonline.c.

from typing import Any

class Plan:
    def __init__(self, cls: type, type: str, entries: tuple[tuple[str, str, int], ...]) -> None: ...
    def encode(self, event: Any) -> dict[str, Any] | None: ...
