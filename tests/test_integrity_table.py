"""Issue 11, item 4 (one image reader, one policy), where the other tests leave a gap: the size limit is
the same in pack, predict and folder eval (test_imageio checks `decode_rgb` with an explicit limit only),
and one link policy for a class folder that is a link inside SRC."""

from __future__ import annotations

import pytest
from PIL import Image

from bcc.imageio import MAX_IMAGE_PIXELS, ImageError, collect_images

from conftest import image_bytes


def test_one_size_limit_in_pack_predict_and_folder_eval(tmp_path):
    """An image just over the limit (9,500 x 9,500, 1-bit: a few KiB on disk; only its header is read)
    is skipped by pack and refused by predict and folder eval with the same reason. Before, pack skipped
    it and predict decoded it with a warning (Pillow's own limit is a warning below 2x)."""
    from bcc.evaluate import _FolderDataset, scan_class_folders
    from bcc.pack import pack_folders
    from bcc.predict import read_image
    from bcc.taxonomy import Taxonomy

    side = 9_500
    assert MAX_IMAGE_PIXELS < side * side < 2 * MAX_IMAGE_PIXELS
    root = tmp_path / "src"
    (root / "Benign").mkdir(parents=True)
    big = root / "Benign" / "big.png"
    Image.new("1", (side, side)).save(big)
    (root / "Benign" / "ok.jpg").write_bytes(image_bytes(1, 16))
    reason = f"decompression bomb: {side * side} pixels > limit {MAX_IMAGE_PIXELS}"

    skipped = pack_folders(root, tmp_path / "packed", split=(1.0, 0.0, 0.0)).manifest["skipped"]
    assert skipped == [{"path": "Benign/big.png", "reason": reason}]
    with pytest.raises(ImageError, match=reason):
        read_image(big)
    items, _ = scan_class_folders(root, Taxonomy.default())
    got = {it.source: _FolderDataset(items, lambda img: img)[i]["error"] for i, it in enumerate(items)}
    assert got["Benign/ok.jpg"] is None and reason in got["Benign/big.png"]


def test_a_linked_class_folder_inside_src_is_read_alike_by_pack_predict_and_eval(tmp_path):
    """A class folder that is a link to a folder inside SRC: pack and folder eval read it; predict DIR
    said "symlinked folder not followed" (issue 11.4: one link policy). Links deeper down stay unfollowed."""
    from bcc.evaluate import scan_class_folders as eval_scan
    from bcc.imageio import scan_class_folders
    from bcc.taxonomy import Taxonomy

    root = tmp_path / "src"
    (root / "Benign" / "deep").mkdir(parents=True)
    (root / "Benign" / "a.jpg").write_bytes(image_bytes(1, 16))
    (root / ".store").mkdir()  # hidden: listed by nobody itself
    (root / ".store" / "b.jpg").write_bytes(image_bytes(2, 16))
    (root / "Pro-B").symlink_to((root / ".store").resolve())  # a class folder linked inside SRC
    (root / "Benign" / "deep" / "link").symlink_to((root / ".store").resolve())  # deeper: not followed
    (root / "Pre-B").symlink_to(root / "gone")  # a class folder link that leads nowhere: named everywhere
    taxonomy = Taxonomy.default()
    packed = {e.rel for e in scan_class_folders(root, taxonomy.resolve_folder)[0]}
    evaluated = {it.source for it in eval_scan(root, taxonomy)[0]}
    files, problems = collect_images([root])
    predicted = {f.relative_to(root).as_posix() for f in files}
    assert packed == evaluated == predicted == {"Benign/a.jpg", "Pro-B/b.jpg"}
    assert sorted(problems) == [(str(root / "Benign" / "deep" / "link"), "symlinked folder not followed"),
                                (str(root / "Pre-B"), f"broken symlink: -> {root.resolve() / 'gone'}")]
    assert {"path": "Pre-B", "reason": f"broken symlink: -> {root.resolve() / 'gone'}"} in \
        scan_class_folders(root, taxonomy.resolve_folder)[1]


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_a_non_finite_loss_is_named_by_its_own_step_without_a_host_copy_per_step(monkeypatch, accum):
    """Issue 11.12 over a grid (test_preempt checks one NaN through `fit`): wherever a nan/inf lands in the
    pending losses, `verify` names the optimizer step it belongs to; `add` never copies to the host."""
    import torch

    from bcc.train.epoch import LossWatch
    from bcc.train.setup import TrainError

    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in range(3 * accum):
            watch = LossWatch(first_step=11, accum=accum)
            with monkeypatch.context() as m:  # any host copy inside add() fails the test
                for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
                    m.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("a host copy in LossWatch.add"))
                for i in range(3 * accum):
                    watch.add(torch.tensor(bad if i == at else 0.5))
            with pytest.raises(TrainError, match=rf"^loss is {bad} at step {11 + at // accum} \(epoch 2\)"):
                watch.verify(epoch=1)
    watch = LossWatch(first_step=5, accum=accum)
    for _ in range(2 * accum):
        watch.add(torch.tensor(1.0))
    assert watch.mean(epoch=0) == 1.0 and watch.first_step == 7  # checked windows move the step on


def test_a_full_disk_inside_torch_save_is_one_error_naming_the_intact_checkpoint(tmp_path, monkeypatch):
    """As torch.save fails on a really full disk (found on a 5 MiB tmpfs): the file's write raises ENOSPC,
    then torch's zip writer raises RuntimeError from its __exit__. test_preflight's full-disk test makes
    torch.save raise the OSError itself, which the real one does not."""
    import errno
    import io
    import os

    import torch

    from bcc import checkpoint as ck

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 64:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

    manager = ck.CheckpointManager(tmp_path / "checkpoints", keep_last=2, keep_top_k=1, metric="bacc", mode="max")

    def ckpt(step):
        return ck.Checkpoint(model={"w": torch.ones(3) * step}, optimizer={"state": {0: torch.ones(1000)}},
                             scaler=None, rng=[], state=ck.TrainState(step=step), meta={})

    manager.save(ckpt(1), 0.5)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FullDisk(f), *a, **k))
    with pytest.raises(ck.CheckpointError) as info:
        manager.save(ckpt(2), 0.9)
    assert "No space left on device" in str(info.value) and "step-00000001 is intact" in str(info.value)


def test_a_full_disk_on_the_best_model_copy_is_one_error_naming_the_complete_checkpoint(tmp_path, monkeypatch):
    """model_best.safetensors is written after the step dir is in place; safetensors reports ENOSPC as
    its own error ("... (os error 28)"): one CheckpointError saying the checkpoint itself is complete."""
    import torch

    from bcc import checkpoint as ck
    from bcc import checkpoint_store

    manager = ck.CheckpointManager(tmp_path / "checkpoints", keep_last=2, keep_top_k=1, metric="bacc", mode="max")
    real = checkpoint_store._write_safetensors

    def full_disk_for_the_copy(tensors, path, what):
        if path.name == ck.BEST_WEIGHTS:
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, what)

    monkeypatch.setattr(checkpoint_store, "_write_safetensors", full_disk_for_the_copy)
    ckpt = ck.Checkpoint(model={"w": torch.ones(3)}, optimizer={}, scaler=None, rng=[], state=ck.TrainState(step=4),
                         meta={})
    with pytest.raises(ck.CheckpointError, match=r"step-00000004 is complete \(resume takes it\), but the best "
                                                 r"model's copy .*model_best.safetensors could not be written: No space"):
        manager.save(ckpt, 0.9)
    assert ck.find_latest_intact(tmp_path / "checkpoints")[0].name == "step-00000004"
