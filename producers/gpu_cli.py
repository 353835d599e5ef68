"""The `--gpu` options of `producer` (producers/shipper.py) and the loop that samples and publishes."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from rankwatch.producers.gpu import (
    GpuPublisher,
    GpuSampler,
    GpuSamplerConfig,
    NvmlUnavailable,
    SamplerMetrics,
    live_batches,
    load_rank_map,
    nvml_sample_fn,
    replay_batches,
    run_sampling,
)
from rankwatch.producers.gpu_replay import read_samples

from rankwatch.config import Settings, load_config
from rankwatch.parsing import ParseError
from rankwatch.records import Record

log = logging.getLogger("rankwatch.sampler")


class GpuRunError(RuntimeError):
    """The GPU side cannot start (no NVML, no GPU, bad recording): one line for the user."""


def add_gpu_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("GPU sampling (--gpu)")
    g.add_argument("--gpu", action="store_true", help="sample this node's GPUs (NVML) to the GPU topic")
    g.add_argument("--interval", type=float, dest="interval_s", help="seconds between samples (default 1)")
    g.add_argument("--devices", type=int, nargs="+", metavar="N", help="NVML indices (default: every GPU)")
    g.add_argument("--replay", metavar="FILE", help="replay recorded samples instead: GPU sample JSON lines or "
                   "nvidia-smi --query-gpu=... --format=csv output")
    g.add_argument("--speed", type=float, default=1.0, help="replay at N x real time (0: as fast as possible)")
    g.add_argument("--rank-map", dest="rank_map", metavar="FILE",
                   help='GPU index -> rank: JSON {"0": 8, ...} or lines "gpu rank" (default: from RANK/LOCAL_RANK/'
                   "CUDA_VISIBLE_DEVICES or NODE_RANK/LOCAL_WORLD_SIZE)")
    g.add_argument("--host", help="host name in the samples (default: this machine's)")


@dataclass
class GpuRun:
    """A configured sampler (live or replay) and its publisher; `run` blocks until done or stopped."""

    batches: Iterator[list[Record]]
    publisher: GpuPublisher
    stop: threading.Event = field(default_factory=threading.Event)
    sampled: int = 0

    def run(self) -> None:
        self.publisher.start()
        try:
            self.sampled = run_sampling(self.batches, self.publisher, self.stop)
        finally:
            self.publisher.close()
            log.info("GPU samples: %d taken, %d delivered, %d dropped", self.sampled, self.publisher.sent,
                     self.publisher.dropped)


def _job(args: argparse.Namespace, settings: Settings) -> str:
    job = args.job or settings.job
    if not job and args.tail and len(args.tail) == 1:
        path = os.path.abspath(args.tail[0])
        job = os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
    if not job:
        raise GpuRunError("--gpu needs --job (the job the samples belong to; its logs' job name)")
    return job


def setup_gpu(args: argparse.Namespace, settings: Settings, registry: CollectorRegistry) -> GpuRun:
    cli = {k: v for k, v in vars(args).items() if k in ("interval_s", "host")}
    if args.devices:
        cli["devices"] = tuple(args.devices)
    config = load_config(GpuSamplerConfig, cli, path=args.config, section="sampler")
    job = _job(args, settings)
    try:
        ranks = load_rank_map(args.rank_map)
    except (OSError, ValueError) as exc:
        raise GpuRunError(f"--rank-map {args.rank_map}: {exc}") from exc
    stop = threading.Event()
    if args.replay:
        if not os.path.isfile(args.replay):
            raise GpuRunError(f"--replay {args.replay}: no such file")
        records = read_samples(args.replay, job, config.host, ranks)
        try:
            first = next(records)  # a bad recording is the user's error now, not a thread's later
        except StopIteration:
            raise GpuRunError(f"--replay {args.replay}: no GPU samples in it") from None
        except (ParseError, ValueError, OSError) as exc:
            raise GpuRunError(f"--replay {args.replay}: {exc}") from exc
        batches = replay_batches(itertools.chain([first], records), args.speed, stop)
    else:
        try:
            fn = nvml_sample_fn(config.devices)
        except NvmlUnavailable as exc:
            raise GpuRunError(f"--gpu: cannot read GPUs: {exc} (use --replay FILE to replay recorded samples)"
                              ) from exc
        sampler = GpuSampler(fn, job, config.host, ranks)
        batches = live_batches(sampler, config.interval_s, stop)
    publisher = GpuPublisher(settings, config, SamplerMetrics(registry))
    return GpuRun(batches, publisher, stop)
