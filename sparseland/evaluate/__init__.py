"""Evaluation: perplexity, agreement with a reference model (KL, top-1), the offline task suite, and
long-context accuracy (RULER-style suite)."""

from sparseland.evaluate.agreement import AgreementResult, agreement, compare
from sparseland.evaluate.longctx import LongCtxResult, evaluate_longctx
from sparseland.evaluate.perplexity import PerplexityResult, perplexity
from sparseland.evaluate.tasks import PairedComparison, TaskResult, evaluate_tasks, paired, task_suite

__all__ = [
    "AgreementResult",
    "LongCtxResult",
    "PairedComparison",
    "PerplexityResult",
    "TaskResult",
    "agreement",
    "compare",
    "evaluate_longctx",
    "evaluate_tasks",
    "paired",
    "perplexity",
    "task_suite",
]
