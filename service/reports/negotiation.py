"""HTTP content negotiation on the Accept header (RFC 9110, section 12.5.1).

`choose(accept, offers)` picks the offer the client prefers: the highest q-value (q=0
means "not this"), then the most specific media range that matched it, then the range
the client listed first, then the server's own order of `offers`. No Accept header, or one
where no entry parses, means "anything": the first offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaType:
    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> MediaType:
        kind, params = _split(text)
        main, _, sub = kind.partition("/")
        return cls(main, sub, params)

    def __str__(self) -> str:
        tail = "".join(
            f'; {key}="{value}"' if "/" in value or ";" in value else f"; {key}={value}"
            for key, value in self.params.items()
        )
        return f"{self.type}/{self.subtype}{tail}"


@dataclass(frozen=True)
class _Range:
    type: str
    subtype: str
    params: dict[str, str]
    q: float
    position: int

    def matches(self, offer: MediaType) -> bool:
        if self.type not in ("*", offer.type):
            return False
        if self.subtype not in ("*", offer.subtype):
            return False
        return all(offer.params.get(key) == value for key, value in self.params.items())

    @property
    def specificity(self) -> int:
        if self.type == "*":
            return 0
        if self.subtype == "*":
            return 1
        return 2 + len(self.params)


def _split(text: str) -> tuple[str, dict[str, str]]:
    """'type/sub; a=1; b="x"' -> ('type/sub', {'a': '1', 'b': 'x'}); names lower-cased."""
    parts = text.split(";")
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return parts[0].strip().lower(), params


def _ranges(accept: str) -> list[_Range]:
    ranges: list[_Range] = []
    # Quoted parameter values never hold commas in the media types we offer, so a plain
    # split is enough; an entry that does not parse is skipped.
    for position, entry in enumerate(accept.split(",")):
        kind, params = _split(entry)
        main, slash, sub = kind.partition("/")
        if not slash or not main or not sub:
            continue
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            continue
        if not 0.0 <= q <= 1.0:
            continue
        ranges.append(_Range(main, sub, params, q, position))
    return ranges


def choose(accept: str | None, offers: Sequence[MediaType]) -> MediaType | None:
    """The offer to answer with, or None when the client accepts none of them (406)."""
    ranges = _ranges(accept or "")
    if not ranges:
        return offers[0] if offers else None
    best: tuple[float, int, int, int] | None = None
    chosen: MediaType | None = None
    for order, offer in enumerate(offers):
        matching = [r for r in ranges if r.matches(offer)]
        if not matching:
            continue
        # The most specific matching range sets the offer's q (RFC 9110).
        top = max(matching, key=lambda r: (r.specificity, -r.position))
        if top.q <= 0:
            continue
        key = (top.q, top.specificity, -top.position, -order)
        if best is None or key > best:
            best, chosen = key, offer
    return chosen
