"""Datasets: sources, decoding, webdataset shards and the per-rank streams training reads."""
