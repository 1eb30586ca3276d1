"""Analyses of trained adapters (the pilot study)."""
