"""The Typer command layer, installed as ``surgery.commands``.

Only typer, click and the standard library are imported at module level, so
``surgery --help`` stays fast; torch, transformers and ``surgery.*`` are imported inside
the command functions.
"""
