"""The sample streams a run draws its steps from (``data.batching``).

- ``mixed``: ``SampleStream`` over every training row (collate.py): epoch e a seeded permutation.
- ``by_group``: ``GroupedStream``: one ``SampleStream`` per prompt group over its own rows, seeded
  from (seed, group name); step k's global batch comes wholly from group k mod G. A group's rows
  then arrive in the same order, step for step, as in a run over that group alone, and a packed
  forward keeps the group's prompt prefix shared.

Both resume from ``state()`` (host ints: what was consumed), never from a saved permutation.
"""
from __future__ import annotations

from ptuning_dist.data.collate import SampleStream
from ptuning_dist.prompt.groups import group_seed


class GroupedStream:
    def __init__(self, pgroups: list[int], names: tuple[str, ...], seed: int):
        """``pgroups``: each example's prompt group index; ``names``: the groups' names."""
        self.members = [[i for i, g in enumerate(pgroups) if g == k] for k in range(len(names))]
        self.order = [k for k, m in enumerate(self.members) if m]  # groups with training rows take turns
        self.streams = {k: SampleStream(len(self.members[k]), group_seed(seed, names[k])) for k in self.order}
        self.turn = 0

    @property
    def consumed(self) -> int:
        return sum(s.consumed for s in self.streams.values())

    def take(self, batch: int) -> list[int]:
        k = self.order[self.turn % len(self.order)]
        self.turn += 1
        return [self.members[k][j] for j in self.streams[k].take(batch)]

    def state(self) -> dict:
        return {"turn": self.turn, "consumed": {str(k): s.consumed for k, s in self.streams.items()}}

    def load_state(self, state: dict) -> None:
        self.turn = state["turn"]
        for k, s in self.streams.items():
            s.consumed = state["consumed"][str(k)]


def make_stream(batching: str, examples: list, names: tuple[str, ...], seed: int):
    if batching == "by_group":
        return GroupedStream([e.pgroup for e in examples], names, seed)
    return SampleStream(len(examples), seed)
