"""Where training batches come from: the whole set on the device, or a DataLoader streaming
from the row cache. Both return floats in [-1, 1] on the device, with the random horizontal flips
of data.hflip drawn from the training stream, and both resume exactly: in memory each batch is
drawn by index from the training stream itself; streamed, the batches are a fixed function of
the seed and the step (see EpochShards), so a resumed run starts where the last step left off."""

import torch

from .. import runtime
from ..errors import UserError
from . import Split, to_model_range
from .rows import RowFile, RowReader


def flip_some(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class InMemoryBatches:
    """The training set on the device as stored (uint8 pixels are 4x smaller than floats), a batch
    drawn by random index, converted per batch (not when the set is latents already: `encoded`)."""

    def __init__(self, data: Split, device, batch_size: int, hflip: bool, labelled: bool,
                 channels_last: bool, encoded: bool = False):
        self.images = data.images.to(device)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = data.labels.to(device) if labelled else None
        self.batch_size, self.hflip, self.device = batch_size, hflip, device
        self.convert = (lambda images: images) if encoded else to_model_range

    def __len__(self) -> int:
        return len(self.images)

    def start(self, step: int) -> None:
        """Nothing to do: every batch comes from the training stream."""

    def first(self):
        return self.next(torch.Generator(self.device).manual_seed(0))

    def next(self, generator: torch.Generator):
        """(images in [-1, 1], labels or None)."""
        index = torch.randint(0, len(self.images), (self.batch_size,), generator=generator, device=self.device)
        images = self.convert(self.images[index])
        if self.hflip:
            images = flip_some(images, generator)
        return images, None if self.labels is None else self.labels[index]


class EpochShards(torch.utils.data.Sampler):
    """Batches of row indices for this rank: every epoch a seeded permutation of all n images,
    dealt out over the ranks (rank r takes every world_size-th index, all ranks the same count),
    cut into batches that run on across epochs; the first one is batch number `start_step` + 1."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // world_size

    def shard(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2 ** 63)
        return torch.randperm(self.n, generator=generator)[self.rank::self.world_size][: self.per_epoch]

    def __iter__(self):
        epoch, offset = divmod(self.start_step * self.batch_size, self.per_epoch)
        batch = []
        while True:
            for index in self.shard(epoch)[offset:].tolist():
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


class StreamingBatches:
    """Batches read from the row cache by data.num_workers DataLoader workers (pinned memory on a
    GPU), this rank's shard only."""

    def __init__(self, data: Split, device, batch_size: int, hflip: bool, labelled: bool,
                 channels_last: bool, seed: int, num_workers: int):
        if len(data.images) < runtime.world_size():
            raise UserError(f"{len(data.images)} training images cannot be shared by "
                            f"{runtime.world_size()} processes: use more images or fewer processes")
        self.reader = RowReader(data.images, data.labels if labelled else None)
        self.batch_size, self.hflip, self.device, self.seed = batch_size, hflip, device, seed
        self.channels_last, self.num_workers = channels_last, num_workers
        self.batches = None

    def __len__(self) -> int:
        return len(self.reader)

    def start(self, step: int) -> None:
        """Begin with the batch of step `step` + 1."""
        sampler = EpochShards(len(self.reader), self.batch_size, self.seed, step,
                              runtime.rank(), runtime.world_size())
        self.batches = iter(torch.utils.data.DataLoader(
            self.reader, batch_size=None, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.seed)))  # else it draws from torch's global one

    def first(self):
        indices = [i % len(self.reader) for i in range(self.batch_size)]
        return self.on_device(*self.reader[indices], None)

    def next(self, generator: torch.Generator):
        if self.batches is None:
            self.start(0)
        return self.on_device(*next(self.batches), generator)

    def on_device(self, images, labels, generator):
        images = to_model_range(images.to(self.device, non_blocking=True))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.hflip and generator is not None:
            images = flip_some(images, generator)
        return images, None if labels is None else labels.to(self.device, non_blocking=True)


def training_batches(data: Split, data_cfg, device, batch_size: int, labelled: bool,
                     channels_last: bool, seed: int, encoded: bool = False):
    """The batch source for `data`'s training images: streamed when they are a RowFile; `encoded`:
    the images are cached latents (latent diffusion), used as they are and never flipped."""
    if encoded:
        return InMemoryBatches(data, device, batch_size, False, labelled, channels_last, encoded=True)
    if isinstance(data.images, RowFile):
        return StreamingBatches(data, device, batch_size, data_cfg.hflip, labelled, channels_last,
                                seed, data_cfg.num_workers)
    return InMemoryBatches(data, device, batch_size, data_cfg.hflip, labelled, channels_last)
