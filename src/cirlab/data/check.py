"""`cirlab data check`: what of a benchmark is present under a data root, and what is missing."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cirlab.errors import CirlabError

SPLITS = {
    "cirr": ("train", "val", "test1"),
    "fashioniq": ("train", "val", "test"),
    "circo": ("val", "test"),
    "shoes": ("train", "test"),
    "synth": ("train", "val", "test1"),
}


@dataclass
class DataReport:
    dataset: str
    root: str
    annotations: dict = field(default_factory=dict)  # relative path -> present
    images_found: int = 0
    images_missing: int = 0
    missing_examples: list = field(default_factory=list)
    extensions: dict = field(default_factory=dict)  # suffix -> count among found images
    problems: list = field(default_factory=list)  # annotation files that could not be read

    @property
    def ok(self) -> bool:
        return all(self.annotations.values()) and not self.images_missing and not self.problems

    def lines(self) -> list:
        out = [f"{self.dataset} at {self.root}"]
        for rel, present in self.annotations.items():
            out.append(f"  {'ok     ' if present else 'MISSING'} {rel}")
        out.append(f"  images: {self.images_found} found, {self.images_missing} missing"
                   + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.extensions.items()))})"
                      if self.extensions else ""))
        if self.missing_examples:
            out.append("  first missing: " + ", ".join(self.missing_examples))
        out += [f"  problem: {p}" for p in self.problems]
        return out


def _annotation_files(dataset: str) -> list:
    if dataset in ("cirr", "synth"):
        return [f"captions/cap.rc2.{s}.json" for s in SPLITS["cirr"]] + \
            [f"image_splits/split.rc2.{s}.json" for s in SPLITS["cirr"]]
    if dataset == "fashioniq":
        from cirlab.data.fashioniq import CATEGORIES

        return [f"{kind}.{c}.{s}.json" for kind in ("captions/cap", "image_splits/split") for c in CATEGORIES
                for s in SPLITS["fashioniq"]]
    if dataset == "circo":
        return ["annotations/val.json", "annotations/test.json"]
    if dataset == "shoes":
        return ["relative_captions_shoes.json", "train_im_names.txt", "eval_im_names.txt"]
    raise CirlabError(f"unknown dataset {dataset!r}; choose one of {', '.join(SPLITS)}")


def check_data(dataset: str, root, examples: int = 5) -> DataReport:
    """Annotation files present, and every gallery image of every readable split found or missing."""
    from cirlab.data.readers import circo_gallery_listing, read_split

    root = Path(root)
    if not root.exists():
        raise CirlabError(f"data root not found: {root}")
    report = DataReport(dataset, str(root))
    ann = root
    if dataset in ("cirr", "synth"):
        from cirlab.data.readers import cirr_roots

        ann = cirr_roots(root)[0]
    for rel in _annotation_files(dataset):
        report.annotations[str((ann / rel).relative_to(root))] = (ann / rel).exists()
    if dataset == "circo":
        listing = circo_gallery_listing(root)[0]
        report.annotations[str(listing.relative_to(root))] = listing.exists()
    paths: dict = {}
    for split in SPLITS[dataset]:
        try:
            paths |= read_split(dataset, root, split).gallery
        except CirlabError as e:
            if "not found" not in str(e):
                report.problems.append(str(e))
    for name, path in sorted(paths.items()):
        p = Path(path)
        if p.exists():
            report.images_found += 1
            report.extensions[p.suffix.lower()] = report.extensions.get(p.suffix.lower(), 0) + 1
        else:
            report.images_missing += 1
            if len(report.missing_examples) < examples:
                report.missing_examples.append(str(p.relative_to(root)) if p.is_relative_to(root) else str(p))
    return report
