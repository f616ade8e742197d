"""Built-in GSA strategies, registered through the ``gsa.plugins`` entry point like any plugin."""
