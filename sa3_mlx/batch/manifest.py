"""The manifest of an output folder (``manifest.jsonl``): one JSON line per finished item, appended and
synced as items finish, by one writer (the driver). It is what makes a batch resumable: an item is done
when its latest line says so, was made from the same settings, and every output it lists is there at
the size it was written with. Everything else is (re)made."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .items import MANIFEST, Item, item_id

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one driver per folder is then the user's to keep
    fcntl = None


class FolderBusy(RuntimeError):
    """Another driver writes into this output folder."""


def settings_key(item: Item) -> str:
    """What an item was made from, as given (before a seed was drawn): a changed line is made again."""
    return item_id(item.settings)


class Manifest:
    def __init__(self, folder: str | Path, name: str = MANIFEST):
        self.path = Path(folder) / name
        self.entries: dict[str, dict] = {}
        self.skipped_lines = 0  # lines that are no JSON object (a crash mid-write, an edit)

    def load(self) -> "Manifest":
        """Read the latest entry per item id. A last line without its newline (a crash while it was
        written) is cut off, so that the next entry starts on a line of its own."""
        if not self.path.exists():
            return self
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                self.skipped_lines += 1
                continue
            self.entries[entry["id"]] = entry
        return self

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.entries[entry["id"]] = entry

    def is_done(self, item: Item, check_key: bool = True) -> bool:
        entry = self.entries.get(item.id)
        if entry is None or entry.get("status", "done") != "done":
            return False
        if check_key and entry.get("key") not in (None, settings_key(item)):
            return False
        outputs = entry.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != item.settings.num_outputs:
            return False
        for o in outputs:
            try:
                path = Path(o["path"])
                if not path.is_file() or ("bytes" in o and path.stat().st_size != o["bytes"]):
                    return False
            except (KeyError, TypeError, OSError):
                return False
        return True

    def failed(self, item: Item) -> dict | None:
        entry = self.entries.get(item.id)
        return entry if entry is not None and entry.get("status") == "failed" else None


class FolderLock:
    """An advisory lock on an output folder for one driver at a time (``.sa3-batch.lock``, holding the pid)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".sa3-batch.lock"
        self.file = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip()
                self.file.close()
                self.file = None
                raise FolderBusy(f"{self.path.parent} is in use by another sa3 batch"
                                 + (f" (pid {holder})" if holder else "") + "; wait for it, or choose another --out-dir")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # releases the lock
            self.file = None


def remove_partial_files(folder: Path, items) -> int:
    """Temporary files (``.NAME.*.part``) that a killed worker left beside the outputs of ``items``."""
    from .items import output_paths

    names = {p.name for item in items for p in output_paths(item, folder)}
    removed = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            name = entry.name
            if name.startswith(".") and name.endswith(".part") and name[1:].rsplit(".", 2)[0] in names:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


__all__ = ["FolderBusy", "FolderLock", "Manifest", "remove_partial_files", "settings_key"]
