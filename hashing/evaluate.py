"""`python -m hashing.evaluate`: the standalone evaluator (hashing/evaluation/cli.py)."""
from hashing.evaluation.cli import cli

if __name__ == "__main__":
    cli()
