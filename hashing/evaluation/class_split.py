"""mAP under three relevance definitions for retrieval of unseen classes (docs/METHOD.md §13): relevance by the
seen classes only, by the unseen classes only, and by all labels.

Under a restricted definition an item's labels are cut to that definition's columns, and the queries are those
holding at least one of them (a query without one has nothing to find by construction; DSH_Analysis's query sets
are formed by labels the same way). The database is always the whole database. The convention (--zero_hit, ...)
then applies as usual, e.g. to a query whose class has no database item within the top K.
"""
from hashing.codes import CodeSet, pack_labels

from .conventions import Convention
from .metrics import map_of_codes

DEFINITIONS = ("seen", "unseen", "all")


def restricted_codes(codes, classes):
    """The CodeSet judged by `classes` only: labels cut to those columns, queries holding none of them left out.
    None when no query holds one."""
    classes = list(classes)
    query_labels = codes.query_label_matrix()[:, classes]
    holding = query_labels.any(axis=1)
    if not holding.any():
        return None
    return CodeSet(codes.query_bits[holding], pack_labels(query_labels[holding]), codes.database_bits,
                   pack_labels(codes.database_label_matrix()[:, classes]), codes.hash_bit, len(classes))


def class_split_maps(codes, class_split, topk=None, convention=Convention(), known=None):
    """{"seen" | "unseen" | "all": {"map": mAP@topk (None without a query), "queries": how many}}. `known`:
    {definition: mAP} the caller has computed already (e.g. "all", the codes' own mAP), not computed again."""
    known = known or {}
    parts = {"seen": restricted_codes(codes, class_split.seen), "unseen": restricted_codes(codes, class_split.unseen),
             "all": codes}
    return {name: {"map": None if part is None else known[name] if name in known
                   else map_of_codes(part, topk, convention),
                   "queries": 0 if part is None else len(part.query_bits)} for name, part in parts.items()}


def describe_class_split_maps(maps, map_name="mAP"):
    """'seen classes 0.81 (412 queries), unseen classes 0.35 (180), all labels 0.77 (500)'."""
    def figure(name):
        value = maps[name]["map"]
        return "-" if value is None else f"{value:.4f}"
    return (f"{map_name} seen classes {figure('seen')} ({maps['seen']['queries']} queries), unseen classes "
            f"{figure('unseen')} ({maps['unseen']['queries']}), all labels {figure('all')} ({maps['all']['queries']})")

