"""MS-COCO 2014 as the deep-hashing literature runs it (docs/DATASETS.md, MS-COCO).

Two published list families fix the 5,000 queries and the 10,000 training images (--split_variant):
thuml/HashNet's pytorch/data/coco/{test,train}.txt (also CSQ's) and DeepHash-pytorch's data/coco/{test,train}.txt
(also VTS's and DHD's); both ship in data/splits/. Their database lists are not in the public snapshots, so the
database is rebuilt: every COCO-2014 image with at least one instance label (coco/labels.txt, written by
`python -m data.coco_lists`) minus the queries, which must give 117,218 images holding every training image.

Label columns: the 80 categories in alphabetical order of their names, as both families have them (person is
column 49), not COCO's category-id order. Images live in coco/train2014/ and coco/val2014/ as COCO's archives
extract; the HashNet lists' absolute paths and DeepHash-pytorch's relative ones both resolve there.

A coco/ folder with its own train.txt, test.txt and database.txt (the list format, data/lists.py) keeps
working: those lists are used when --split_variant is not given.
"""
from pathlib import Path

from utils.errors import UserError

from .base import DataOptions, DatasetSpec, name_some
from .coco_paths import keyed_lines
from .files import LabelledPaths, file_splits
from .lists import LIST_FILES, parse_list, read_list
from .lists import list_splits as own_list_splits
from .protocol import shipped_bytes
from .variants import identify_list

FOLDER = "coco"
LABELS_FILE = "labels.txt"  # every labelled COCO-2014 image and its 80 labels (python -m data.coco_lists)
LABELLED_IMAGES = 122218  # COCO-2014 train + val images with at least one instance label (of 123,287)
DATABASE_SIZE = 117218  # LABELLED_IMAGES minus the 5,000 queries
CLASS_NAMES = (
    "airplane", "apple", "backpack", "banana", "baseball bat", "baseball glove", "bear", "bed", "bench", "bicycle",
    "bird", "boat", "book", "bottle", "bowl", "broccoli", "bus", "cake", "car", "carrot", "cat", "cell phone", "chair",
    "clock", "couch", "cow", "cup", "dining table", "dog", "donut", "elephant", "fire hydrant", "fork", "frisbee",
    "giraffe", "hair drier", "handbag", "horse", "hot dog", "keyboard", "kite", "knife", "laptop", "microwave",
    "motorcycle", "mouse", "orange", "oven", "parking meter", "person", "pizza", "potted plant", "refrigerator",
    "remote", "sandwich", "scissors", "sheep", "sink", "skateboard", "skis", "snowboard", "spoon", "sports ball",
    "stop sign", "suitcase", "surfboard", "teddy bear", "tennis racket", "tie", "toaster", "toilet", "toothbrush",
    "traffic light", "train", "truck", "tv", "umbrella", "vase", "wine glass", "zebra")

# --split_variant -> (what it is, the shipped query list, the shipped training list)
VARIANTS = {
    "hashnet": ("COCO, HashNet lists", "coco_hashnet_test.txt", "coco_hashnet_train.txt"),
    "deephash": ("COCO, DeepHash-pytorch lists", "coco_deephash_test.txt", "coco_deephash_train.txt"),
}
# The paper's own NUS-WIDE train/test lists are DeepHash-pytorch's (docs/METHOD.md §4): the same lineage.
DEFAULT_VARIANT = "deephash"
OWN = "own"  # the folder's own train.txt, test.txt and database.txt

def chosen_variant(folder, options):
    """--split_variant, else the folder's own lists where it holds all three, else DEFAULT_VARIANT."""
    if options.split_variant:
        return options.split_variant
    return OWN if all((Path(folder) / name).is_file() for name in LIST_FILES.values()) else DEFAULT_VARIANT


def shipped_split(file_name, folder, problems=None):
    """A shipped COCO list as LabelledPaths, its images under `folder`."""
    source = f"data/splits/{file_name}.gz (shipped)"
    lines = keyed_lines(shipped_bytes(file_name).decode(), source)
    return parse_list(lines, source, folder, len(CLASS_NAMES), "--dataset coco", problems)


def labelled_images(folder, problems=None):
    """LabelledPaths of coco/labels.txt: every labelled COCO-2014 image."""
    labels_file = Path(folder) / LABELS_FILE
    if not labels_file.exists():
        raise UserError(f"no {labels_file}: the COCO database is rebuilt from COCO's annotations; run `python -m "
                        f"data.coco_lists --annotations DIR --data_root {Path(folder).parent}` (DIR holding "
                        "instances_train2014.json and instances_val2014.json; `python -m data.download coco` "
                        "fetches them)")
    return read_list(labels_file, len(CLASS_NAMES), "--dataset coco", problems)


def rebuilt_database(labelled, query, train, size):
    """The labelled images that are not queries, in labels.txt order; refused (UserError) unless there are
    `size` of them and they hold every training image."""
    queries = set(query.paths)
    kept = [row for row, path in enumerate(labelled.paths) if path not in queries]
    database = LabelledPaths([labelled.paths[row] for row in kept], labelled.labels[kept],
                             f"{labelled.source} minus the queries")
    if len(database.paths) != size:
        raise UserError(f"{labelled.source} minus the {len(queries):,} queries leaves {len(database.paths):,} "
                        f"images, not the {size:,} of the COCO protocol: rebuild it from the complete "
                        "instances_train2014.json and instances_val2014.json (python -m data.coco_lists)")
    absent = sorted(set(train.paths) - set(database.paths))
    if absent:
        raise UserError(f"{len(absent):,} training image{'s are' if len(absent) > 1 else ' is'} not in the database "
                        f"rebuilt from {labelled.source} "
                        f"(e.g. {name_some(absent, 2)}): rebuild it with python -m data.coco_lists")
    return database


def list_splits(root, seed=0, options=DataOptions(), problems=None):
    """The three splits of --split_variant: shipped queries and training images, the rebuilt database; or the
    folder's own lists (variant "own")."""
    folder = Path(root) / FOLDER
    variant = chosen_variant(folder, options)
    if variant == OWN:
        return own_list_splits("coco", FOLDER, len(CLASS_NAMES), root, seed, options, problems)
    if not folder.is_dir():
        raise UserError(f"no folder {folder}: it should hold train2014/, val2014/ and {LABELS_FILE} (see "
                        "docs/DATASETS.md, MS-COCO; python -m data.download coco); or pass --data_root")
    _, query_file, train_file = VARIANTS[variant]
    query, train = shipped_split(query_file, folder, problems), shipped_split(train_file, folder, problems)
    database = rebuilt_database(labelled_images(folder, problems), query, train, DATABASE_SIZE)
    return {"train": train, "query": query, "database": database}


def build(root, seed, preprocessing, options=DataOptions()):
    splits = list_splits(root, seed, options)
    return file_splits("coco", splits, preprocessing, cache_dir=options.cache_folder(Path(root) / FOLDER),
                       options=options)


def describe(root, options=DataOptions()):
    """What the run log records of the lists in use: the variant and where each split comes from."""
    folder = Path(root) / FOLDER
    variant = chosen_variant(folder, options)
    if variant == OWN:
        return {"split_variant": "own", **{f"coco/{name}": "{} ({})".format(*identify_list(folder / name))
                                           for name in LIST_FILES.values()}}
    what, query_file, train_file = VARIANTS[variant]
    return {"split_variant": f"{variant} ({what}: data/splits/{query_file}.gz, {train_file}.gz; database: "
                             f"coco/{LABELS_FILE} minus the queries)"}


SPEC = DatasetSpec(
    name="coco", num_classes=len(CLASS_NAMES), default_topk=5000, build=build, list_splits=list_splits,
    describe=describe, class_names=CLASS_NAMES, options=("split_variant",),
    summary="MS-COCO 2014 (80 classes): --split_variant hashnet|deephash (shipped queries and training lists, "
            "database rebuilt from the annotations) or your own lists in DATA_ROOT/coco")
