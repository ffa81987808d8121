"""Data pipeline for training: tokenizers, synthetic data, formatting, trimming, packing, sources.

Importing this package does not import grain; the grain pipeline is loaded
on first use of ``make_dataset`` / ``pipeline_counters`` / ``trim_counters`` /
``packing_efficiency`` (or by importing ``train.data.pipeline`` directly).
"""

from train.data.formatting import (
    TokenizedSample,
    Turn,
    TurnSpans,
    format_record,
    is_empty_record,
    record_kind,
    tokenize_record,
)
from train.data.packing import (
    PACKINGS,
    best_fit_decreasing,
    build_row,
    first_fit_decreasing,
    next_token_targets,
    pack_examples,
)
from train.data.sources import (
    ArrayRecordSource,
    JsonlSource,
    NumpyTokenSource,
    SyntheticSource,
    open_source,
)
from train.data.synthetic import answer_accuracy, generate_problems, problem_at
from zaya_jax.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from train.data.trimming import TrimCounters, trim_sample

_LAZY_PIPELINE = ("make_dataset", "packing_efficiency", "pipeline_counters", "trim_counters", "PackIterDataset")


def __getattr__(name: str):
    # Keeps `import train.data` free of grain for code that only tokenises.
    if name in _LAZY_PIPELINE:
        from train.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")


__all__ = [
    "ArrayRecordSource",
    "ByteTokenizer",
    "HFTokenizer",
    "JsonlSource",
    "NumpyTokenSource",
    "PACKINGS",
    "PackIterDataset",
    "SyntheticSource",
    "TokenizedSample",
    "Tokenizer",
    "TrimCounters",
    "Turn",
    "TurnSpans",
    "answer_accuracy",
    "best_fit_decreasing",
    "build_row",
    "first_fit_decreasing",
    "format_record",
    "generate_problems",
    "is_empty_record",
    "load_tokenizer",
    "make_dataset",
    "next_token_targets",
    "pack_examples",
    "packing_efficiency",
    "pipeline_counters",
    "problem_at",
    "record_kind",
    "tokenize_record",
    "trim_counters",
    "trim_sample",
]
