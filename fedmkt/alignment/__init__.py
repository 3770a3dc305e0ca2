"""Token alignment between heterogeneous tokenizers (FedMKT step 4/9).

* :mod:`~fedmkt.alignment.tokens` - one spelling for ``Ġ``/``▁``/byte-fallback tokens;
* :mod:`~fedmkt.alignment.mined` - nearest token by Levenshtein distance, exact and fast;
* :mod:`~fedmkt.alignment.vocab_map` - MinED vocabulary map, cached on disk, JSON export;
* :mod:`~fedmkt.alignment.sequence` - matching two tokenisations of the same text, by end offsets or DTW;
* :mod:`~fedmkt.alignment.reindex` - top-k logits re-indexed into the receiver's vocabulary;
* :class:`TokenAligner` - the three put together per public sample;
* :mod:`~fedmkt.alignment.report` - one text's alignment, position by position (`fedmkt align-text`).
"""

from fedmkt.alignment.aligner import TokenAligner
from fedmkt.alignment.reindex import align_topk
from fedmkt.alignment.sequence import dtw_path, end_offsets, offset_matches, one_to_one_matches
from fedmkt.alignment.tokens import normalize_token, vocab_strings
from fedmkt.alignment.vocab_map import (
    build_vocab_map,
    load_or_build_vocab_map,
    tokenizer_fingerprint,
    write_vocab_map_json,
)

__all__ = [
    "TokenAligner",
    "align_topk",
    "build_vocab_map",
    "dtw_path",
    "end_offsets",
    "load_or_build_vocab_map",
    "normalize_token",
    "offset_matches",
    "one_to_one_matches",
    "tokenizer_fingerprint",
    "vocab_strings",
    "write_vocab_map_json",
]
