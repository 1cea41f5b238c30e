"""Several packed datasets trained as one (`data.sources`), and the data a run reads (`load_data`).

A `MixedManifest` is the manifest view of the sources: each split is the sources' splits concatenated
in config order (their shards and counts; a split is there when every source has it), the taxonomy is
the one they share. Readers take it where they take a `Manifest`; what is per source lives here:
- `shard_weights(manifest, split)`: each shard's weight, its source's (1 for a plain manifest). The
  stream's plan repeats a shard that many times per epoch (`data.sampling=without_replacement`) or draws
  it with probability proportional to weight x count (`resample`), see `bcc.plan`.
- `weighted_class_counts(...)`: the class counts the epoch trains on (sum of weight x count), the input
  of `loss.class_weights: auto`.
- `MixedManifest.sources`: each source's name, weight and own manifest, for per-source evaluation and
  the run log.

open_clip's `--train-data "a::b" --train-data-upsampling-factors "1::3"` is the model (there the
factor scales a source's share of resampled shards); bcc adds the exact one-pass meaning of integer
weights and requires the sources to share one taxonomy, since the labels are class indices (heads,
class names and targets equal; a taxonomy's `name` and folder aliases may differ, the first source's
taxonomy is the run's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bcc import remote
from bcc.config import DataConfig, source_name
from bcc.errors import BccError
from bcc.manifest import Manifest, ShardInfo, SplitInfo, parse_format

__all__ = ["MixedManifest", "Source", "SourceError", "load_data", "shard_weights", "source_counts",
           "weighted_class_counts"]


class SourceError(BccError, ValueError):
    """Sources that cannot be trained together (taxonomies differ, a fold asked of several sources)."""


def _difference(a: Manifest, b: Manifest) -> str | None:
    """What makes two sources' labels mean different things (heads, class names and order, targets), or
    None. A taxonomy's `name` and its classes' folder `aliases` may differ: the labels mean the same."""
    ta, tb = a.taxonomy.to_dict(), b.taxonomy.to_dict()
    if ta["heads"] != tb["heads"]:
        return f"heads {ta['heads']} vs {tb['heads']}"
    if a.classes != b.classes or [c["name"] for c in ta["classes"]] != [c["name"] for c in tb["classes"]]:
        return f"classes {list(a.classes)} vs {list(b.classes)}"
    for ca, cb in zip(ta["classes"], tb["classes"], strict=True):
        if ca["targets"] != cb["targets"]:
            return f"class '{ca['name']}': targets {ca['targets']} vs {cb['targets']}"
    return None


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    manifest: Manifest

    @property
    def label(self) -> str:
        """The source as messages name it: its name and its manifest's location (redacted), since a name
        taken from a path can say little (`pA/manifest.json` is named 'manifest.json')."""
        return f"'{self.name}' ({self.manifest.shown})"


class MixedManifest(Manifest):
    """The manifest view of several sources (see the module docstring); built by `load_data`."""

    def __init__(self, sources: Sequence[Source]):  # noqa: D107 - no call to Manifest.__init__: nothing to parse
        first = sources[0].manifest
        for other in sources[1:]:
            m = other.manifest
            what = _difference(first, m)
            if what:
                raise SourceError(
                    f"data.sources: the taxonomies of '{sources[0].name}' ({first.shown}) and '{other.name}' "
                    f"({m.shown}) differ ({what}); sources trained as one must be packed with the same "
                    "taxonomy (bcc pack --taxonomy)")
        self.sources = tuple(sources)
        self.root = first.root
        self.path = "data.sources (" + ", ".join(f"{s.name}: {s.manifest.shown}" for s in sources) + ")"
        self.taxonomy = first.taxonomy
        self.data = {"format": min((s.manifest.data["format"] for s in sources), key=_version),
                     "classes": list(first.classes), "taxonomy": first.taxonomy.to_dict(), "splits": {}}
        names = [n for n in first.splits if all(n in s.manifest.splits for s in sources)]
        self._splits = {n: _concat(n, [s.manifest.split(n) for s in sources]) for n in names}
        self._weights = {n: [s.weight for s in sources for _ in s.manifest.split(n).shards] for n in names}

    def with_fold(self, fold, **_) -> Manifest:
        if fold is None:
            return self
        raise SourceError("data.fold: cross-validation folds are per pack; with data.sources set data.fold to null")


def _version(fmt: str) -> int:
    return parse_format(fmt) or 0


def _concat(name: str, splits: Sequence[SplitInfo]) -> SplitInfo:
    shards: list[ShardInfo] = [sh for s in splits for sh in s.shards]
    counts: dict[str, int] = {}
    for s in splits:
        for c, n in s.class_counts.items():
            counts[c] = counts.get(c, 0) + n
    return SplitInfo(name, sum(s.count for s in splits), counts, shards)


def load_data(data: DataConfig) -> Manifest:
    """The manifest a run reads: `data.shards`' (its `data.fold` view), or the `MixedManifest` of
    `data.sources`. Raises ManifestError (a missing or broken manifest) or SourceError."""
    # `pipe:` entries of a manifest run only when the user allows it; remote manifests are fetched with retries
    opts = {"allow_pipe": data.allow_pipe_in_manifest, "retries": data.retries, "timeout_s": data.read_timeout_s}
    if not data.sources:
        return Manifest.load(data.shards, **opts).with_fold(data.fold, train=data.train_split, val=data.val_split)
    for i, s in enumerate(data.sources):  # every location checked before any is fetched
        try:
            remote.check_no_secrets(s.shards, f"data.sources[{i}].shards")
        except remote.RemoteError as e:
            raise SourceError(str(e)) from None
    sources = [Source(source_name(s), s.weight, Manifest.load(s.shards, **opts, key=f"data.sources[{i}].shards"))
               for i, s in enumerate(data.sources)]  # each named by its own key
    return MixedManifest(sources).with_fold(data.fold)


def shard_weights(manifest: Manifest, split: str) -> list[float]:
    """Each shard's weight in `split`, in the split's shard order (all 1 for a plain manifest)."""
    if isinstance(manifest, MixedManifest):
        manifest.split(split)  # the usual error for a split that is not there
        return list(manifest._weights[split])
    return [1.0] * len(manifest.split(split).shards)


def weighted_class_counts(manifest: Manifest, split: str) -> dict[str, int | float]:
    """Class counts of `split` with each source's samples counted weight times: what an epoch trains on
    (exactly, for without_replacement; in expectation, for resample)."""
    if not isinstance(manifest, MixedManifest):
        return dict(manifest.split(split).class_counts)
    out: dict[str, int | float] = {}
    for s in manifest.sources:
        for c, n in s.manifest.split(split).class_counts.items():
            weight = int(s.weight) if s.weight == int(s.weight) else s.weight
            out[c] = out.get(c, 0) + weight * n
    return out


def source_counts(manifest: Manifest, splits: Sequence[str]) -> list[dict]:
    """One dict per source: name, weight, shards (its path) and the sample count of each of `splits`
    it has (for the run log)."""
    sources = manifest.sources if isinstance(manifest, MixedManifest) else (Source("", 1.0, manifest),)
    out = []
    for s in sources:
        row: dict = {"source": s.name or Path(s.manifest.root).name, "weight": s.weight,
                     "shards": remote.display(s.manifest.root)}
        row.update({f"{n}_samples": s.manifest.split(n).count for n in splits if n in s.manifest.splits})
        out.append(row)
    return out


def sources_of(manifest: Manifest) -> Mapping[str, Manifest]:
    """Source name -> its manifest, for per-source evaluation ({} for a plain manifest)."""
    return {s.name: s.manifest for s in manifest.sources} if isinstance(manifest, MixedManifest) else {}
