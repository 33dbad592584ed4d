"""Analyses: expensive computations shared by passes (cached on the compile context)."""
