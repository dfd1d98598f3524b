"""Writers of small datasets in the real on-disk formats, for the tests (and the loading benchmark).

They use only the standard library, NumPy and Pillow, never the loaders under test, so a test compares
what a loader reads with what was written here."""
import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_array(rng, width, height):
    """A smooth random RGB picture with some noise: JPEG sizes and decode times close to photos'."""
    coarse = rng.integers(0, 256, size=(height // 25 + 2, width // 25 + 2, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR), np.float32)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def write_image(path, rng, width=40, height=30):
    """Write a random picture; the format follows the suffix (.jpg, .png). Returns its pixels."""
    pixels = image_array(rng, width, height)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if str(path).endswith(".jpg") else Image.fromarray(pixels).save(path)
    return pixels


def voc_annotation(image_id, objects, width, height):
    """Annotations/{id}.xml as VOC writes it: objects are (class name, difficult 0/1)."""
    parts = [f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                     f"<xmax>{width - 1}</xmax><ymax>{height - 1}</ymax></bndbox></object>")
    return "\n".join(parts) + "\n</annotation>\n"


def write_voc_tree(root, year, splits, width=40, height=30, seed=0):
    """root/VOCdevkit/VOC{year} with JPEGImages, Annotations and ImageSets/Main/{split}.txt.

    splits: {split name: {image id: [(class name, difficult), ...]}}; an id may be in several splits.
    """
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOCdevkit" / f"VOC{year}"
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc / "Annotations").mkdir(exist_ok=True)
    for split, images in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
        for image_id, objects in images.items():
            if not (voc / "JPEGImages" / f"{image_id}.jpg").exists():
                write_image(voc / "JPEGImages" / f"{image_id}.jpg", rng, width, height)
                (voc / "Annotations" / f"{image_id}.xml").write_text(voc_annotation(image_id, objects, width, height))
    return voc


def tar_folder(folder, tar_path, arcname):
    """A plain .tar of `folder`, stored under the name `arcname`, as the VOC archives are."""
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname=arcname)
    return tar_path


def add_tar_member(tar_path, name, data=b"x", kind=tarfile.REGTYPE, link_target=""):
    """Append a member of any name and kind (to build hostile archives)."""
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link_target
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_list_folder(folder, splits, suffix=".png", seed=0):
    """A list-format folder: {split file: [(relative image path, [labels])]}, images written too."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for file_name, rows in splits.items():
        lines = []
        for image, labels in rows:
            if not (folder / image).exists():
                write_image(folder / image, rng)
            lines.append(" ".join([image, *map(str, labels)]))
        (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
        (folder / file_name).write_text("\n".join(lines) + "\n")
    return folder


def small_list_folder(folder, count=24, seed=0):
    """A 4-class list folder with 2 labels per image at most: the first two thirds are the training
    set and database, the rest the queries."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        labels = [0] * 4
        for cls in rng.choice(4, size=rng.integers(1, 3), replace=False):
            labels[cls] = 1
        rows.append((f"images/{index:03d}.png", labels))
    cut = count * 2 // 3
    return write_list_folder(folder, {"train.txt": rows[:cut], "database.txt": rows[:cut], "test.txt": rows[cut:]})


def write_cifar_batch(path, rows, classes):
    """One batch of the CIFAR-10 python format: rows uint8 (N, 3072) as the format documents them (1,024
    red values, then green, then blue, each plane row-major), classes (N,)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"fixture", b"labels": [int(c) for c in classes], b"data": np.asarray(rows, np.uint8),
             b"filenames": [f"{i}.png".encode() for i in range(len(rows))]}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)


def shipped_coco_rows(*families):
    """{image name: "l1 ... l80"} of the shipped COCO lists of these families ("hashnet", "deephash"), read
    with gzip alone; the HashNet lists' absolute paths reduced to train2014/... or val2014/..."""
    import gzip
    rows = {}
    for family in families:
        for split in ("test", "train"):
            path = Path(__file__).resolve().parents[1] / "data" / "splits" / f"coco_{family}_{split}.txt.gz"
            for line in gzip.decompress(path.read_bytes()).decode().splitlines():
                image, labels = line.split(" ", 1)
                rows["/".join(image.split("/")[-2:])] = labels.strip()
    return rows


def write_coco_tree(root, rows, seed=0):
    """DATA_ROOT/coco as COCO's archives extract and data.coco_lists writes it: one tiny JPEG per image name of
    `rows` ({"train2014/COCO_train2014_N.jpg": "l1 ... l80"}) in train2014/ or val2014/, and labels.txt (sorted).
    One picture serves every file, so tens of thousands of them take seconds."""
    folder = Path(root) / "coco"
    buffer = io.BytesIO()
    Image.fromarray(image_array(np.random.default_rng(seed), 32, 24)).save(buffer, format="JPEG", quality=90)
    for sub in ("train2014", "val2014"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in rows:
        (folder / name).write_bytes(buffer.getvalue())
    (folder / "labels.txt").write_text("".join(f"{name} {rows[name]}\n" for name in sorted(rows)))
    return folder


# COCO's 80 categories in its own (category-id) order, and their ids, as instances_*.json lists them
COCO_CATEGORIES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass "
    "cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink "
    "refrigerator book clock vase scissors teddy_bear hair_drier toothbrush").split()  # "_" stands for a space
COCO_CATEGORY_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                     58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                     88, 89, 90]


def write_coco_annotations(folder, rows, unlabelled=()):
    """instances_train2014.json and instances_val2014.json as COCO ships them (the fields the builder reads):
    one object per label of `rows` ({"train2014/COCO_train2014_N.jpg": "l1 ... l80"}, columns in alphabetical
    order of the names), each image listed, and the images of `unlabelled` listed without any object."""
    names = [name.replace("_", " ") for name in COCO_CATEGORIES]
    id_of = dict(zip(names, COCO_CATEGORY_IDS))
    column_ids = [id_of[name] for name in sorted(names)]
    documents = {subset: {"info": {}, "images": [], "annotations": [],
                          "categories": [{"id": id_of[name], "name": name, "supercategory": ""} for name in names]}
                 for subset in ("train2014", "val2014")}
    for name in [*rows, *unlabelled]:
        subset, file_name = name.split("/")
        image_id = int(file_name.rsplit("_", 1)[1].split(".")[0])
        document = documents[subset]
        document["images"].append({"id": image_id, "file_name": file_name, "width": 32, "height": 24})
        for column, value in enumerate(rows.get(name, "").split()):
            if value == "1":
                document["annotations"].append({"id": len(document["annotations"]) + 1, "image_id": image_id,
                                                "category_id": column_ids[column], "iscrowd": 0})
    Path(folder).mkdir(parents=True, exist_ok=True)
    for subset, document in documents.items():
        (Path(folder) / f"instances_{subset}.json").write_text(json.dumps(document))
    return Path(folder)
