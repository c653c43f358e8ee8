"""Out-of-core pruning: a model whose weights do not fit in memory, pruned one decoder block at a time.

The model directory (a Hugging Face directory: ``config.json`` + one or more ``*.safetensors`` shards)
is never loaded whole. The driver builds the model on the ``meta`` device (no memory), materializes
only the embedding (to make the first block's inputs) and the rotary tables, and then, for each
decoder block in turn:

1. reads the block's tensors from the shards (positioned reads of just those bytes: a memory map's
   touched pages would count in the process's RSS until it is unmapped) and converts them to float32;
2. prunes it in the "true sequential" order of the in-memory driver (``pruner.prune_model``): one
   pass over the calibration micro-batches collects the statistics of the first group of not yet pruned
   Linears that share an input (q/k/v, then o, then gate/up, then down for a Llama block), stopping the
   block's forward at the next group's input; the group is pruned; the next pass sees the pruned
   weights. Statistics (sums of squares; Gram matrices X^T X for SparseGPT/DSnoT) add up over
   micro-batches, so memory holds one micro-batch of activations, never all of them;
3. runs the pruned block over each micro-batch, writing the outputs (the next block's inputs) into a
   double-buffered activation directory on disk;
4. encodes the block's tensors with the sparse checkpoint's encodings (``runtime/checkpoint.py``) into
   its own shard file, and then, atomically, records the block as done in ``state.json``.

Peak memory is one float32 block + one micro-batch of activations + the embedding, whatever the depth.
Everything lives in a work directory beside the output (``<out>.partial``); a run that was killed
resumes from the last finished block (``resume=True``) and gives the same checkpoint as an
uninterrupted run, because every input of block k+1 (activations and the pruned block k's shard) is on
disk when block k is recorded as done. At the end the shards are streamed (in 8 MiB pieces through one buffer) into one
``model.safetensors`` of the usual sparse checkpoint format, with ``sparseland.json`` and the tokenizer,
in a temporary directory that is renamed into place.

The statistics can also be computed by several workers (``workers=[...]``, e.g. Ray actors from
``sparseland.distributed``): each holds its share of the calibration windows and returns per-Linear
sums; the driver adds them, prunes, and sends the pruned weights back.

Not supported out of core (a clear error): OWL allocation (it needs a dense pass over every block
first).

Modules: ``shards`` (safetensors read and written tensor by tensor), ``blocks`` (the meta skeleton,
one block at a time, the statistics workers), ``state`` (the work directory, its resumable state and
the report), ``driver`` (``prune_offload``: the pruning loop).
"""

from sparseland.weights.offload.blocks import BlockWorker, build_shell, load_config, materialize, release, sum_stats
from sparseland.weights.offload.driver import model_dir_of, prune_offload
from sparseland.weights.offload.shards import (
    ShardReader,
    assemble_safetensors,
    iter_checkpoint_blocks,
    read_safetensors_header,
)
from sparseland.weights.offload.state import STATE_FILE, STATE_VERSION, OffloadReport, peak_rss_mb, work_dir_for

__all__ = [
    "STATE_FILE",
    "STATE_VERSION",
    "BlockWorker",
    "OffloadReport",
    "ShardReader",
    "assemble_safetensors",
    "build_shell",
    "iter_checkpoint_blocks",
    "load_config",
    "materialize",
    "model_dir_of",
    "peak_rss_mb",
    "prune_offload",
    "read_safetensors_header",
    "release",
    "sum_stats",
    "work_dir_for",
]
