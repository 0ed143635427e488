"""Shards: a deterministic partition of listings by a hash of their id.

`featurize` and `embed` run as N processes (`--shard I/N`, on as many machines as the
orchestrator gives them), each on the listings whose id hashes to I, then once more with
`--gather N` to put the shards' files together in the order one unsharded run writes:
a run in N shards gives the outputs of one run. The hash depends on the id alone, so a
listing stays in its shard from one retrain to the next (and keeps its cached features).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"(\d+)/(\d+)")


def shard_of(listing_id: str, count: int) -> int:
    """The shard (0..count-1) a listing belongs to."""
    digest = hashlib.sha256(listing_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: expected I/N with N >= 1 and 0 <= I < N"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` as given on the command line (`--shard 2/8`)."""
        match = _SPEC.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"--shard {text!r}: expected I/N, for example 0/4")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        """The shard's folder and file tag: `I-of-N`."""
        return f"{self.index}-of-{self.count}"

    def owns(self, listing_id: str) -> bool:
        return shard_of(listing_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def every_shard(count: int) -> list[Shard]:
    """The N shards of a run in N shards."""
    if count < 1:
        raise ValueError(f"--gather {count}: the number of shards must be >= 1")
    return [Shard(index, count) for index in range(count)]
