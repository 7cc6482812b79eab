"""A batch order that depends only on (seed, position), so training resumes exactly.

The order is an endless stream of global batches: epoch e is
`randperm(n, generator=manual_seed(seed + e))` cut into batches of
`batch_size * world_size` indices (the last partial batch dropped), and global batch g
is batch `g % per_epoch` of epoch `g // per_epoch`. Rank r takes the r-th contiguous
slice of each global batch, so the ranks together see exactly what one process with
`batch_size * world_size` would see, and never the same index.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Per-rank batches of block indices from the stream, read in passes of `num_batches`.

    Passes are aligned at 0: pass p covers global batches [p * num_batches,
    (p + 1) * num_batches). The first iteration starts at `start_batch` and runs to the
    end of its pass; each later iteration yields the next whole pass. `len()` is
    `num_batches` even on a resumed first pass, because Lightning restores the count of
    batches it already took in the pass and adds them to what it fetches (a shorter
    `len()` would end its epoch early and restart the iterator).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 1234,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = n // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{n} training blocks cannot fill one global batch of {self.global_batch_size} "
                f"(batch_size {batch_size} x world_size {world_size}); use a smaller batch_size "
                "or max_len, or more data"
            )
        self.num_batches = self.batches_per_epoch if num_batches is None else num_batches
        self.next_batch = start_batch  # global position of the next batch to yield

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        if self.num_batches <= 0:
            return
        start = self.next_batch
        stop = (start // self.num_batches + 1) * self.num_batches  # end of this pass
        self.next_batch = stop
        yield from self.batches(start, stop)

    def batches(self, start: int, stop: int) -> Iterator[list[int]]:
        """This rank's share of global batches [start, stop), computed without replay."""
        lo = self.rank * self.batch_size
        epoch, offset = divmod(start, self.batches_per_epoch)
        position = start
        while position < stop:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=generator)
            while offset < self.batches_per_epoch and position < stop:
                first = offset * self.global_batch_size + lo
                yield perm[first : first + self.batch_size].tolist()
                offset += 1
                position += 1
            epoch, offset = epoch + 1, 0


class SegmentBatchSampler(ResumableBatchSampler):
    """Consecutive segments in order, for Transformer-XL memory (``model.memory_len``).

    The ``n`` blocks (consecutive slices of the token stream) are read as ``global batch``
    parallel streams of ``L = n // global_batch`` blocks each, stream s holding blocks
    ``[s * L, (s + 1) * L)``: global batch g is segment ``g % L`` of every stream, so row r of
    batch g + 1 continues row r of batch g. Every epoch repeats the same order (there is
    nothing to shuffle without breaking the streams; ``seed`` is unused). Ranks take
    contiguous slices of the streams. Like the parent, a pure function of the position:
    exact resume. ``segment_of(index)`` says which segment of its stream a block is (0
    starts a stream: the memory is cleared there).
    """

    def batches(self, start: int, stop: int) -> Iterator[list[int]]:
        length = self.batches_per_epoch  # blocks per stream
        first_stream = self.rank * self.batch_size
        streams = torch.arange(first_stream, first_stream + self.batch_size) * length
        for position in range(start, stop):
            yield (streams + position % length).tolist()

    def segment_of(self, index: int) -> int:
        return index % self.batches_per_epoch
