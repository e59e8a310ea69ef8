"""Which partitions this member owns, under which assignment: the fence between owners.

Owns: an epoch per assignment of a partition. Every fetched message carries the epoch it was
fetched under; once its partition is revoked (or assigned again) the message is no longer
`live`: it is neither written, nor published, nor finished here, and the partition's next owner
replays it from the committed offset. Must not: commit, wait or talk to the broker.
"""

from __future__ import annotations

from typing import Iterable

from streams.backends import TopicPartition

from streams.steps import Fetched


class Fencing:
    def __init__(self) -> None:
        self.epochs: dict[TopicPartition, int] = {}
        self._next_epoch = 1

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        """A new epoch per assignment: messages of an earlier ownership stay fenced."""
        for tp in tps:
            self.epochs[tp] = self._next_epoch
            self._next_epoch += 1

    def fence(self, tps: Iterable[TopicPartition]) -> None:
        """From here on nothing fetched under these assignments is written or published."""
        for tp in tps:
            self.epochs.pop(tp, None)

    def epoch(self, tp: TopicPartition) -> int:
        """The epoch a message of `tp` fetched now carries (0: not owned, never live)."""
        return self.epochs.get(tp, 0)

    def live(self, item: Fetched) -> bool:
        """Whether `item` may still be written, published and finished: its partition's assignment is the one it came under."""
        return self.epochs.get(item.tp) == item.epoch

    def owned(self) -> set[TopicPartition]:
        return set(self.epochs)
