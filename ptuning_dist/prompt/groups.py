"""Prompt groups: which rows of the one stacked prompt table each row's slots index.

The paper learns one prompt per task or relation. A run holds G groups (``prompt.sharing =
per_group``: one per LAMA relation or per task; ``shared``: one for everything), each with its
own encoder and its own m_g rows of the stacked table::

    table_MH = [ group 0's m_0 rows | group 1's m_1 rows | ... ]      M = sum of m_g
    a row of group g: slot s of its template -> table row offset_g + s  (the data loader adds it)

so the splice stays one op over one table whatever G is, and a row never sees another group's
prompt. ``PromptGroups`` is the mapping; it travels in the table's sidecar and in checkpoints
(``to_json``/``from_json``) so a table is only ever read back with the mapping it was trained with.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from ptuning_dist.errors import CheckpointError

SHARED = "shared"  # the one group of prompt.sharing = shared


@dataclass(frozen=True)
class PromptGroups:
    names: tuple[str, ...]
    n_prompt: tuple[int, ...]  # slots of each group's template

    def __post_init__(self):
        assert len(self.names) == len(self.n_prompt) and len(set(self.names)) == len(self.names), self

    @classmethod
    def of(cls, names, n_prompt: int) -> "PromptGroups":
        """Groups that all use one template of ``n_prompt`` slots."""
        names = tuple(names)
        return cls(names, (n_prompt,) * len(names))

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for m in self.n_prompt:
            out.append(acc)
            acc += m
        return tuple(out)

    @property
    def total(self) -> int:
        """M: the rows of the stacked table."""
        return sum(self.n_prompt)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def rows(self, name: str) -> tuple[int, int]:
        """[start, stop) of a group's rows in the stacked table."""
        g = self.index(name)
        return self.offsets[g], self.offsets[g] + self.n_prompt[g]

    def to_json(self) -> dict:
        return {n: list(self.rows(n)) for n in self.names}

    @classmethod
    def from_json(cls, d, where: str) -> "PromptGroups":
        """The sidecar's ``groups`` ({name: [start, stop]}, in table order); errors name ``where``."""
        if not isinstance(d, dict) or not d:
            raise CheckpointError(f"{where}: 'groups' must map each group to its [start, stop) table rows")
        names, sizes, at = [], [], 0
        for name, span in d.items():
            ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
            if not ok or span[0] != at or span[1] <= span[0]:
                raise CheckpointError(f"{where}: group {name!r} rows {span!r} are not the next [start, stop) "
                                      f"after row {at}")
            names.append(name)
            sizes.append(span[1] - span[0])
            at = span[1]
        return cls(tuple(names), tuple(sizes))


def group_seed(seed: int, name: str) -> int:
    """The seed of one group's initial encoder weights: a function of the run's seed and the group's
    name only, so a group starts from the same weights whichever other groups share its run (and
    the one ``shared`` group from ``seed`` itself, as a single-prompt run always has)."""
    if name == SHARED:
        return seed
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
