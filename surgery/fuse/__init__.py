"""Adapter formats and their fusion into base weights (``surgery fuse``).

One module per kind (``lora``, ``loha``, ``lokr``, ``ia3``, ``vera``, ``hira``, ``hut``,
``tera``, ``curriculum``), the table of kinds in ``registry``, and the streaming fusion in
``fuse``. See docs/fuse.md.
"""

from .run import AdapterSpec, fuse, parse_adapter_spec

__all__ = ["AdapterSpec", "fuse", "parse_adapter_spec"]
