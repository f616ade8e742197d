"""Distil a Hugging Face model into Gaussian Splat Attention: calibrate, fit splats layer by layer against the
frozen original, optionally fine-tune on the task loss (LoRA or full). ``gsa distill`` is the command line.

    from gsa_distill import distill
    run = distill({"source": "minilm", "output": "minilm-gsa", "stage1_steps": 200, "stage2": "lora"})
    run.report["embedding"]["stage2"]["cosine_mean"]
"""

from gsa_distill.engine import Distiller, distill, load_source, training_texts
from gsa_distill.evaluate import embedding_agreement, mean_pool, sentence_embeddings
from gsa_distill.regularisers import REGULARISERS, check_regularisers
from gsa_distill.settings import DistillSettings, read_settings_file

__all__ = [
    "REGULARISERS", "DistillSettings", "Distiller", "check_regularisers", "distill",
    "embedding_agreement", "load_source", "mean_pool", "read_settings_file", "sentence_embeddings", "training_texts",
]
