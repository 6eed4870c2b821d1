"""Infrastructure every operation runs on: the error classes, progress reporting, the
streaming engine (the only writer of checkpoints) and the result shape operations return.
Operations live beside this package, one per command (``surgery.merge``, ``surgery.fuse``...)."""
