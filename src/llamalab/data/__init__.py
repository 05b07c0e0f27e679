"""Data pipeline: readers, cleaners, deduplication, tokenized shards and the mixture loader."""
