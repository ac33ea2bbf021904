"""The training loader: which shards each (rank, loader stream) reads in an epoch, batches of one latent shape, and
the data position that makes a resume consume exactly the batches the uninterrupted run would have.

A rank reads through torch's DataLoader with W workers (W = 1 when it reads in-line); each worker plays one
stream. DataLoader hands out its workers' batches in turn, worker 0 first, passing over a worker whose stream has
ended. That order is deterministic, so the position is: the epoch, the batches consumed from each stream, and the
stream whose turn is next. On resume, worker w plays stream (next + w) % W and skips what that stream gave: the
turns then continue exactly, also after some streams have ended (an epoch's end in epoch mode).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from mmdit.sources import ReadPolicy, ReadStats, Source, parse_sources, read_shard


@dataclass
class DataPosition:
    """Where a rank stands in its data (saved in every checkpoint, per rank)."""

    epoch: int = 0
    consumed: list = field(default_factory=lambda: [0])   # batches taken from each stream this epoch
    next_stream: int = 0

    @classmethod
    def start(cls, streams: int, epoch: int = 0) -> "DataPosition":
        return cls(epoch, [0] * streams, 0)

    @property
    def batches(self) -> int:
        return sum(self.consumed)

    def advance(self, stream: int):
        self.consumed[stream] += 1
        self.next_stream = (stream + 1) % len(self.consumed)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": list(self.consumed), "next_stream": self.next_stream}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), [int(c) for c in d["consumed"]], int(d["next_stream"]))

    @classmethod
    def from_batch_count(cls, epoch: int, batches: int, streams: int) -> "DataPosition":
        """A position saved as a plain batch count (checkpoints before streams were tracked): the turns as they
        are while no stream has ended."""
        return cls(epoch, [(batches - s + streams - 1) // streams for s in range(streams)], batches % streams)


def epoch_shards(sources: list[Source], seed: int, epoch: int) -> list[tuple[str, int | None]]:
    """Every shard one epoch reads, (url, manifest count), shuffled with (seed, epoch). A source of weight w is
    read int(w) times whole, plus (seed, epoch)-chosen shards once more: (w - int(w)) x its shard count of them,
    the fraction of one shard drawn as a chance, so a small source with a small weight is read now and then, on
    average as often as its weight says."""
    order = []
    for i, source in enumerate(sources):
        urls = list(source.urls)
        whole, part = divmod(source.weight, 1.0)
        chosen = urls * int(whole)
        if part:
            rng = random.Random(f"{seed}-{epoch}-{i}-part")
            extra = list(urls)
            rng.shuffle(extra)
            count, chance = divmod(part * len(urls), 1.0)
            chosen += extra[:int(count) + (rng.random() < chance)]
        order += [(u, source.counts.get(u) if source.counts else None) for u in chosen]
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def resampled_shards(sources: list[Source], rng: random.Random):
    """Shards drawn with replacement, forever: a source in proportion to its weight, then one of its shards."""
    weights = [s.weight for s in sources]
    while True:
        source = sources[0] if len(sources) == 1 else rng.choices(sources, weights)[0]
        url = rng.choice(source.urls)
        yield url, source.counts.get(url) if source.counts else None


def sample_stream(sources: list[Source], *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  stream: int = 0, streams: int = 1, shuffle_buffer: int = 1000, resampled: bool = False,
                  stats: ReadStats | None = None, policy: ReadPolicy = ReadPolicy()):
    """The samples one (rank, stream) reads, in a deterministic order for (seed, epoch).

    Not resampled: the epoch's shards (epoch_shards) are dealt round-robin to the world_size * streams streams, so
    together they read every shard exactly once (or as often as its weight says). Resampled: each stream draws
    shards with replacement, forever. Samples pass through a shuffle buffer seeded by (seed, epoch, stream).
    """
    stream = rank * streams + stream
    total = world_size * streams
    rng = random.Random(f"{seed}-{epoch}-{stream}")
    if resampled:
        order = resampled_shards(sources, random.Random(f"{seed}-{epoch}-{stream}-shards"))
    else:
        order = epoch_shards(sources, seed, epoch)[stream::total]
    distinct = {u for s in sources for u in s.urls}
    buffer, barren, read_any = [], set(), False
    for url, expected in order:
        if resampled and not read_any:   # an endless stream of shards that give nothing would never yield
            if url in barren and len(barren) == len(distinct):
                raise ValueError(f"none of the {len(barren)} shards gave a readable sample (first: "
                                 f"{sources[0].urls[0]})")
            barren.add(url)
        for sample in read_shard(url, stats, policy, expected):
            read_any = True
            if len(buffer) < shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
    rng.shuffle(buffer)
    yield from buffer


def choose_variant(sample: dict, rng: random.Random, probs: list[float] | None = None) -> dict:
    """One caption variant per sample: uniform (the paper's 50/50 for two) unless probs are given."""
    n = len(sample["variants"])
    weights = probs[:n] if probs else [1.0] * n
    return sample["variants"][rng.choices(range(n), weights=weights)[0]]


def bucket_batches(samples, batch_size: int, rng: random.Random, variant_probs=None, drop_last: bool = True):
    """Batches whose latents share one shape (one bucket at a time): samples wait in their bucket until it holds
    batch_size of them. Each batch: {"latent": (B, C, h, w), text fields: stacked, "keys": [...]}."""
    buckets: dict[tuple, list] = {}
    for sample in samples:
        shape = tuple(sample["latent"].shape)
        bucket = buckets.setdefault(shape, [])
        bucket.append((sample["record"]["key"], sample["latent"], choose_variant(sample, rng, variant_probs)))
        if len(bucket) == batch_size:
            yield collate(bucket)
            buckets[shape] = []
    if not drop_last:
        for bucket in buckets.values():
            if bucket:
                yield collate(bucket)


def collate(items) -> dict:
    keys, latents, variants = zip(*items)
    batch = {"keys": list(keys), "latent": torch.stack(latents)}
    for name in variants[0]:
        batch[name] = torch.stack([v[name] for v in variants])
    return batch


def read_report(stats: ReadStats) -> dict:
    return {**stats.counts(), "failed": dict(stats.failed)}


class ShardDataset(torch.utils.data.IterableDataset):
    """Batches for one rank, for torch's DataLoader with batch_size=None (batches are formed per bucket here).

    Every batch carries "stream" (which of this rank's streams gave it: pass it to DataPosition.advance) and
    "read" (that stream's ReadStats this epoch, with the shards that failed). With end_markers, after its last
    batch a stream yields {"stream", "read", "end": True}, so faults at its tail are reported too; it is not a batch.

    Per epoch every sample is read once; the incomplete last batch of each bucket in each stream is dropped.
    position: where an interrupted run stood in this epoch (see the module's docstring); it must have one stream
    per DataLoader worker (one when reading in-line).
    """

    def __init__(self, sources, batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 1000, resampled: bool = False,
                 variant_probs: list[float] | None = None, position: DataPosition | None = None,
                 policy: ReadPolicy = ReadPolicy(), end_markers: bool = False):
        super().__init__()
        self.sources = parse_sources(sources)   # a list of Source (parsed once by the caller) passes as it is
        self.batch_size, self.seed, self.epoch, self.rank, self.world_size = batch_size, seed, epoch, rank, world_size
        self.shuffle_buffer, self.resampled, self.variant_probs = shuffle_buffer, resampled, variant_probs
        self.position, self.policy, self.end_markers = position, policy, end_markers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        position = self.position or DataPosition.start(workers, self.epoch)
        if len(position.consumed) != workers:
            raise ValueError(f"the data position has {len(position.consumed)} loader streams and the loader "
                             f"{workers}: resume with the data.num_workers the run was saved with")
        stream = (position.next_stream + worker) % workers
        skip, stats = position.consumed[stream], ReadStats()
        samples = sample_stream(self.sources, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                world_size=self.world_size, stream=stream, streams=workers,
                                shuffle_buffer=self.shuffle_buffer, resampled=self.resampled, stats=stats,
                                policy=self.policy)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{stream}-variants")
        for i, batch in enumerate(bucket_batches(samples, self.batch_size, rng, self.variant_probs)):
            if i >= skip:
                yield {**batch, "stream": stream, "read": read_report(stats)}
        if self.end_markers:
            yield {"stream": stream, "read": read_report(stats), "end": True}


class ReadTally:
    """A rank's read faults over the run: each stream's latest report in this epoch plus the epochs before, and
    every shard that failed, named once. Only `carried` and `failed` are saved: a resume reads the epoch's
    consumed batches again, and so counts their faults again."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.carried = dict(saved.get("carried", {}))
        self.failed = dict(saved.get("failed", {}))
        self.reports: dict[int, dict] = {}

    def update(self, stream: int, report: dict) -> dict:
        """Take a batch's report; returns the shards that failed and were not named before ({url: reason})."""
        self.reports[stream] = report
        new = {url: why for url, why in report["failed"].items() if url not in self.failed}
        self.failed.update(new)
        return new

    def end_epoch(self):
        self.carried = self.totals()
        self.reports = {}

    def totals(self) -> dict:
        totals = dict(self.carried)
        for report in self.reports.values():
            for name, value in report.items():
                if name != "failed":
                    totals[name] = totals.get(name, 0) + value
        return totals

    def to_dict(self) -> dict:
        return {"carried": dict(self.carried), "failed": dict(self.failed)}


def resampled_epoch_batches(sources: list[Source], world_size: int, batch_size: int) -> int | None:
    """Batches per rank in a resampled epoch: the manifests' samples once over (so epochs, and with them the
    reshuffles and resume points, mean what they mean in epoch mode); None (one endless epoch) without counts."""
    if any(s.samples is None for s in sources):
        return None
    return max(1, sum(s.samples for s in sources) // (world_size * batch_size))
