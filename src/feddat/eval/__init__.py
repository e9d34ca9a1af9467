"""What one run measures and records: its history and scores (`results`) and experiment trackers (`tracking`).

Below the engines, which record into it; experiments over many runs are in `feddat.experiments`.
"""
