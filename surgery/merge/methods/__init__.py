"""One module per merge method (or family sharing its math): the tensor functions and the
``METHODS`` declarations that surgery/merge/registry.py lists. See docs/merge-methods.md."""
