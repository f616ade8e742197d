"""Long-context evaluation: ``gsa eval passkey`` (recall of a hidden number) and ``gsa eval ppl`` (loss against
context length), each writing JSON and a plot through the benchmark scaffold (docs/recall-and-evals.md)."""
