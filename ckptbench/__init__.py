"""ckptbench: how fast, how large and how exact LLM checkpoints are, eight ways and more."""

from . import disk, limits, model, plot, report, strategies, sweep, targets, verdict
from .benchmark import Benchmark
from .errors import (
    CheckpointError,
    CkptbenchError,
    CompositionError,
    InsufficientDiskSpaceError,
    ModelSourceError,
    UnknownChoiceError,
    VerificationError,
)
from .model import PRESETS, ModelCheckpoint, build, load_local
from .results import ResultsStore, summarize
from .strategies import (
    BASELINE,
    EIGHT_WAY,
    STRATEGIES,
    DistributedCheckpoint,
    SafeTensors,
    Strategy,
    TensorStore,
    TensorStoreOptions,
    TorchSave,
    get_strategy,
)

__all__ = [
    "BASELINE",
    "EIGHT_WAY",
    "PRESETS",
    "STRATEGIES",
    "Benchmark",
    "CheckpointError",
    "CkptbenchError",
    "CompositionError",
    "DistributedCheckpoint",
    "InsufficientDiskSpaceError",
    "ModelCheckpoint",
    "ModelSourceError",
    "ResultsStore",
    "SafeTensors",
    "Strategy",
    "TensorStore",
    "TensorStoreOptions",
    "TorchSave",
    "UnknownChoiceError",
    "VerificationError",
    "build",
    "disk",
    "get_strategy",
    "limits",
    "load_local",
    "model",
    "plot",
    "report",
    "strategies",
    "summarize",
    "sweep",
    "targets",
    "verdict",
]
