"""The package version (a leaf module: saving and interop read it without importing the package)."""

__version__ = "0.1.0"
