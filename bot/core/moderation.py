"""Prompt moderation: a configurable list of banned terms, matched case- and accent-insensitively on
whole words ("cat" does not refuse "concatenate"; "gore" refuses "GÔRE" and "gore," alike).

Only the positive prompt is checked: the negative prompt (`--no ...`) is where people write the
things they want to keep out of the image.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass


def normalize(text: str) -> str:
    """Fold case and strip accents (NFKD, drop combining marks), collapse whitespace."""
    if text.isascii():
        # The usual prompt: NFKD leaves ASCII as it is and it has no combining marks, and ASCII's
        # casefold is lower(). This runs per submission inside the batch's transaction.
        return " ".join(text.lower().split())
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.split())


@dataclass(frozen=True)
class Rule:
    term: str
    pattern: re.Pattern[str]

    @property
    def description(self) -> str:
        return f"banned term {self.term!r}"


class Moderator:
    def __init__(self, banned_terms: Iterable[str], enabled: bool = True):
        self.enabled = enabled
        self.rules = tuple(
            Rule(
                term,
                re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, normalize(term).split())) + r"(?!\w)"),
            )
            for term in banned_terms
            if term.strip()
        )

    def check(self, prompt: str) -> Rule | None:
        """The first rule the prompt breaks, or None."""
        if not self.enabled or not self.rules:
            return None
        text = normalize(prompt)
        for rule in self.rules:
            if rule.pattern.search(text):
                return rule
        return None
