"""Progress bars: tqdm when installed, otherwise a plain line per update on stderr (no hard dependency)."""

from __future__ import annotations

import sys


class _Plain:
    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, values: dict | None = None, refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in (values or {}).items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True):
    """A tqdm bar (or a plain fallback); ``None`` when disabled."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
