"""Beam graphs, options and the command line for ckptbeam."""

__version__ = "0.1.0"
