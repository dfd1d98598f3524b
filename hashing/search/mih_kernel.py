"""The numba code of hashing/search/mih.py (its docstring describes the method); imported only when a multi-index
hashing index is built or searched."""
import numpy as np

# The project's numba helpers (cached compilation, the CPU's popcount) live with the first kernel.
from hashing.evaluation.fused_kernel import _compiled as compiled
from hashing.evaluation.fused_kernel import _popcount as popcount


@compiled
def fill_table(keys, offsets, positions):
    """A counting sort: positions[offsets[v]:offsets[v + 1]] = the rows whose key is v, in row order."""
    cursor = offsets[:-1].copy()
    for row in range(len(keys)):
        key = keys[row]
        positions[cursor[key]] = row
        cursor[key] += 1


@compiled
def _distance(query, codes, slot):
    distance = 0
    for word in range(codes.shape[1]):
        distance += popcount(query[word] ^ codes[slot, word])
    return distance


@compiled
def _found_before(query, codes, slot, masks, substring, radius):
    """Whether the row in `slot` of table `substring`, met at radius `radius`, was met before: in an earlier
    substring at this radius, or in a later one at the radius below (the visiting order of _search_one)."""
    for other in range(masks.shape[0]):
        if other == substring:
            continue
        distance = 0
        for word in range(codes.shape[1]):
            distance += popcount((query[word] ^ codes[slot, word]) & masks[other, word])
        if distance < radius or (other < substring and distance == radius):
            return True
    return False


@compiled
def _kept(found_distances, found_rows, found, distance, row, bound):
    """The found arrays with (distance, row) appended: rows beyond `bound` compacted away, or the arrays grown,
    when they are full."""
    if found == len(found_rows):
        found = _compact(found_distances, found_rows, found, bound)
        if found == len(found_rows):
            found_distances = _grown(found_distances)
            found_rows = _grown(found_rows)
    found_distances[found] = distance
    found_rows[found] = row
    return found_distances, found_rows, found + 1


@compiled
def _tightened(bound, within_bound, counts, k):
    """(bound, rows within it): the bound lowered while k rows stay within it."""
    while bound > 0 and within_bound - counts[bound] >= k:
        within_bound -= counts[bound]
        bound -= 1
    return bound, within_bound


@compiled
def _search_one(query, keys, tables, k, max_distance):
    """The rows within `max_distance` of one query, at most k of them: (distances, rows), ordered by distance and
    then row. Rows are visited bucket by bucket, substring 0..m-1 at radius 0, then each at radius 1, ...;
    after substring j at radius s every row within m * s + j has been met (pigeonhole), which ends the search
    once k rows within that distance are known, or once it reaches max_distance. A bucket's codes are read
    from the table's own copy of the codes in bucket order: one sequential read instead of a cache miss per
    row, which made the search 2-4x faster on uniformly random codes."""
    masks, bits, offsets, offset_starts, positions, table_codes = tables
    num_substrings = len(bits)
    hash_bit = int(bits.sum())
    counts = np.zeros(hash_bit + 1, np.int64)
    found_distances = np.empty(64, np.int64)
    found_rows = np.empty(64, np.int64)
    found = 0
    bound = max_distance  # no row beyond it can be among the result
    within_bound = 0  # rows found at distance <= bound
    done = False
    radius = 0
    while not done:
        for substring in range(num_substrings):
            width = bits[substring]
            if radius <= width:
                start = offset_starts[substring]
                codes = table_codes[substring]
                flips = (np.int64(1) << radius) - 1
                while flips < (np.int64(1) << width):
                    bucket = start + (keys[substring] ^ flips)
                    for slot in range(offsets[bucket], offsets[bucket + 1]):
                        distance = _distance(query, codes, slot)
                        if distance > bound or _found_before(query, codes, slot, masks, substring, radius):
                            continue
                        found_distances, found_rows, found = _kept(found_distances, found_rows, found, distance,
                                                                   positions[substring, slot], bound)
                        counts[distance] += 1
                        bound, within_bound = _tightened(bound, within_bound + 1, counts, k)
                    if radius == 0:
                        break
                    lowest = flips & -flips  # the next mask with as many set bits (Gosper)
                    ripple = flips + lowest
                    flips = (((ripple ^ flips) >> 2) // lowest) | ripple
            reached = num_substrings * radius + substring
            if reached >= max_distance or (bound <= reached and within_bound >= k):
                done = True
                break
        radius += 1
        if radius > hash_bit:
            done = True
    return _ranked(found_distances[:found], found_rows[:found], bound, k, counts)


@compiled
def _compact(distances, rows, count, bound):
    """Drop the found rows beyond the current bound; returns how many are kept (at the front)."""
    kept = 0
    for i in range(count):
        if distances[i] <= bound:
            distances[kept] = distances[i]
            rows[kept] = rows[i]
            kept += 1
    return kept


@compiled
def _grown(array):
    bigger = np.empty(2 * len(array), array.dtype)
    bigger[:len(array)] = array
    return bigger


@compiled
def _ranked(distances, rows, bound, k, counts):
    """The first k of (distance, row) pairs at distance <= bound, in (distance, row) order: every pair below the
    bound, and of the pairs at the bound those of the lowest rows."""
    below = 0
    for distance in range(bound):
        below += counts[distance]
    keep_at_bound = min(k - below, counts[bound]) if k > below else 0
    at_bound = np.empty(counts[bound], np.int64)
    kept_distances = np.empty(below + keep_at_bound, np.int64)
    kept_rows = np.empty(below + keep_at_bound, np.int64)
    taken = 0
    tied = 0
    for i in range(len(distances)):
        if distances[i] < bound:
            kept_distances[taken] = distances[i]
            kept_rows[taken] = rows[i]
            taken += 1
        elif distances[i] == bound:
            at_bound[tied] = rows[i]
            tied += 1
    at_bound = np.sort(at_bound[:tied])
    for i in range(keep_at_bound):
        kept_distances[taken] = bound
        kept_rows[taken] = at_bound[i]
        taken += 1
    by_row = np.argsort(kept_rows)  # rows are ids (any int64): sort by row, then stably by distance
    kept_distances, kept_rows = kept_distances[by_row], kept_rows[by_row]
    order = np.argsort(kept_distances, kind="mergesort")
    return kept_distances[order], kept_rows[order]


@compiled
def search_chunk(queries, keys, tables, k, max_distance):
    """_search_one for each query: (distances, rows, counts), the results of all queries one after the other,
    counts[q] rows for query q. tables: (masks (m, W) uint64 of each substring's bits, widths (m,), offsets of
    the buckets of all tables, where each table's offsets start, positions (m, N) = the row in each slot of
    each table, codes (m, N, W) uint64 = the code in each slot)."""
    counts = np.empty(len(queries), np.int64)
    distances = np.empty(max(1, min(k, 1024) * len(queries)), np.int64)
    rows = np.empty_like(distances)
    total = 0
    for q in range(len(queries)):
        found_distances, found_rows = _search_one(queries[q], keys[q], tables, k, max_distance)
        count = len(found_rows)
        while total + count > len(rows):
            distances = _grown(distances)
            rows = _grown(rows)
        distances[total:total + count] = found_distances
        rows[total:total + count] = found_rows
        counts[q] = count
        total += count
    return distances[:total], rows[:total], counts
