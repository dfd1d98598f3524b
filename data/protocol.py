"""The paper's split files, shipped in data/splits/ (gzip), and how a user's list files are identified.

The paper's code fixes its splits with files (docs/METHOD.md §4): MIRFlickr-25k by img.txt, targets.txt
and a permutation, NUS-WIDE by train.txt, test.txt and database.txt. The first five are small and ship
here, byte for byte (gzip-compressed); each is checked against its SHA-256 when read. The 193,734-line
NUS-WIDE database.txt does not ship: a user's copy is identified by its git blob id (the sha1 of
b"blob <size>\\0" + the bytes, what `git hash-object` prints), because two different files of that name
circulate and only one is the paper's. MS-COCO's query and training lists of its two published families ship
the same way (data/coco.py).
"""
import gzip
import hashlib
from pathlib import Path

from utils.errors import UserError
from utils.paths import MiB, open_regular, read_capped, read_file_bytes

# The shipped files are at most 114 kB compressed and 2.4 MB uncompressed: anything larger is not one of them
# (a gzip bomb inflates a few kB into gigabytes), so it is refused before or while inflating.
MAX_SHIPPED_BYTES = 1 * MiB
MAX_SHIPPED_INFLATED = 4 * MiB
# A user's split list: NUS-WIDE's database.txt, the largest, is about 50 MB.
MAX_LIST_BYTES = 512 * MiB

SPLITS_DIR = Path(__file__).resolve().parent / "splits"

# shipped file -> (SHA-256 of its uncompressed bytes, git blob id of the paper repository's file)
SHIPPED = {
    "flickr25k_img.txt": ("259813494e297002d7528dd88b620a6382be76598f7ce830bf4991c6d1c4f910",
                          "e3eb7e735954d7a8d597ea9fec969ea6670ee55d"),
    "flickr25k_targets.txt": ("8c899f207fc0664be1a4b2010b3003b162e40e47ef63628133697cfb1fadb971",
                              "96c483fc130404c10d1ec53fd8b6ffd925956466"),
    "flickr25k_permutation.json": ("7258434dbcd1067033cbe2067a2d063736aec22e6dfbd11bb021a129497d1d91",
                                   "7df29b9b754e32eb7522c0d71e5a842ec5634931"),
    "nuswide21_train.txt": ("c31007d63075cc173cb368f91475e4072a76b312b7dca0d14e88b1cc23586851",
                            "20f16d48c5d71412ab118563ab0edb3fd8a4e975"),
    "nuswide21_test.txt": ("bbdbc13c08e340068064eb4f9849f33800139816fbe0e0792d5a49953581b41f",
                           "371be57ca9dd7b0d98323cbc4dee9f1191224b5b"),
    # MS-COCO's two published list families (data/coco.py): thuml/HashNet pytorch/data/coco/{test,train}.txt
    # (commit 85387b8) and swuxyj/DeepHash-pytorch data/coco/{test,train}.txt (commit ab14068), both MIT
    "coco_hashnet_test.txt": ("654919c54449579a3896d32fa7136731cbb7d14be9288bb1c07977ede9a0feb6",
                              "f3c1b618677d27ad00c03a889d3eba5100eb2d57"),
    "coco_hashnet_train.txt": ("e833f1fb6db06988861ee92221dc4e003205f5b9407b5926a1f8d086ac0a7c15",
                               "523489ab654d08dc306f93cc4e18bec036135349"),
    "coco_deephash_test.txt": ("3f0e2c49e363bccbf5ed67cf8cd59cce2b04a7238417ba0c3baf876be3be90b7",
                               "e326d2091ab54672f1116fd93ea2d93fd76052c6"),
    "coco_deephash_train.txt": ("4708c66fa87bac20c85d470c29422c564b0a6811fc48d32a4714c23212e9500c",
                                "2b78ffd61c5ec98234343a8a2321d1378345d1bb"),
}

# git blob id -> what the file is (docs/METHOD.md §4)
KNOWN_FILES = {
    SHIPPED["flickr25k_img.txt"][1]: "the paper's flickr25k/img.txt",
    SHIPPED["flickr25k_targets.txt"][1]: "the paper's flickr25k/targets.txt",
    SHIPPED["flickr25k_permutation.json"][1]: "the paper's flickr.txt permutation",
    SHIPPED["nuswide21_train.txt"][1]: "the paper's nus_wide/train.txt (= DeepHash-pytorch nuswide_21)",
    SHIPPED["nuswide21_test.txt"][1]: "the paper's nus_wide/test.txt (= DeepHash-pytorch nuswide_21)",
    "1d8f3dd2214d19fe038b91f2aab68bfe3d84fd01": "the paper's nus_wide/database.txt",
    "23c314cf90f8ed2648c957d302435ad7ccf9ce48": "DeepHash-pytorch's nuswide_21/database.txt, not the paper's",
    SHIPPED["coco_hashnet_test.txt"][1]: "thuml/HashNet's coco/test.txt (the queries)",
    SHIPPED["coco_hashnet_train.txt"][1]: "thuml/HashNet's coco/train.txt",
    SHIPPED["coco_deephash_test.txt"][1]: "DeepHash-pytorch's coco/test.txt (the queries)",
    SHIPPED["coco_deephash_train.txt"][1]: "DeepHash-pytorch's coco/train.txt",
}
NUSWIDE_DATABASE_VARIANTS = {"1d8f3dd2214d19fe038b91f2aab68bfe3d84fd01": "paper",
                             "23c314cf90f8ed2648c957d302435ad7ccf9ce48": "DeepHash-pytorch nuswide_21"}

# train / query / database sizes of each dataset's protocol (docs/METHOD.md §4); None: not fixed
PROTOCOL_SIZES = {
    "voc2007": {"train": 5011, "query": 4952, "database": 5011},
    "voc2012": {"train": 5717, "query": 5823, "database": 5717},
    "flickr": {"train": 4000, "query": 1000, "database": 19581},
    "nuswide": {"train": 10500, "query": 2100, "database": 193734},
    "coco": {"train": 10000, "query": 5000, "database": 117218},
    "imagenet": {"train": 13000, "query": 5000, "database": None},
}


def git_blob_id(content):
    """The id git gives a file of these bytes (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def shipped_bytes(name):
    """The uncompressed bytes of a shipped split file, checked against its recorded SHA-256."""
    path = SPLITS_DIR / f"{name}.gz"
    what = f"the shipped split file {path}"
    try:
        with open_regular(path, "the shipped split file", MAX_SHIPPED_BYTES,
                          missing="restore it with `git checkout -- data/splits`") as handle, \
                gzip.GzipFile(fileobj=handle) as inflated:
            content = read_capped(inflated, MAX_SHIPPED_INFLATED, what)
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {what} ({exc}); restore it with `git checkout -- data/splits`") from None
    if hashlib.sha256(content).hexdigest() != SHIPPED[name][0]:
        raise UserError(f"the shipped split file {path} is damaged (its SHA-256 differs from the recorded one); "
                        "restore it with `git checkout -- data/splits`")
    return content


def read_list_bytes(path):
    """The bytes of a user's split list, under the reader rule (a regular file of at most MAX_LIST_BYTES)."""
    return read_file_bytes(path, "the list", MAX_LIST_BYTES)


def identify(path):
    """(git blob id, what it is: a KNOWN_FILES description or "unknown") of the file at `path`."""
    blob = git_blob_id(read_list_bytes(path))
    return blob, KNOWN_FILES.get(blob, "unknown")


def nuswide_database_variant(path):
    """"paper", "DeepHash-pytorch nuswide_21" or "unknown (blob ...)" for a NUS-WIDE database.txt."""
    blob = git_blob_id(read_list_bytes(path))
    return NUSWIDE_DATABASE_VARIANTS.get(blob, f"unknown (git blob {blob})")
