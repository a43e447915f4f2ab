"""protfold: a memory-lean trainer for AlphaFold2-style protein structure models."""

__version__ = "0.1.0"
