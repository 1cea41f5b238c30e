"""Files the commands read at run time, shipped inside the package (so a wheel install works too).

    demo.yaml              the `bcc demo` training config
    taxonomy/<name>.yaml   named taxonomies: `bcc pack --taxonomy kvasir`

They are read through `importlib.resources`, never by a path relative to the source tree. These are
the canonical copies; `configs/demo.yaml` and `configs/taxonomy/*.yaml` in the repository are copies
for users to read and edit, and `tests/test_resources.py` checks that they stay byte-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from bcc.taxonomy import Taxonomy, TaxonomyError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["demo_config", "load_taxonomy", "resource_file", "taxonomy_names"]


def _root() -> Traversable:
    return resources.files(__name__)


@contextlib.contextmanager
def resource_file(relative: str) -> Iterator[Path]:
    """A real filesystem path of a shipped file for the duration of the `with` (e.g. to hand it to a
    subprocess); a zipped install gets a temporary copy. A name that is not shipped is a FileNotFoundError."""
    item = _root().joinpath(*relative.split("/"))
    if not item.is_file():
        raise FileNotFoundError(f"bcc ships no resource {relative!r}")
    with resources.as_file(item) as path:
        yield path


def demo_config() -> contextlib.AbstractContextManager[Path]:
    """`with demo_config() as path:` the shipped `bcc demo` config."""
    return resource_file("demo.yaml")


def _taxonomy_files() -> dict[str, Traversable]:
    return {f.name[: -len(".yaml")]: f for f in _root().joinpath("taxonomy").iterdir() if f.name.endswith(".yaml")}


def taxonomy_names() -> list[str]:
    """Names of the shipped taxonomies (file stems, e.g. `all_4class`, `kvasir`)."""
    return sorted(_taxonomy_files())


def load_taxonomy(spec: str | Path) -> Taxonomy:
    """A taxonomy from a YAML file, or a shipped one by name: its file stem (`kvasir`) or the name it
    declares (`kvasir-v1`). An existing file wins over a name; anything else is a `TaxonomyError`
    listing the shipped names."""
    path = Path(spec)
    if path.is_file() or path.suffix.lower() in (".yaml", ".yml") or len(path.parts) > 1:
        return Taxonomy.from_yaml(path)
    files = _taxonomy_files()
    if str(spec) in files:
        return _load(files[str(spec)])
    for f in files.values():
        taxonomy = _load(f)
        if taxonomy.name == str(spec):
            return taxonomy
    raise TaxonomyError(
        f"taxonomy {str(spec)!r} is neither a file nor a shipped taxonomy; shipped: {', '.join(sorted(files))}"
    )


def _load(item: Traversable) -> Taxonomy:
    with resources.as_file(item) as path:
        return Taxonomy.from_yaml(path)
