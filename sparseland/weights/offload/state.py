"""The resumable state of an out-of-core run: its work directory ``<out>.partial``, the ``state.json``
recording the finished blocks (written atomically after each), the fingerprint of the settings a
resume must match, and the run's report."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic
from sparseland.weights.config import PruningConfig

STATE_FILE = "state.json"
STATE_VERSION = 1


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``); False where there is none.

    glibc serves allocations below its mmap threshold (which rises to 32 MB as large blocks are freed)
    from the heap and keeps what is freed there: after each block of a small model the freed float32
    weights and activations were left fragmented, and the peak RSS of the embedded model's run grew
    from 649 MiB (block 4) to 821 MiB (block 28) instead of staying at one block's worth."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class OffloadReport:
    method: str
    pattern: str
    target_sparsity: float
    allocation: str
    block_sparsity: list[float]
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    overall_sparsity: float = 0.0
    seconds: float = 0.0
    calibration_windows: int = 0
    block_seconds: list[float] = field(default_factory=list)  # this run's wall time of each block it did
    resumed_from: int = 0
    peak_rss_mb: float = 0.0
    checkpoint_bytes: int = 0
    workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / (out_dir.name + ".partial")


def fingerprint(model_dir: Path, config: PruningConfig, calibration, micro: int, n_workers: int) -> str:
    """A hash of everything a resumed run must share with the run that left the work directory."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(model_dir.resolve()).encode())
    h.update(f"{micro}/{n_workers}".encode())
    if calibration is not None:
        h.update(calibration.numpy().tobytes())
    for file in sorted(model_dir.glob("*.safetensors")):
        st = file.stat()
        h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _fresh_state(fp: str) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "fingerprint": fp,
        "done": -1,  # -1: nothing; 0: the head tensors and the first block's inputs are written
        "records": {},
        "aliases": {},
        "layer_sparsity": {},
        "zeros": 0,
        "total": 0,
        "n_batches": [],
    }


def open_state(work: Path, resume: bool, fp: str) -> dict[str, Any]:
    """The state of the run in ``work``: the recorded one when resuming (its fingerprint must be
    ``fp``), else a fresh one. Refuses to overwrite an interrupted run's directory without ``resume``."""
    state_path = work / STATE_FILE
    if work.exists() and not resume:
        raise SparselandError(
            f"{work} exists: a previous run of this output was interrupted; pass --resume (resume=True) to "
            "continue it, or delete that directory to start over"
        )
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != fp:
            raise SparselandError(
                f"{work} was left by a run with other settings (model, method, calibration, --calib-batch or "
                "workers differ); rerun with the same settings, or delete it to start over"
            )
    else:
        if work.exists():  # resume asked, but the run died before its first record: start over
            shutil.rmtree(work)
        state = _fresh_state(fp)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    return state


def commit_state(work: Path, state: dict[str, Any]) -> None:
    """Record ``state`` atomically: a killed run resumes from the last committed block."""
    write_text_atomic(work / STATE_FILE, json.dumps(state))
