"""alignloop: text-to-image serving that learns from its users."""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict):
    """A module `__getattr__` (PEP 562) that imports `package.<exports[name]>` on first use of `name`, so that
    importing the package stays light (the CLI imports packages only to register their commands)."""
    import importlib
    import sys

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
