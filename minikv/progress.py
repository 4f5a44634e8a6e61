"""Progress bars for long work, on stderr and only when it is a terminal (piped output and
logs stay clean). A bar appears after half a second, so quick work does not flicker, and is
cleared when the work ends: its result is printed after it."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it"):
        from tqdm import tqdm

        nbytes = unit == "B"
        self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=nbytes, unit_divisor=1024 if nbytes else 1000,
                         disable=not sys.stderr.isatty(), leave=False, file=sys.stderr, dynamic_ncols=True,
                         delay=0.5)

    def update_to(self, n: int, status: str = "", total: int | None = None) -> None:
        """Set the bar to `n` done (of `total`, if it is only known now), with a short status
        after it (e.g. a running value or the item at work)."""
        if total is not None:
            self._bar.total = total
        self.advance(n - self._bar.n, status)

    def advance(self, n: int = 1, status: str = "") -> None:
        if status:
            self._bar.set_postfix_str(status, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
