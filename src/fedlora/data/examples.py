"""The one record type every data source produces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    `label` is what partitioners group by (Dolly: category; Natural Instructions: task name).
    `references` are all acceptable answers for scoring (ROUGE-L takes the best match); the
    first is `response`, the training target.
    """

    instruction: str
    context: str
    response: str
    label: str
    references: tuple[str, ...] = field(default=())
    uid: str = ""

    def all_references(self) -> tuple[str, ...]:
        return self.references if self.references else (self.response,)
