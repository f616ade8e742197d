"""``gsa chat``: terminal chat with streamed replies, sampling settings, prompt templates and SQLite sessions.

- :mod:`gsa_chat.store`: the session database (WAL, ``user_version`` migrations, messages committed at once);
- :mod:`gsa_chat.templates`: named prompt templates (``tinystories-instruct``, ``plain``, ``chat-template``, ``auto``);
- :mod:`gsa_chat.sampling`: validated sampling settings, streamed generation through ``transformers``;
- :mod:`gsa_chat.session`: one conversation and the order in which it is written;
- :mod:`gsa_chat.repl`: the interactive loop and its ``/commands``; :mod:`gsa_chat.models`: which model;
- :mod:`gsa_chat.demo`: the scripted demo on the embedded default model.

Submodules are imported on use so ``import gsa_chat`` stays light.
"""
