"""FedDAT: federated dual-adapter-teacher finetuning of vision-language transformers."""

__version__ = "0.1.0"

_LAZY = {"load_client": "feddat.inference", "ClientModel": "feddat.inference", "FedDATError": "feddat.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """`feddat.load_client` and friends, imported on first use so that `import feddat` stays light."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'feddat' has no attribute {name!r}")
