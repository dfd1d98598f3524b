"""`python -m hashing.export`: a checkpoint's codes into Milvus or a FAISS file, and --verify (hashing/search/export.py)."""
from hashing.search.export import cli

if __name__ == "__main__":
    cli()
