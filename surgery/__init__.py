"""surgery: weight-space surgery on safetensors checkpoints.

The library never prints, never exits and never imports typer or rich; the command
layer (``surgery.commands``) does that.
"""

__version__ = "0.1.0"
