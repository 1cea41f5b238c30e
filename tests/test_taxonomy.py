from pathlib import Path

import pytest
import torch

from bcc.taxonomy import Taxonomy, TaxonomyError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "taxonomy"


def test_default_matches_design():
    t = Taxonomy.default()
    assert t.head_names == ("binary", "subtype")
    assert t.head_sizes == {"binary": 2, "subtype": 3}
    assert list(t.head_sizes) == ["binary", "subtype"]
    assert t.class_names == ("Benign", "early Pre-B", "Pre-B", "Pro-B")
    assert t.targets(0) == {"binary": 0, "subtype": -1}
    assert t.targets(3) == {"binary": 1, "subtype": 2}
    assert t.target_table().tolist() == [[0, -1], [1, 0], [1, 1], [1, 2]]
    assert t.target_table().dtype == torch.long


def test_yaml_files_round_trip():
    t = Taxonomy.from_yaml(CONFIGS / "all_4class.yaml")
    assert t == Taxonomy.default()
    assert Taxonomy.from_dict(t.to_dict()) == t
    k = Taxonomy.from_yaml(CONFIGS / "kvasir.yaml")
    assert len(k.class_names) == 8 and k.head_names == ("finding",)
    assert k.resolve_folder("Normal-Z-Line") == k.class_names.index("normal-z-line")
    assert k.targets(6) == {"finding": 6}
    assert Taxonomy.from_dict(k.to_dict()) == k


@pytest.mark.parametrize(
    "folder, cls",
    [("Benign", 0), ("benign", 0), ("Early", 1), ("early pre-b", 1), ("[Malignant] early Pre-B", 1),
     ("Pre", 2), ("PRE-B", 2), ("[malignant]  Pre-B", 2), ("Pro", 3), ("[Malignant] Pro-B", 3),
     ("[Benign] Benign", 0)],
)
def test_resolve_folder_aliases(folder, cls):
    assert Taxonomy.default().resolve_folder(folder) == cls


def test_unknown_folder_lists_known_names():
    t = Taxonomy.default()
    with pytest.raises(TaxonomyError, match="'Weird'") as e:
        t.resolve_folder("Weird")
    assert "'Early'" in str(e.value) and "'Benign'" in str(e.value)
    with pytest.raises(TaxonomyError):  # the bracket must name one of the class's own labels
        t.resolve_folder("[Benign] Pro-B")


def test_decide_is_hierarchical():
    t = Taxonomy.default()
    binary = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.1, 0.9]])
    subtype = torch.tensor([[0.0, 0.0, 9.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # sample 0: benign wins, its subtype logits are ignored
    assert t.decide([binary, subtype]).tolist() == [0, 2, 1, 3]
    k = Taxonomy.from_yaml(CONFIGS / "kvasir.yaml")
    assert k.decide([torch.eye(8)]).tolist() == list(range(8))


def _base():
    return Taxonomy.default().to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["classes"][1]["targets"].update(stage="x"), "unknown head 'stage'"),
        (lambda d: d["classes"][1]["targets"].update(subtype="Mid-B"), "'Mid-B' is not in head 'subtype'"),
        (lambda d: d["classes"][2]["aliases"].append("early"), "duplicate alias"),
        (lambda d: d["classes"].append(dict(d["classes"][0])), "duplicate class"),
        (lambda d: d["heads"][1].update(when={"stage": "x"}), "not an earlier head"),
        (lambda d: d["heads"][1].update(when={"binary": "Maybe"}), "'Maybe' is not in head 'binary'"),
        (lambda d: d["classes"][0]["targets"].update(subtype="Pro-B"), "only applies when"),
        (lambda d: d["classes"][1]["targets"].pop("subtype"), "needs a label for head 'subtype'"),
        (lambda d: d["classes"][3]["targets"].update(subtype="Pre-B"), "have the same targets"),
        (lambda d: d.pop("classes"), "single-head"),
        (lambda d: d.update(colour="red"), "unknown key"),
        (lambda d: d["heads"][0].update(labels=[]), "non-empty list"),
        # every key a packed sample's json holds: a head so named would overwrite the sample's own field
        *[(lambda d, k=key: d["heads"][1].update(name=k), f"head name '{key}' is reserved")
          for key in ("class", "folder", "source", "sha256", "label", "phash", "fold", "stored_crc32")],
    ],
)
def test_validation_errors(mutate, message):
    d = _base()
    mutate(d)
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.from_dict(d)


def test_from_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads: [{name: a, labels: [x, x]}]\n")
    with pytest.raises(TaxonomyError, match="bad.yaml.*duplicate label"):
        Taxonomy.from_yaml(bad)
    with pytest.raises(TaxonomyError, match="missing.yaml"):
        Taxonomy.from_yaml(tmp_path / "missing.yaml")
