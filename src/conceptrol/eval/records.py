"""Append-only result records (JSON lines): resuming never repeats or loses a finished case."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, TypeVar

T = TypeVar("T")


class RecordStore:
    """One JSON object per finished case, flushed and synced as it is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> list[dict]:
        """All complete records; a last line cut off by a kill is ignored (its case runs again)."""
        return self.read_counting()[0]

    def read_counting(self) -> tuple[list[dict], int]:
        """(complete records, number of lines that are not a JSON object: cut off by a kill, or damaged)."""
        if not self.path.exists():
            return [], 0
        records, malformed = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                records.append(record)
            else:
                malformed += 1
        return records, malformed

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # close a line a kill left unfinished
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def shard(items: Iterable[T], rank: int, world_size: int) -> list[T]:
    """This process's share (every world_size-th item from `rank`): shards are disjoint and cover all."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(items)[rank::world_size]
