"""The retrieval side of the paper: binary codes in one packed layout (codes.py), the threshold zeta
from the code table (codetable.py), mAP@K and the other metrics (metrics.py), the Hamming index with ids
(index.py; multi-index hashing in mih.py) and one-call exact search (search.py), streamed encoding of large
image collections (stream.py), the codes cache (cache.py), CSQ's Hadamard matrices (hadamard.py) and the
figures (plots.py)."""
