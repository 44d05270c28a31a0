"""Integrations with evaluation frameworks (each needs its own extra, e.g. ``vistrim[lmms-eval]``)."""
