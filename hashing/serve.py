"""`python -m hashing.serve`: the search page and API of a checkpoint (hashing/search/server.py)."""
from hashing.search.server import cli

if __name__ == "__main__":
    cli()
