"""Which published split a list file is, by fingerprint: `python -m data.verify --identify FILE ...`.

A file is recognised by its git blob id (the upstream file byte for byte, data/protocol.py) or, for a COCO list,
by the SHA-256 of its lines with each image path cut to `train2014/...` or `val2014/...` and the labels
single-spaced (so a copy whose paths were moved to another folder is still recognised); an edited, shuffled or
truncated copy is not. The digests of the upstream files were taken from thuml/HashNet (85387b8) and
swuxyj/DeepHash-pytorch (ab14068); those of the rebuilt COCO databases (data/coco.py) from HashNet's caffe lists,
whose database and training lists together hold the same 122,218 labelled images with the same labels.
"""
import hashlib

from utils.errors import UserError

from .coco_paths import keyed_lines
from .protocol import git_blob_id, read_list_bytes

NOT_PUBLISHED = "not a published variant"
COCO_HASHNET, COCO_DEEPHASH = "COCO, HashNet lists", "COCO, DeepHash-pytorch lists"
COCO_HASHNET_CAFFE = "COCO, HashNet (caffe) lists"
NUS_PAPER, NUS_DEEPHASH = "NUS-WIDE, the paper's lists", "NUS-WIDE, DeepHash-pytorch's train/test"
FLICKR_PAPER = "Flickr-25k, the paper's split"

# git blob id -> (variant, which file)
BLOBS = {
    "f3c1b618677d27ad00c03a889d3eba5100eb2d57": (COCO_HASHNET, "thuml/HashNet pytorch/data/coco/test.txt"),
    "523489ab654d08dc306f93cc4e18bec036135349": (COCO_HASHNET, "thuml/HashNet pytorch/data/coco/train.txt"),
    "6cbdb1eca6031560ce3cfa841ae6653cc5055954": (COCO_HASHNET, "thuml/HashNet pytorch/data/coco/database.txt"),
    "e326d2091ab54672f1116fd93ea2d93fd76052c6": (COCO_DEEPHASH, "DeepHash-pytorch data/coco/test.txt"),
    "2b78ffd61c5ec98234343a8a2321d1378345d1bb": (COCO_DEEPHASH, "DeepHash-pytorch data/coco/train.txt"),
    "aaabcac7e9768b659dd12500b969add4b0f56e91": (COCO_DEEPHASH, "DeepHash-pytorch data/coco/database.txt"),
    "1d8f3dd2214d19fe038b91f2aab68bfe3d84fd01": (NUS_PAPER, "the paper's data/nus_wide/database.txt"),
    "20f16d48c5d71412ab118563ab0edb3fd8a4e975": (NUS_PAPER, "the paper's data/nus_wide/train.txt, the same file as "
                                                            "DeepHash-pytorch's nuswide_21/train.txt"),
    "371be57ca9dd7b0d98323cbc4dee9f1191224b5b": (NUS_PAPER, "the paper's data/nus_wide/test.txt, the same file as "
                                                            "DeepHash-pytorch's nuswide_21/test.txt"),
    "23c314cf90f8ed2648c957d302435ad7ccf9ce48": (NUS_DEEPHASH, "DeepHash-pytorch nuswide_21/database.txt, not the "
                                                               "paper's database"),
    "e3eb7e735954d7a8d597ea9fec969ea6670ee55d": (FLICKR_PAPER, "the paper's data/flickr25k/img.txt"),
    "96c483fc130404c10d1ec53fd8b6ffd925956466": (FLICKR_PAPER, "the paper's data/flickr25k/targets.txt"),
    "7df29b9b754e32eb7522c0d71e5a842ec5634931": (FLICKR_PAPER, "the paper's flickr.txt permutation"),
    "0fbdee0a66d8fa03e69a9d153133a9c45e1c9201": ("Flickr-25k, DeepHash-pytorch's lists (not the paper's split)",
                                                 "DeepHash-pytorch data/mirflickr/train.txt"),
    "ff10c8d7ce418d14c2dc85c9cad83b2bdafae363": ("Flickr-25k, DeepHash-pytorch's lists (not the paper's split)",
                                                 "DeepHash-pytorch data/mirflickr/test.txt"),
    "05c46e607982c26a4a1135770148f0868e100b60": ("Flickr-25k, DeepHash-pytorch's lists (not the paper's split)",
                                                 "DeepHash-pytorch data/mirflickr/database.txt"),
}
# SHA-256 of a COCO list's keyed lines (coco_paths.keyed_lines) -> (variant, which list)
COCO_DIGESTS = {
    "b3db5fc7d3ee0bd97de6d890a5ea592c6874fb88e255bc680b341cddd35d6d4a":
        (COCO_HASHNET, "the queries, test.txt; HashNet's caffe test0-7.txt hold the same"),
    "95b0e4222a23dca457f5026b303cdca78772d00d973553d5651bc69a5028fa30":
        (COCO_HASHNET, "the training list, train.txt; the same in HashNet's caffe lists"),
    "3fe8d55b86fd7dd460b65036de957e700b56e773b78e18f574764ade565c5bc5":
        (COCO_HASHNET, "the database rebuilt from the annotations: 117,218 images, sorted"),
    "3f0e2c49e363bccbf5ed67cf8cd59cce2b04a7238417ba0c3baf876be3be90b7": (COCO_DEEPHASH, "the queries, test.txt"),
    "4708c66fa87bac20c85d470c29422c564b0a6811fc48d32a4714c23212e9500c": (COCO_DEEPHASH, "the training list, train.txt"),
    "a04fd68b7b6f8f4bbf9d3e8f29964e464d0f4ce5501be63515a0b909c72b4eb5":
        (COCO_DEEPHASH, "the database rebuilt from the annotations: 117,218 images, sorted"),
    "2f0778ca6f0a66fb524fe3d332a155f849c10c962f9c432008da039c32de854c":
        (COCO_HASHNET_CAFFE, "the database, database0-7.txt: 112,218 images holding all 5,000 queries"),
    "804d0543641bd48152bdafa937b127be77ec58ca7bbeae52c87813d0d22d6f9a":
        ("COCO 2014, every labelled image", "coco/labels.txt as data.coco_lists writes it"),
}


def coco_digest(text):
    """SHA-256 of a COCO list's keyed lines, or None when a line names no COCO-2014 image."""
    try:
        lines = keyed_lines(text, "the list")
    except UserError:
        return None
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def identify_list(path):
    """(variant, which file it is) of the list at `path`; (NOT_PUBLISHED, its git blob id) when unknown."""
    content = read_list_bytes(path)
    blob = git_blob_id(content)
    if blob in BLOBS:
        return BLOBS[blob]
    try:
        digest = coco_digest(content.decode())
    except UnicodeDecodeError:
        digest = None
    return COCO_DIGESTS.get(digest) or (NOT_PUBLISHED, f"git blob {blob}")
