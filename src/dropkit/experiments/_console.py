"""What the experiments print: numbers to significant figures, durations, and progress.

One mechanism for every long command (``dropkit demo``, ``dropkit uci``, the sparse VD run, and
later ones), so that they all follow the same rules:

* :func:`format_number` and :func:`format_mean_se` format every number of a printed or written
  summary (stdout tables, Markdown files) to significant figures, so that a small value keeps
  its digits (``0.00101 ± 0.00003``, not ``0.001 ± 0.000``).  Machine-readable files (CSV,
  JSON) keep full precision and do not use them.
* :class:`Progress` reports the progress of one piece of work counted in steps (epochs, passes,
  splits): a tqdm bar when the stream is a terminal (:func:`is_terminal`) and tqdm is installed;
  otherwise one plain line per finished block of steps, with the elapsed time and an estimate of
  the time left, and no carriage returns or cursor codes, so that a log file reads line by line.

Example:
    >>> format_number(0.00101234), format_number(12345.678), format_number(-2.4019)
    ('0.00101', '12346', '-2.40')
    >>> format_mean_se(0.00101234, 0.0000312)
    '0.00101 ± 0.00003'
    >>> format_mean_se(2.8976, 0.1812)
    '2.90 ± 0.18'
    >>> format_duration(75.4)
    '1 min 15 s'
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

__all__ = [
    "Progress",
    "format_duration",
    "format_mean_se",
    "format_number",
    "is_terminal",
]

#: Beyond this many decimals (values below about 1e-7) numbers switch to scientific notation.
_MAX_DECIMALS = 9
#: From this power of ten up, numbers switch to scientific notation.
_MAX_EXPONENT = 15


def _check_digits(digits: int) -> None:
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")


def _exponent(value: float, digits: int) -> int:
    """The power of ten of ``value`` once rounded to ``digits`` significant figures
    (9.996 to 3 figures is 10.0: exponent 1)."""
    return int(f"{abs(value):.{digits - 1}e}".split("e")[1])


def _decimals(value: float, digits: int) -> int | None:
    """Decimals that show ``value`` to ``digits`` significant figures (never fewer than 0: the
    integer digits of a large number are all shown); ``None`` for 0 and non-finite values."""
    if value == 0.0 or not math.isfinite(value):
        return None
    return max(0, digits - 1 - _exponent(value, digits))


def _fixed(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    # A negative value that rounds to zero prints as "-0.00": drop the sign.
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def _special(value: float) -> str | None:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0:
        return "0"
    return None


def format_number(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures, in fixed notation.

    The integer digits of a large number are never rounded away (``12345.678`` gives
    ``12346``); values below about 1e-7 or from 1e15 up use scientific notation.  ``0`` is
    ``"0"``; NaN and infinities are ``"nan"``, ``"inf"``, ``"-inf"``.

    Args:
        value: the number (anything :class:`float` accepts).
        digits: significant figures, >= 1.

    Returns:
        The text.

    Example:
        >>> [format_number(v) for v in (0.00101234, 12345.678, 0.0, -0.5, float("nan"), 9.9996)]
        ['0.00101', '12346', '0', '-0.500', 'nan', '10.0']
        >>> format_number(3.2e-12), format_number(2.5e17, 2)
        ('3.20e-12', '2.5e+17')
    """
    _check_digits(digits)
    value = float(value)
    special = _special(value)
    if special is not None:
        return special
    decimals = _decimals(value, digits)
    if decimals is None or decimals > _MAX_DECIMALS or _exponent(value, digits) >= _MAX_EXPONENT:
        return f"{value:.{digits - 1}e}"
    return _fixed(value, decimals)


def format_mean_se(mean: float, se: float, digits: int = 3) -> str:
    """``mean ± se`` with both numbers to the same decimal place, chosen by significant figures.

    The mean gets ``digits`` significant figures, but never fewer decimals than show the first
    significant figure of the standard error, nor more than show its second: the SE always
    shows a non-zero digit (unless it is 0), and the mean no digits far below its uncertainty.

    Args:
        mean: the mean.
        se: its standard error (>= 0).
        digits: significant figures of the mean, >= 1.

    Returns:
        The text, e.g. ``"2.90 ± 0.18"``.

    Example:
        >>> format_mean_se(0.00101234, 0.0000312), format_mean_se(-1.3, 0.0)
        ('0.00101 ± 0.00003', '-1.30 ± 0.00')
        >>> format_mean_se(2.8976, 0.0003), format_mean_se(123.456, 0.18), format_mean_se(0.003, 0.02)
        ('2.8976 ± 0.0003', '123.5 ± 0.2', '0.003 ± 0.020')
        >>> format_mean_se(float("nan"), 0.1), format_mean_se(0.0, 0.0)
        ('nan ± 0.1', '0 ± 0')
    """
    _check_digits(digits)
    mean, se = float(mean), float(se)
    if not (math.isfinite(mean) and math.isfinite(se)):
        return f"{format_number(mean, digits)} ± {format_number(se, 1)}"
    mean_decimals = _decimals(mean, digits)
    low, high = _decimals(se, 1), _decimals(se, 2)
    if mean_decimals is None and low is None:
        return "0 ± 0"
    if low is None or high is None:
        decimals = mean_decimals if mean_decimals is not None else 0
    elif mean_decimals is None:
        decimals = low
    else:
        decimals = min(max(mean_decimals, low), high)
    too_large = max(abs(mean), se) >= 10.0**_MAX_EXPONENT
    if decimals > _MAX_DECIMALS or too_large:
        return f"{mean:.{digits - 1}e} ± {se:.1e}"
    return f"{_fixed(mean, decimals)} ± {_fixed(se, decimals)}"


def format_duration(seconds: float) -> str:
    """A duration for people: ``"4.2 s"``, ``"1 min 15 s"``, ``"2 h 03 min"``.

    Example:
        >>> format_duration(0.04), format_duration(4.25), format_duration(59.6), format_duration(7385)
        ('0.040 s', '4.2 s', '1 min 00 s', '2 h 03 min')
        >>> format_duration(0.0004)
        '<0.01 s'
    """
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 0.01:
        return "<0.01 s"
    if round(seconds) < 60:
        return f"{format_number(seconds, 2)} s" if seconds < 10 else f"{round(seconds)} s"
    total = round(seconds)
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: the current :data:`sys.stderr`) is an interactive terminal.

    The one decision behind every progress display of the experiments: bars on a terminal,
    plain lines everywhere else (files, pipes, CI logs, captured output).  A stream without
    ``isatty``, a closed one, or a terminal 0 columns wide is not a terminal.
    """
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        if not isatty():
            return False
    except (ValueError, OSError):
        return False
    try:
        # A pseudo-terminal of width 0 (some CI runners) would show nothing of a bar.
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):
        return True  # a terminal whose size cannot be asked


class Progress:
    """Progress of one piece of work counted in steps: a bar on a terminal, plain lines otherwise.

    On a terminal (:func:`is_terminal`) with tqdm installed, a tqdm bar.  Otherwise one line per
    finished block of steps (``lines`` blocks in all, the last step always included)::

        no dropout: 20/200 epochs, 0.41 s elapsed, about 3.7 s left, loss=1.23
        no dropout: 200/200 epochs, done in 4.1 s, loss=0.00212

    Use it as a context manager (closing a bar removes or keeps it, per ``leave``).

    Args:
        label: what is running (the bar's description, the start of each line).
        total: number of steps, >= 0.
        unit: what a step is, plural (``"epochs"``, ``"passes"``, ``"splits"``).
        enabled: ``False`` shows nothing at all (``--no-progress``).
        lines: blocks of steps, one line each, when not on a terminal.
        stream: where to write; default: :data:`sys.stderr` at construction time.
        leave: keep the finished bar on the terminal.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        unit: str,
        enabled: bool = True,
        lines: int = 10,
        stream: TextIO | None = None,
        leave: bool = True,
    ) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 1:
            raise ValueError(f"lines must be an int >= 1, got {lines!r}")
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self._blocks = min(lines, max(total, 1))
        self._block = 0  # blocks already reported
        self._start = time.perf_counter()
        self._bar: Any = None
        self._enabled = enabled and total > 0
        if self._enabled and is_terminal(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(
                    total=total,
                    desc=label,
                    unit=unit,
                    leave=leave,
                    file=self.stream,
                    dynamic_ncols=True,
                )

    @property
    def bar(self) -> bool:
        """Whether a terminal bar is drawn (else plain lines, or nothing when disabled)."""
        return self._bar is not None

    def update(self, done: int, info: Mapping[str, str] | None = None) -> None:
        """Report that ``done`` of the ``total`` steps are finished.

        Args:
            done: steps finished so far (not an increment).
            info: short ``name=value`` facts shown beside the bar or at the end of the line
                (format numbers with :func:`format_number`).
        """
        if not self._enabled:
            return
        done = min(max(done, 0), self.total)
        if self._bar is not None:
            if info:
                self._bar.set_postfix(info, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        # Block k (1-based) ends at step ceil(k * total / blocks); report each block once.
        reached = self._block
        while reached < self._blocks and done >= math.ceil((reached + 1) * self.total / self._blocks):
            reached += 1
        if reached == self._block:
            return
        self._block = reached
        elapsed = time.perf_counter() - self._start
        text = f"{self.label}: {done}/{self.total} {self.unit}, "
        if done >= self.total:
            text += f"done in {format_duration(elapsed)}"
        else:
            left = elapsed / done * (self.total - done)
            text += f"{format_duration(elapsed)} elapsed, about {format_duration(left)} left"
        if info:
            text += ", " + ", ".join(f"{key}={value}" for key, value in info.items())
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar (nothing to do for lines)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
