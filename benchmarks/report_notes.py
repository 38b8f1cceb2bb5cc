"""Hand-written notes in generated benchmark reports: everything from a "## Notes" heading on survives rebuilds."""

from __future__ import annotations

from pathlib import Path


def kept_notes(path: Path) -> list[str]:
    """The "## Notes" section of an earlier report at ``path`` (lines), or nothing."""
    lines = path.read_text().splitlines() if path.is_file() else []
    start = next((i for i, line in enumerate(lines) if line.startswith("## Notes")), len(lines))
    return lines[start:] + [""] if start < len(lines) else []
