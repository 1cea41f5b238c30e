"""Label taxonomy: ordered heads, leaf classes, folder aliases and the hierarchical decision.

A taxonomy has one or more heads (each a list of labels); a head may be conditional on another
head's label (`when`). Leaf classes are the "combined" answer: each maps to one label per head,
-1 where the head does not apply. Class folders are matched to leaf classes through aliases,
case-insensitively. See docs/DESIGN.md for the YAML form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from bcc.errors import BccError

__all__ = ["Head", "LeafClass", "Taxonomy", "TaxonomyError"]



# the keys `bcc pack` writes into every sample's json (`bcc.pack_pool`, `bcc.shards.sample_members`): no head
# may take one of these names, or its target would overwrite the sample's own field
SAMPLE_META_KEYS = frozenset({"class", "folder", "source", "sha256", "label", "phash", "fold", "stored_crc32"})

class TaxonomyError(BccError, ValueError):
    """An invalid taxonomy, or a name the taxonomy does not know."""


@dataclass(frozen=True)
class Head:
    name: str
    labels: tuple[str, ...]
    when: tuple[str, str] | None = None  # (head, label) that must hold for this head to apply


@dataclass(frozen=True)
class LeafClass:
    name: str
    aliases: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]  # (head, label) pairs in head order


_DEFAULT = {
    "name": "all-4class",
    "heads": [
        {"name": "binary", "labels": ["Benign", "Malignant"]},
        {"name": "subtype", "labels": ["early Pre-B", "Pre-B", "Pro-B"], "when": {"binary": "Malignant"}},
    ],
    "classes": [
        {"name": "Benign", "aliases": ["Benign"], "targets": {"binary": "Benign"}},
        {
            "name": "early Pre-B",
            "aliases": ["Early", "early Pre-B", "[Malignant] early Pre-B"],
            "targets": {"binary": "Malignant", "subtype": "early Pre-B"},
        },
        {
            "name": "Pre-B",
            "aliases": ["Pre", "Pre-B", "[Malignant] Pre-B"],
            "targets": {"binary": "Malignant", "subtype": "Pre-B"},
        },
        {
            "name": "Pro-B",
            "aliases": ["Pro", "Pro-B", "[Malignant] Pro-B"],
            "targets": {"binary": "Malignant", "subtype": "Pro-B"},
        },
    ],
}

# Kaggle-style folder names carry the root label in brackets: "[Malignant] Pro-B", "[Benign] Benign".
_BRACKET_PREFIX = re.compile(r"^\[([^\]]+)\]\s*(.+)$")


def _fold(name: str) -> str:
    return " ".join(name.split()).casefold()


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise TaxonomyError(f"{what} must be a non-empty list of names, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise TaxonomyError(f"{what} must hold non-empty strings, got {item!r}")
    return tuple(value)


def _check_keys(d: Mapping, allowed: set[str], what: str) -> None:
    if not isinstance(d, Mapping):
        raise TaxonomyError(f"{what} must be a mapping, got {d!r}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise TaxonomyError(f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class Taxonomy:
    """Heads, leaf classes and aliases; construct with `default`, `from_yaml` or `from_dict`."""

    name: str
    heads: tuple[Head, ...]
    classes: tuple[LeafClass, ...]

    def __post_init__(self) -> None:
        self._validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def default(cls) -> Taxonomy:
        """The ALL task: binary (Benign/Malignant) and a subtype head conditional on Malignant."""
        return cls.from_dict(_DEFAULT)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Taxonomy:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise TaxonomyError(f"cannot read taxonomy file {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise TaxonomyError(f"invalid YAML in taxonomy file {path}: {e}") from e
        try:
            return cls.from_dict(data)
        except TaxonomyError as e:
            raise TaxonomyError(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Taxonomy:
        _check_keys(d, {"name", "heads", "classes"}, "taxonomy")
        name = d.get("name", "taxonomy")
        if not isinstance(name, str) or not name:
            raise TaxonomyError(f"taxonomy name must be a non-empty string, got {name!r}")
        raw_heads = d.get("heads")
        if not isinstance(raw_heads, Sequence) or isinstance(raw_heads, str) or not raw_heads:
            raise TaxonomyError("taxonomy needs a non-empty list 'heads'")
        heads = []
        for i, h in enumerate(raw_heads):
            _check_keys(h, {"name", "labels", "when"}, f"heads[{i}]")
            if not isinstance(h.get("name"), str) or not h["name"]:
                raise TaxonomyError(f"heads[{i}] needs a non-empty 'name'")
            labels = _str_list(h.get("labels"), f"labels of head {h['name']!r}")
            when = h.get("when")
            if when is not None:
                if not isinstance(when, Mapping) or len(when) != 1:
                    raise TaxonomyError(
                        f"'when' of head {h['name']!r} must be one {{head: label}} pair, got {when!r}"
                    )
                when = tuple(next(iter(when.items())))
            heads.append(Head(h["name"], labels, when))

        raw_classes = d.get("classes")
        if raw_classes is None:
            if len(heads) != 1:
                raise TaxonomyError("'classes' may only be omitted for a single-head taxonomy")
            head = heads[0]
            classes = [LeafClass(lab, (lab,), ((head.name, lab),)) for lab in head.labels]
        else:
            if not isinstance(raw_classes, Sequence) or isinstance(raw_classes, str) or not raw_classes:
                raise TaxonomyError("'classes' must be a non-empty list")
            classes = []
            for i, c in enumerate(raw_classes):
                _check_keys(c, {"name", "aliases", "targets"}, f"classes[{i}]")
                cname = c.get("name")
                if not isinstance(cname, str) or not cname:
                    raise TaxonomyError(f"classes[{i}] needs a non-empty 'name'")
                aliases = _str_list(c.get("aliases", [cname]), f"aliases of class {cname!r}")
                targets = c.get("targets")
                if not isinstance(targets, Mapping) or not targets:
                    raise TaxonomyError(f"class {cname!r} needs a non-empty 'targets' mapping")
                # keep head order so equal taxonomies compare equal
                order = {h.name: k for k, h in enumerate(heads)}
                pairs = sorted(targets.items(), key=lambda kv: order.get(kv[0], len(order)))
                classes.append(LeafClass(cname, aliases, tuple((str(k), v) for k, v in pairs)))
        return cls(name, tuple(heads), tuple(classes))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that `from_dict` turns back into an equal taxonomy."""
        heads = []
        for h in self.heads:
            entry: dict[str, Any] = {"name": h.name, "labels": list(h.labels)}
            if h.when is not None:
                entry["when"] = {h.when[0]: h.when[1]}
            heads.append(entry)
        classes = [
            {"name": c.name, "aliases": list(c.aliases), "targets": dict(c.targets)} for c in self.classes
        ]
        return {"name": self.name, "heads": heads, "classes": classes}

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        heads: dict[str, Head] = {}
        for h in self.heads:
            if h.name in heads:
                raise TaxonomyError(f"duplicate head {h.name!r}")
            if h.name in SAMPLE_META_KEYS:  # a head's target sits beside these keys in each sample's json
                raise TaxonomyError(f"head name {h.name!r} is reserved (sample metadata key)")
            if len(set(h.labels)) != len(h.labels):
                raise TaxonomyError(f"duplicate label in head {h.name!r}: {list(h.labels)}")
            if h.when is not None:
                on, label = h.when
                if on not in heads:
                    raise TaxonomyError(
                        f"head {h.name!r} is conditional on {on!r}, which is not an earlier head "
                        f"(earlier heads: {list(heads)})"
                    )
                if label not in heads[on].labels:
                    raise TaxonomyError(
                        f"head {h.name!r}: condition label {label!r} is not in head {on!r} "
                        f"{list(heads[on].labels)}"
                    )
            heads[h.name] = h

        names: set[str] = set()
        alias_owner: dict[str, str] = {}
        seen_targets: dict[tuple[int, ...], str] = {}
        for c in self.classes:
            if c.name in names:
                raise TaxonomyError(f"duplicate class {c.name!r}")
            names.add(c.name)
            for alias in {c.name, *c.aliases}:
                key = _fold(alias)
                if key in alias_owner and alias_owner[key] != c.name:
                    raise TaxonomyError(
                        f"duplicate alias {alias!r}: used by classes {alias_owner[key]!r} and {c.name!r}"
                    )
                alias_owner[key] = c.name
            targets = dict(c.targets)
            for head_name, label in c.targets:
                if head_name not in heads:
                    raise TaxonomyError(
                        f"class {c.name!r} targets unknown head {head_name!r}; heads: {list(heads)}"
                    )
                if label not in heads[head_name].labels:
                    raise TaxonomyError(
                        f"class {c.name!r}: label {label!r} is not in head {head_name!r} "
                        f"{list(heads[head_name].labels)}"
                    )
            # every head that applies to the class needs a label, and no other head may have one
            for h in self.heads:
                applies = h.when is None or targets.get(h.when[0]) == h.when[1]
                if applies and h.name not in targets:
                    raise TaxonomyError(f"class {c.name!r} needs a label for head {h.name!r}")
                if not applies and h.name in targets:
                    raise TaxonomyError(
                        f"class {c.name!r} labels head {h.name!r}, which only applies when "
                        f"{h.when[0]} = {h.when[1]!r}"
                    )
            row = tuple(self._label_index(h, targets.get(h.name)) for h in self.heads)
            if row in seen_targets:
                raise TaxonomyError(f"classes {seen_targets[row]!r} and {c.name!r} have the same targets")
            seen_targets[row] = c.name

    @staticmethod
    def _label_index(head: Head, label: str | None) -> int:
        return -1 if label is None else head.labels.index(label)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def head_sizes(self) -> dict[str, int]:
        return {h.name: len(h.labels) for h in self.heads}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def known_names(self) -> list[str]:
        """Every folder name `resolve_folder` accepts (aliases and class names)."""
        out: list[str] = []
        for c in self.classes:
            for n in (*c.aliases, c.name):
                if n not in out:
                    out.append(n)
        return out

    def resolve_folder(self, name: str) -> int:
        """Leaf class index of a class folder name; unknown names raise `TaxonomyError`."""
        index = self._alias_index.get(_fold(name))
        if index is None:
            # "[Malignant] Pro-B": accept the bracket prefix when it is one of the class's own labels
            m = _BRACKET_PREFIX.match(name.strip())
            if m:
                inner = self._alias_index.get(_fold(m.group(2)))
                if inner is not None and _fold(m.group(1)) in {
                    _fold(lab) for _, lab in self.classes[inner].targets
                }:
                    index = inner
        if index is None:
            from bcc.imageio import display_path  # a name that is not UTF-8 as `\xNN`, not a surrogate

            raise TaxonomyError(
                f"unknown class folder '{display_path(name)}' for taxonomy {self.name!r}; known names: "
                + ", ".join(repr(n) for n in self.known_names())
            )
        return index

    @cached_property
    def _alias_index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            for alias in (c.name, *c.aliases):
                index[_fold(alias)] = i
        return index

    def targets(self, class_index: int) -> dict[str, int]:
        """Head -> label index for a leaf class (-1 where the head does not apply)."""
        if not 0 <= class_index < len(self.classes):
            raise TaxonomyError(f"class index {class_index} out of range [0, {len(self.classes)})")
        t = dict(self.classes[class_index].targets)
        return {h.name: self._label_index(h, t.get(h.name)) for h in self.heads}

    def target_table(self):
        """LongTensor[C, H]: label index per class and head (-1 = not applicable)."""
        import torch

        rows = [list(self.targets(i).values()) for i in range(len(self.classes))]
        return torch.tensor(rows, dtype=torch.long)

    def decide(self, outputs: Sequence[Any]):
        """Combined class index (LongTensor[N]) of the hierarchical decision.

        `outputs` holds one [N, head_size] tensor of logits or probabilities per head, in head order.
        Root heads decide by argmax; a conditional head only counts when its condition holds.
        Predictions that match no leaf class give -1.
        """
        import torch

        if len(outputs) != len(self.heads):
            raise TaxonomyError(f"decide() needs {len(self.heads)} outputs (one per head), got {len(outputs)}")
        preds = torch.stack([o.argmax(dim=-1) for o in outputs], dim=1)  # [N, H]
        active = torch.ones_like(preds, dtype=torch.bool)
        col = {h.name: k for k, h in enumerate(self.heads)}
        for k, h in enumerate(self.heads):
            if h.when is not None:
                j = col[h.when[0]]
                wanted = self.heads[j].labels.index(h.when[1])
                active[:, k] = active[:, j] & (preds[:, j] == wanted)
        effective = torch.where(active, preds, torch.full_like(preds, -1))
        table = self.target_table().to(preds.device)  # [C, H]
        match = (effective[:, None, :] == table[None, :, :]).all(dim=2)  # [N, C]
        found = match.any(dim=1)
        index = match.to(torch.long).argmax(dim=1)
        return torch.where(found, index, torch.full_like(index, -1))
