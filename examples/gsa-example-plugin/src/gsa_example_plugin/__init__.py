"""Example third-party GSA plugin."""
