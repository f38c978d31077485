"""ckptbench: how fast, how large and how exact LLM checkpoints are, eight ways and more."""

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
    "InsufficientDiskSpaceError",
    "ModelCheckpoint",
    "ModelSourceError",
    "ResultsStore",
    "Strategy",
    "TensorStore",
    "TensorStoreOptions",
    "TorchSave",
    "UnknownChoiceError",
    "VerificationError",
    "build",
    "get_strategy",
    "load_local",
    "summarize",
]
