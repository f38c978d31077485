"""What a run measures and how: one frozen ``RunConfig``, validated when made, and its choices.

Settings sit apart from the harness that uses them, so the CLI, the notebook and the ranked runner
can build and check one without importing what measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from . import disk, profiles, training
from . import model as model_lib
from .errors import UsageError
from .launch import under_torchrun
from .shards import cores
from .storage import FILE, check_settings, is_local, scheme

Order = Literal["interleaved", "shuffled", "sequential"]
ORDERS: tuple[str, ...] = get_args(Order)
LoadInto = Literal["fresh", "existing"]
LOAD_INTO: tuple[str, ...] = get_args(LoadInto)
RANKS_PER_CORE = 4
"""Processes a run may spawn per core of this host: more only queue for the cores (each takes ~0.4 GB)."""


@dataclass(frozen=True)
class RunConfig:
    """What a run measures and how; validated when made, so a bad setting fails before anything is written."""

    preset: str = model_lib.DEFAULT_PRESET
    model_path: Path | None = None
    """A local Hugging Face Llama directory; replaces the preset."""
    out: Path = Path("saved_models")
    repeats: int = 1
    order: Order = "interleaved"
    """interleaved: repeat 1 of every strategy, then repeat 2, ...; shuffled: the same, each round in a
    seeded random order; sequential: every repeat of one strategy before the next."""
    keep_checkpoints: bool = False
    fresh_process: bool = False
    """Measure each round in a new worker process that maps the model from shared memory (pyperf's design):
    no round inherits the heap, huge pages or library state an earlier one left (``--process fresh``)."""
    warmup: bool = True
    drift: bool = True
    """Probe the disk briefly before every repeat, so each row says how fast the disk was at the time."""
    reprobe: bool = False
    """Measure the disk's limits again even when the output folder holds today's for its filesystem."""
    seed: int = 0
    results_file: str = "results.csv"
    progress: bool = True
    store: str = FILE
    """Where checkpoints are written: ``file`` (``out``) or ``s3://bucket/prefix`` (credentials from AWS_*)."""
    s3_endpoint: str | None = None
    """The S3 server's URL, e.g. ``http://127.0.0.1:8333`` (``python -m ckptbench s3-server``); None is AWS."""
    s3_rtt_ms: float | None = None
    """Round-trip time to inject in front of ``s3_endpoint`` with a delay proxy on loopback (no netem here);
    0 routes through the proxy without delay, to measure what the proxy itself costs."""
    load_into: LoadInto = "fresh"
    """fresh: every load returns new tensors; existing: it reads into tensors shaped like the model, allocated
    and touched outside the timers (what resuming a live model does)."""
    ranks: int | None = None
    """Save with this many processes, each holding its row shard of every tensor (``ckptbench.ranked``);
    None: one process, no process group."""
    load_ranks: int | None = None
    """Load with this many processes (default: ``ranks``); another number reshards."""
    rank_timeout_s: float = 900.0
    """How long any collective waits for a rank before the run fails naming it: longer than the slowest phase."""
    payload: training.Payload = "weights"
    """weights: the model's tensors; training: a training job's whole state (``ckptbench.training``), each load
    also resumed for one step and compared with the job that never stopped."""
    disk_profile: str = profiles.NONE
    """A cloud volume to emulate on the disk under ``out`` with the kernel's I/O throttle (``profiles.PROFILES``)."""
    disk_limit: str | None = None
    """The user's own caps instead, e.g. ``read=300M,write=300M,riops=3000,wiops=3000``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.model_path is not None:
            object.__setattr__(self, "model_path", Path(self.model_path))
        else:
            model_lib.get_preset(self.preset)
        if self.repeats < 1:
            raise UsageError(f"repeats must be at least 1, got {self.repeats}")
        if self.seed < 0:
            raise UsageError(f"seed must be 0 or more, got {self.seed}")
        if self.order not in ORDERS:
            raise UsageError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        disk.refuse_file_in_the_way(self.out)
        check_settings(self.store, self.s3_endpoint, self.s3_rtt_ms, self.ranks)
        if self.load_into not in LOAD_INTO:
            raise UsageError(f"load_into must be one of {', '.join(LOAD_INTO)}, got {self.load_into!r}")
        if self.ranks is not None and self.ranks < 1:
            raise UsageError(f"ranks must be at least 1, got {self.ranks}")
        if self.load_ranks is not None and (self.ranks is None or self.load_ranks < 1):
            raise UsageError(f"load_ranks needs ranks and must be at least 1, got {self.load_ranks}")
        most = RANKS_PER_CORE * cores()
        for label, count in (("ranks", self.ranks), ("load_ranks", self.load_ranks)):
            if count is not None and count > most and not under_torchrun():
                raise UsageError(f"{label} must be 1 to {most} ({RANKS_PER_CORE} per core of {cores()}), got {count}")
        if self.rank_timeout_s <= 0:
            raise UsageError(f"rank_timeout_s must be positive, got {self.rank_timeout_s}")
        if self.ranks is not None and self.fresh_process:
            raise UsageError("--ranks measures in processes of their own: not with --process fresh")
        if self.ranks is not None and self.load_into != "fresh":
            raise UsageError("--load-into existing is one process's live model; with --ranks every rank loads fresh")
        if not self.profile.caps.empty and not is_local(self.store):
            raise UsageError(
                f"--disk-profile and --disk-limit throttle the disk under --out; not an {scheme(self.store)}:// --store"
            )
        if self.payload not in training.PAYLOADS:
            raise UsageError(f"payload must be one of {', '.join(training.PAYLOADS)}, got {self.payload!r}")
        if self.payload == "training" and (self.model_path is not None or self.ranks is not None):
            raise UsageError("--payload training trains a preset in one process: not with --model-path or --ranks")

    @property
    def profile(self) -> profiles.Profile:
        """The disk profile the run emulates (``none``: the raw disk)."""
        return profiles.resolve(self.disk_profile, self.disk_limit)

    @property
    def label(self) -> str:
        """The model as results name it: the preset, or ``local:DIR`` for real weights."""
        return self.preset if self.model_path is None else f"local:{self.model_path.name}"
