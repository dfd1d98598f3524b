"""Hadamard matrices for CSQ's hash centres.

CSQ takes its centres from the rows of a Hadamard matrix of order n (the code length), which scipy
builds only for powers of two (Sylvester). The usual code lengths 12, 24, 36 and 48 are not powers of
two, but Hadamard matrices of those orders exist: Paley's first construction gives order q + 1 for a
prime q = 3 (mod 4) (12 = 11 + 1, 24 = 23 + 1, 48 = 47 + 1), his second order 2(q + 1) for a prime
q = 1 (mod 4) (36 = 2 * (17 + 1), 28 = 2 * (13 + 1)), and Sylvester doubling extends any order m to 2m.
"""
import numpy as np


def _is_prime(number):
    if number < 2:
        return False
    return all(number % divisor for divisor in range(2, int(number ** 0.5) + 1))


def _sylvester_double(matrix):
    return np.block([[matrix, matrix], [matrix, -matrix]])


def _paley(q):
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    character = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.int64)
    offsets = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    jacobsthal = character[offsets]  # antisymmetric because -1 is a non-residue when q = 3 (mod 4)
    skew = np.zeros((q + 1, q + 1), dtype=np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return np.eye(q + 1, dtype=np.int64) + skew


def _paley_second(q):
    """Paley construction II: a Hadamard matrix of order 2(q + 1) for a prime q = 1 (mod 4).

    The (q + 1) conference matrix S = [[0, 1], [1, Q]] (Q: the Jacobsthal matrix, symmetric when
    q = 1 (mod 4)) gives H = S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
    """
    conference = _paley(q) - np.eye(q + 1, dtype=np.int64)  # [[0, 1], [-1, Q]] with Q symmetric here
    conference[1:, 0] = 1
    return (np.kron(conference, np.array([[1, 1], [1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


def _base_matrix(order):
    """A Hadamard matrix of `order` from Paley I or II or the 1 x 1 matrix, or None."""
    if order == 1:
        return np.ones((1, 1), dtype=np.int64)
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return _paley(order - 1)
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return _paley_second(order // 2 - 1)
    return None


def hadamard_matrix(order):
    """A +-1 matrix H of the given order with H @ H.T = order * I, or None if no construction here reaches it.

    Powers of two use Sylvester's construction (the same matrix as scipy.linalg.hadamard, so CSQ's
    centres for 16, 32, 64 bits are the paper code's); other orders use Paley I or II, doubled as needed.
    """
    if order < 1:
        return None
    doublings = 0
    while True:
        matrix = None if order & (order - 1) == 0 and order > 1 else _base_matrix(order)
        if matrix is not None or order % 2:
            break
        order //= 2
        doublings += 1
    if matrix is None:
        return None
    for _ in range(doublings):
        matrix = _sylvester_double(matrix)
    return matrix
