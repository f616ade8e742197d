"""Collect a Hugging Face model's query/key vectors on real text, then calibrate splat banks.

Generic over model families: a model is described by a list of :class:`AttentionLayer` (its query
and key modules, head count, head dim and score scaling); :func:`bert_attention_layers` builds that
list for BERT-family models. :func:`collect_qk` runs token batches through the model with forward
hooks and returns ``{layer name: (q [H, N, d], k [H, N, d])}`` over the real (non-padding) tokens,
already in GSA space (``gsa_core.calibration.to_gsa_space``), ready for
``gsa_core.calibration.calibrate_banks``.
"""

from gsa_calibrate.collect import (
    AttentionLayer,
    bert_attention_layers,
    collect_qk,
    make_banks,
    token_batches,
)

__all__ = ["AttentionLayer", "bert_attention_layers", "collect_qk", "make_banks", "token_batches"]
