"""One invocation of retrieval.py, from the flags to its results: the Run it decides once (run.py), its
files and their guards (files.py), the parts built from the flags (parts.py), the training session
(training.py) and a saved checkpoint's tasks (checkpoint_tasks.py)."""
