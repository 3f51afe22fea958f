"""An append-only JSONL output that a rerun continues: whole lines, flushed per batch, torn tail repaired.

Beside the output sits `<name>.settings.json`, the settings that decide its content. A rerun with other
settings is refused (naming the key) rather than silently mixing two runs' lines in one file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import ConfigError


class ResumableJsonl:
    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings_path = path.with_name(path.name + ".settings.json")
        self.settings = settings
        self.repaired_bytes = 0  # bytes of a torn last line cut away on open
        self._file = None

    def open(self) -> int:
        """Check settings, repair a torn tail, open for appending; return the number of complete lines."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._check_settings()
            complete = self._repair()
        else:
            complete = 0
            tmp = self.settings_path.with_name(self.settings_path.name + ".tmp")
            tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
            os.replace(tmp, self.settings_path)
        self._file = self.path.open("ab")
        return complete

    def _check_settings(self) -> None:
        if not self.settings_path.exists():
            raise ConfigError(f"{self.path} exists but was not written by this job (no {self.settings_path.name}): "
                              "choose another output file or delete it")
        before = json.loads(self.settings_path.read_text())
        for key in sorted(set(before) | set(self.settings)):
            if before.get(key) != self.settings.get(key):
                raise ConfigError(f"{self.path} was written with {key}={before.get(key)!r}, this run has "
                                  f"{key}={self.settings.get(key)!r}: rerun with the same settings to resume, or "
                                  "choose another output file")

    def _repair(self) -> int:
        """Cut a torn last line (a crash mid-write) and count the complete lines."""
        size = self.path.stat().st_size
        lines, last_end = 0, 0
        with self.path.open("rb") as f:
            offset = 0
            while chunk := f.read(1 << 20):
                newlines = chunk.count(b"\n")
                if newlines:
                    lines += newlines
                    last_end = offset + chunk.rindex(b"\n") + 1
                offset += len(chunk)
        if last_end < size:
            self.repaired_bytes = size - last_end
            with self.path.open("r+b") as f:
                f.truncate(last_end)
                f.flush()
                os.fsync(f.fileno())
        if lines:
            last = self._last_line()
            try:
                json.loads(last)
            except json.JSONDecodeError:
                raise ConfigError(f"{self.path}:{lines}: not a JSON line; the file is damaged beyond a torn "
                                  "last line, so it cannot be resumed") from None
        return lines

    def _last_line(self) -> bytes:
        with self.path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - (1 << 16))
            while True:
                f.seek(start)
                tail = f.read(end - start)
                cut = tail.rstrip(b"\n").rfind(b"\n")
                if cut >= 0 or start == 0:
                    return tail[cut + 1:]
                start = max(0, start - (1 << 16))

    def last_record(self) -> dict | None:
        return json.loads(self._last_line()) if self.path.stat().st_size else None

    def append(self, records: list[dict]) -> None:
        """Write whole lines in one call, then flush them to the disk."""
        if records:
            self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
