"""FedDAT with one piece removed (the ablations of Chen et al., AAAI 2024).

Each is `FedDAT` with a class attribute changed; the local step, the server and what travels (the global
adapter) are FedDAT's.
- feddat-nomkd: no distillation; in both sub-steps each adapter learns the task alone.
- feddat-kd-student / feddat-kd-teacher: Mutual Knowledge Distillation split into its two directions, one kept:
  the DAT teaches the global adapter (the local adapter learns the task alone), or the student teaches the
  DAT (the global adapter learns the task alone). Probes of where MKD's cost lies, not among the paper's
  ablations: `--methods all` leaves them out.
- feddat-single-teacher: the teacher is the frozen global copy alone, no local adapter. The frozen copy
  does not learn, so the distillation only runs one way; the second sub-step trains the head alone.
- feddat-nofrozen: the teacher is the local adapter alone, no frozen copy; mutual distillation between the
  global and the local adapter.
"""

from __future__ import annotations

from feddat.algorithms.feddat import FedDAT


class FedDATNoMKD(FedDAT):
    name = "feddat-nomkd"
    summary = "FedDAT without mutual distillation: global and local adapter each trained on the task alone"
    kd_into = ()


class FedDATKDStudent(FedDAT):
    name = "feddat-kd-student"
    summary = ("FedDAT with one-way distillation: the DAT teaches the global adapter; the local adapter learns "
               "the task alone")
    kd_into = ("student",)
    in_all = False


class FedDATKDTeacher(FedDAT):
    name = "feddat-kd-teacher"
    summary = ("FedDAT with one-way distillation: the student teaches the DAT (its local adapter); the global "
               "adapter learns the task alone")
    kd_into = ("teacher",)
    in_all = False


class FedDATSingleTeacher(FedDAT):
    name = "feddat-single-teacher"
    summary = ("FedDAT with the frozen global copy alone as teacher (no local adapter): the global adapter "
               "learns the task and the frozen copy's predictions")
    adapters = ("global", "global_frozen")
    trained = ("global",)
    teacher_view = "frozen"
    views = {"frozen": (("global_frozen", 1.0),)}   # the single-adapter teacher
    predict_view = "student"
    report_views = ("frozen",)


class FedDATNoFrozen(FedDAT):
    name = "feddat-nofrozen"
    summary = ("FedDAT without the frozen copy: the local adapter alone is the teacher; global and local "
               "adapter distil into each other")
    adapters = ("global", "local")
    teacher_view = "local"
    predict_view = "local"
    report_views = ("student",)
