"""Triggers of the provider's deferrable operators (run in the triggerer; no torch, no blocking I/O)."""
