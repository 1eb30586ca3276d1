"""What every config section shares: its field checks, each failing with one line that names the dotted path."""

from __future__ import annotations

import difflib

from ..errors import ConfigError


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _positive(path: str, value: float | int | None, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{path}: must be set")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


class _Section:
    """Field checks shared by the sections; SECTION is the section's key in `Config` (the dotted path's head)."""

    SECTION = ""

    def _positive(self, name: str, *, allow_zero: bool = False, allow_none: bool = False) -> None:
        _positive(f"{self.SECTION}.{name}", getattr(self, name), allow_zero=allow_zero, allow_none=allow_none)

    def _within(self, name: str, low: float, high: float, brackets: str = "[)") -> None:
        """`name` must lie between low and high; brackets say which ends are allowed, e.g. "(]"."""
        value = getattr(self, name)
        above = value >= low if brackets[0] == "[" else value > low
        below = value <= high if brackets[1] == "]" else value < high
        if not (above and below):
            raise ConfigError(f"{self.SECTION}.{name}: {value!r} must be in {brackets[0]}{low}, {high}{brackets[1]}")

    def validate(self) -> None:
        """Range checks of this section's own fields, which types alone cannot express."""
