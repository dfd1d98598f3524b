"""The retrieval side of the paper, in three rooms.

The codes, here: one packed layout (codes.py), the threshold zeta from the code table (codetable.py), CSQ's
Hadamard matrices (hadamard.py) and the codes cache of a checkpoint (cache.py).
Scoring them, in evaluation/: mAP@K and the other metrics (metrics.py), the ranking conventions
(conventions.py), the fused numba kernel (fused.py), the figures (plots.py) and the standalone evaluator
(cli.py, run as `python -m hashing.evaluate`).
Searching them, in search/: the Hamming index with ids (index.py; multi-index hashing in mih.py), one-call exact
search and the FAISS file (exact.py), streamed encoding of large image collections (stream.py), the Python API
(api.py) and the search page (server.py and page.py, run as `python -m hashing.serve`).
"""
