"""Beam graphs, options and the command line for ckptbeam."""
