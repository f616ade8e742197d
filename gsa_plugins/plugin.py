"""The built-in plugin: registers every strategy shipped with the library."""

from __future__ import annotations

from gsa_core.hookspecs import hookimpl
from gsa_core.registry import Registry


@hookimpl
def gsa_register(registry: Registry) -> None:
    from gsa_plugins import birth, death, initializers, schedulers
    from gsa_plugins.backends import auto, dense, kernel, sparse

    registry.register("initializer", "random", initializers.RandomInit)
    registry.register("initializer", "kmeans", initializers.KMeansInit)
    registry.register("initializer", "pca", initializers.PCAInit)
    registry.register("scheduler", "interval", schedulers.IntervalScheduler)
    registry.register("scheduler", "decaying", schedulers.DecayingScheduler)
    registry.register("scheduler", "shift", schedulers.ShiftScheduler)
    registry.register("death", "low-mass", death.LowMassDeath)
    registry.register("death", "redundant", death.RedundantDeath)
    registry.register("death", "amplitude-floor", death.AmplitudeFloorDeath)
    registry.register("death", "any", death.AnyDeath)
    registry.register("birth", "clone", birth.CloneBirth)
    registry.register("birth", "split", birth.SplitBirth)
    registry.register("birth", "coverage", birth.CoverageBirth)
    registry.register("birth", "relocate", birth.RelocateBirth)
    registry.register("backend", "dense", dense.DenseBackend, dense.DenseParams)
    registry.register("backend", "kernel", kernel.KernelBackend, kernel.KernelParams)
    registry.register("backend", "sparse", sparse.SparseBackend, sparse.SparseParams)
    registry.register("backend", "auto", auto.AutoBackend, auto.AutoParams)
    from gsa_plugins.adapters import bert, encoder_decoder, gpt_neo, llama

    registry.register("adapter", "gpt-neo", gpt_neo.GPTNeoAdapter, gpt_neo.GPTNeoAdapter.params_model)
    registry.register("adapter", "bert", bert.BertAdapter, bert.BertAdapter.params_model)
    registry.register("adapter", "llama", llama.LlamaAdapter, llama.LlamaAdapter.params_model)
    registry.register("adapter", "encoder-decoder", encoder_decoder.EncoderDecoderAdapter,
                      encoder_decoder.EncoderDecoderParams)
    from gsa_plugins import positions

    registry.register("positions", "interpolate", positions.Interpolate)
    registry.register("positions", "tile", positions.Tile)
    registry.register("positions", "none", positions.NoExtension)
    from gsa_plugins import recall

    registry.register("recall", "self-recall", recall.SelfRecall)
    registry.register("recall", "recent", recall.Recent)
