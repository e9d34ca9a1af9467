"""Experiments made of runs: `feddat compare` (methods x seeds), `feddat tune` (a grid), and their tables.

They sit above the engines (they start runs); `feddat.eval` below them holds what one run measures and records.
"""
