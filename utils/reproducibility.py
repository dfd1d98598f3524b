"""Seeding: the same --seed gives the same data, initialisation, batches and result."""
import random

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id):
    """DataLoader worker_init_fn: derive numpy/random seeds from the worker's torch seed."""
    del worker_id
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def loader_generator(seed):
    """A torch.Generator for a DataLoader's shuffling, independent of the global RNG's use elsewhere."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
