"""``gsa train``: GPT-Neo (softmax or GSA) trained from scratch on a local text corpus.

- :mod:`gsa_train.tokenizer`: byte-level BPE trained with ``tokenizers`` (:func:`train_tokenizer`);
- :mod:`gsa_train.distributed`: data parallelism from ``torchrun``'s environment (:class:`DataParallel`);
- :mod:`gsa_train.layouts`: named GPT-Neo shapes; :mod:`gsa_train.data`: corpus to packed blocks;
- :mod:`gsa_train.loop`: the training loop (:func:`train`); :mod:`gsa_train.reference`: the cached
  default chat model.

Submodules are imported on use so ``import gsa_train`` stays light.
"""
