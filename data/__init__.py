"""Data: shard writing, streaming readers, bundled real datasets and 2-D toy distributions."""
