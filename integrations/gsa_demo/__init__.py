"""The embedded end-to-end demo: a tiny character-level GSA language model trained on the Python
standard library's docstrings, decoded with a constant-size recurrent state. No download."""
