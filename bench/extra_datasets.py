"""Rebuild the extra benchmark datasets from fetched GitHub mirrors, so the few-shot bench meets data it was not tuned on.

Each dataset is read from one pinned commit of a bare git mirror (`fetch github:<repo>`) and written in the layout of
shared/datasets: images/, labels/ (YOLO boxes, normalised), data.yaml, split.txt, meta.json. Image bytes are copied
unchanged, so a rebuild from the same commit is identical.

    python bench/extra_datasets.py aquarium /work/.mirror/sumit2011+underwater-object-detection/repo
    python bench/extra_datasets.py construction-ppe /work/.mirror/runtueee+PPE_detection/repo --preview /tmp/prev
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

DEFAULT_OUT = Path("/work/datasets-extra")


@dataclass(frozen=True)
class Source:
    """Where one dataset lives in its mirror, under which license, and how its splits map to ours."""

    repo: str
    commit: str
    root: str
    license: str
    license_evidence: str
    kind: str
    names: list[str]
    splits: dict[str, str]  # source folder -> our split; folders not named are left out
    made: str
    max_train: int | None = None  # keep the train images whose name hashes lowest
    extra: dict = field(default_factory=dict)


SOURCES = {
    "aquarium": Source(
        repo="sumit2011/underwater-object-detection",
        commit="eee4be3324cd019b9032bb13f22a756a77866503",
        root="dataset/aquarium_pretrain",
        license="CC BY 4.0",
        license_evidence="README.dataset.txt of the export: 'Aquarium > raw-1024 ... Provided by Roboflow, License: CC BY 4.0'",
        kind="small objects: many small fish in 1024 px aquarium photos, 7 classes (no COCO class except a "
             "loose 'bird' for penguin/puffin)",
        names=["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"],
        splits={"train": "train", "valid": "valid", "test": "test"},
        max_train=210,
        made="Roboflow 'Aquarium Combined' v2 raw-1024 export (YOLOv5 txt, no augmentation, longest side resized to "
             "1024) with its own train/valid/test split; every valid and test image kept, train cut to the 210 "
             "images whose file name has the lowest sha1",
        extra={"dataset_page": "https://public.roboflow.ai/object-detection/aquarium",
               "attribution": "Aquarium Combined dataset, Roboflow (photos from Henry Doorly Zoo and National "
                              "Aquarium, labeled by the Roboflow team)"},
    ),
    "construction-ppe": Source(
        repo="runtueee/PPE_detection",
        commit="f74a6fda53a65871ee01383b07cf9f812e7a9845",
        root="css-data",
        license="CC BY 4.0",
        license_evidence="css-data/README.dataset.txt of the export: 'Construction Site Safety > YOLOv5s ... "
                         "License: CC BY 4.0'",
        kind="several classes: PPE on construction sites (hard hats, masks, vests, their absence, cones, "
             "machinery), 640x640",
        names=["Hardhat", "Mask", "NO-Hardhat", "NO-Mask", "NO-Safety Vest", "Person", "Safety Cone",
               "Safety Vest", "machinery", "vehicle"],
        splits={"valid": "train", "test": "valid"},
        made="Roboflow 'Construction Site Safety' v28 export (YOLOv8 txt, stretched to 640x640). Its train folder "
             "holds 5 augmented copies (flip, crop, rotation, shear) of each photo and is left out, so every box "
             "here is as drawn; the export's unaugmented valid images become our train split and its test images "
             "our held-out valid split",
        extra={"dataset_page": "https://universe.roboflow.com/roboflow-universe-projects/construction-site-safety",
               "attribution": "Construction Site Safety dataset, Roboflow Universe Projects"},
    ),
}


class Mirror:
    """Reads blobs of one commit of a bare git mirror through a single `git cat-file --batch`."""

    def __init__(self, git_dir: Path, commit: str):
        self.git = ["git", "--git-dir", str(git_dir)]
        probe = subprocess.run([*self.git, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
        if probe.returncode:
            raise SystemExit(f"{git_dir} has no commit {commit}; fetch the repository named in this script again")
        self.commit = commit
        self.batch = subprocess.Popen([*self.git, "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def files(self, folder: str) -> dict[str, str]:
        """File name -> blob id for every file under folder at the pinned commit."""
        out = subprocess.run([*self.git, "ls-tree", "-r", "-z", self.commit, "--", folder + "/"],
                             capture_output=True, check=True).stdout.decode()
        entries = (line.split("\t", 1) for line in out.split("\0") if line)
        return {path.rsplit("/", 1)[-1]: meta.split()[2] for meta, path in entries}

    def read(self, blob: str) -> bytes:
        self.batch.stdin.write(blob.encode() + b"\n")
        self.batch.stdin.flush()
        header = self.batch.stdout.readline().split()
        if header[1] == b"missing":
            raise SystemExit(f"blob {blob} is absent from the mirror (a large file the snapshot left out)")
        data = self.batch.stdout.read(int(header[2]))
        self.batch.stdout.read(1)
        if data.startswith(b"version https://git-lfs"):
            raise SystemExit(f"blob {blob} is a Git LFS pointer, not the file")
        return data

    def close(self) -> None:
        self.batch.stdin.close()
        self.batch.wait()


def parse_rows(text: str, nc: int) -> list[tuple[int, float, float, float, float]]:
    """YOLO box rows as (class, xc, yc, w, h); anything else is an error, not a guess."""
    rows = []
    for line in filter(str.strip, text.splitlines()):
        tokens = line.split()
        if len(tokens) != 5 or not 0 <= int(tokens[0]) < nc:
            raise ValueError(f"not a box row of {nc} classes: {line!r}")
        rows.append((int(tokens[0]), *(float(v) for v in tokens[1:])))
    return rows


def clip(row: tuple[int, float, float, float, float]) -> tuple[int, float, float, float, float] | None:
    """The box cut to the image; None when nothing of it is left."""
    cls, xc, yc, w, h = row
    x1, y1 = max(0.0, xc - w / 2), max(0.0, yc - h / 2)
    x2, y2 = min(1.0, xc + w / 2), min(1.0, yc + h / 2)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def name_hash(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def build(name: str, git_dir: Path, out: Path) -> Path:
    """Write one dataset from the mirror; any earlier copy of it is replaced."""
    source = SOURCES[name]
    mirror = Mirror(git_dir, source.commit)
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    (target / "images").mkdir(parents=True)
    (target / "labels").mkdir()
    splits: dict[str, str] = {}
    dropped = 0
    try:
        for folder, split in source.splits.items():
            images = mirror.files(f"{source.root}/{folder}/images")
            labels = mirror.files(f"{source.root}/{folder}/labels")
            chosen = sorted(images)
            if split == "train" and source.max_train is not None:
                chosen = sorted(sorted(chosen, key=name_hash)[:source.max_train])
            for image in chosen:
                stem = image.rsplit(".", 1)[0]
                text = mirror.read(labels[stem + ".txt"]).decode() if stem + ".txt" in labels else ""
                rows = []
                for row in parse_rows(text, len(source.names)):
                    kept = clip(row)
                    if kept is None:
                        dropped += 1
                    else:
                        rows.append(kept)
                (target / "images" / image).write_bytes(mirror.read(images[image]))
                (target / "labels" / f"{stem}.txt").write_text(
                    "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows))
                splits[image] = split
    finally:
        mirror.close()
    (target / "split.txt").write_text("".join(f"{image}\t{splits[image]}\n" for image in sorted(splits)))
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(source.names))
    (target / "data.yaml").write_text("train: images  # all splits merged; use split.txt for the original split\n"
                                      f"val: images\nnc: {len(source.names)}\nnames:\n{names}")
    meta = {"repo": source.repo, "commit": source.commit, "path": source.root, "license": source.license,
            "license_evidence": source.license_evidence, "kind": source.kind, "made": source.made,
            "split_from": source.splits, "images": dict(sorted(Counter(splits.values()).items())),
            "dropped": {"degenerate": dropped}, **source.extra,
            "rebuild": f"python bench/extra_datasets.py {name} <mirror of github:{source.repo}>"}
    (target / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return target


def describe(root: Path) -> None:
    """Images, objects and median box size per split, objects per class: the check after each build."""
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    splits = dict(line.split("\t") for line in (root / "split.txt").read_text().splitlines())
    per_split: dict[str, list] = {}
    classes: Counter = Counter()
    sizes = []
    for image, split in splits.items():
        rows = [line.split() for line in (root / "labels" / f"{image.rsplit('.', 1)[0]}.txt").read_text().splitlines()]
        with Image.open(root / "images" / image) as im:
            sizes.append(im.size)
        per_split.setdefault(split, []).append(rows)
        classes.update(names[int(r[0])] for r in rows)
    print(f"{root.name}: {len(splits)} images, sizes {Counter(sizes).most_common(3)}")
    for split, images in sorted(per_split.items()):
        boxes = [(float(r[3]), float(r[4])) for rows in images for r in rows]
        print(f"  {split:5s} images {len(images):4d}  objects {len(boxes):5d}  "
              f"median box w {statistics.median(w for w, _ in boxes):.3f} h {statistics.median(h for _, h in boxes):.3f}"
              f"  sqrt(area) {statistics.median((w * h) ** 0.5 for w, h in boxes):.3f} of the image")
    print("  objects per class:", dict(classes.most_common()))


def preview(root: Path, folder: Path, count: int = 2) -> list[Path]:
    """The held-out images with the most boxes, boxes drawn, to check by eye that labels line up."""
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    splits = dict(line.split("\t") for line in (root / "split.txt").read_text().splitlines())
    held = [image for image, split in sorted(splits.items()) if split != "train"]
    def rows(image: str) -> list[list[str]]:
        return [line.split() for line in (root / "labels" / f"{image.rsplit('.', 1)[0]}.txt").read_text().splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image in sorted(held, key=lambda i: -len(rows(i)))[:count]:
        with Image.open(root / "images" / image) as im:
            im = im.convert("RGB")
        draw = ImageDraw.Draw(im)
        for cls, xc, yc, w, h in rows(image):
            W, H = im.size
            xc, yc, w, h = float(xc) * W, float(yc) * H, float(w) * W, float(h) * H
            draw.rectangle([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], outline=(255, 0, 0), width=2)
            draw.text((xc - w / 2 + 2, yc - h / 2 + 1), names[int(cls)], fill=(255, 255, 0))
        path = folder / f"{root.name}-{image.rsplit('.', 1)[0]}.png"
        im.save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SOURCES))
    parser.add_argument("mirror", type=Path, help="bare git dir of the fetched repository")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--preview", type=Path, help="also draw the boxes of two held-out images into this folder")
    args = parser.parse_args(argv)
    if not (args.mirror / "objects").is_dir():
        sys.exit(f"{args.mirror} is not a bare git directory")
    root = build(args.name, args.mirror, args.out)
    describe(root)
    if args.preview:
        for path in preview(root, args.preview):
            print("  preview:", path)


if __name__ == "__main__":
    main()
