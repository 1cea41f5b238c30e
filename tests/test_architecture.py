"""The layers and owners of docs/DESIGN.md, checked on the source itself (ast, no imports): the library
never imports the CLI and holds no argument parser, every exception class derives from BccError, the
training package never calls the inference stack, and each format or helper is written in one place.
A failure names the file and line that broke the rule."""

from __future__ import annotations

import ast
import builtins
import functools
from pathlib import Path

import pytest

BCC = Path(__file__).resolve().parents[1] / "bcc"
# the entry points: `bcc` (bcc/__main__.py -> bcc.cli) and the `python -m bcc.train` shim
ENTRY_SHIMS = {"__main__.py", "train/__main__.py"}


def _modules() -> dict[str, ast.Module]:
    return {p.relative_to(BCC).as_posix(): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
            for p in sorted(BCC.rglob("*.py"))}


MODULES = _modules()
# one walk of each tree, shared by the tests (a walk of ~100 modules per test would cost seconds each)
NODES = {name: list(ast.walk(tree)) for name, tree in MODULES.items()}


def _library() -> dict[str, ast.Module]:
    return {name: tree for name, tree in MODULES.items() if not name.startswith("cli/") and name not in ENTRY_SHIMS}


@functools.cache
def _module_imports(name: str) -> list[tuple[int, str]]:
    return _imports(MODULES[name])


@functools.cache
def _module_calls(name: str) -> list[tuple[int, str]]:
    return _calls(MODULES[name])


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import, at any depth (imports inside functions count too)."""
    found = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from bcc import cli`
    return found


def _walk(tree: ast.AST) -> list[ast.AST]:
    """`ast.walk(tree)`, from the shared walk when `tree` is a whole module."""
    return NODES.get(_NAME_OF.get(id(tree)), None) or list(ast.walk(tree))


_NAME_OF = {id(tree): name for name, tree in MODULES.items()}


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_whole_package():
    assert {"errors.py", "cli/__init__.py", "train/fit.py", "train/epoch.py", "bench/step.py"} <= set(MODULES)
    assert len(_library()) > 60


def test_no_library_module_imports_the_cli():
    bad = [f"bcc/{name}:{line} imports {mod}" for name, tree in _library().items()
           for line, mod in _module_imports(name) if _is_under(mod, "bcc.cli")]
    assert not bad, "the library must not import bcc.cli (only bcc/cli/* and the entry shims):\n" + "\n".join(bad)


def test_every_argparse_parser_lives_in_bcc_cli():
    bad = [f"bcc/{name}:{line} imports {mod}" for name, tree in _library().items()
           for line, mod in _module_imports(name) if _is_under(mod, "argparse")]
    bad += [f"bcc/{name}:{node.lineno} uses ArgumentParser" for name, tree in _library().items()
            for node in _walk(tree)
            if isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) == "ArgumentParser"]
    assert not bad, "argument parsers belong in bcc/cli/:\n" + "\n".join(bad)


def test_python_m_bcc_evaluate_is_no_entry_point():
    """`python -m bcc.evaluate` went (bcc eval stays): the module may only say where the command went."""
    tree = MODULES["evaluate.py"]
    mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    for block in mains:
        calls = {ast.unparse(c.func) for c in ast.walk(block) if isinstance(c, ast.Call)}
        assert calls <= {"print", "sys.exit"}, f"bcc/evaluate.py's __main__ block does work: {sorted(calls)}"


def _class_defs() -> list[tuple[str, ast.ClassDef]]:
    """Every class bcc defines, nested ones (in functions, in classes) included."""
    return [(name, node) for name, tree in MODULES.items() for node in _walk(tree) if isinstance(node, ast.ClassDef)]


def _base_names(node: ast.ClassDef) -> set[str]:
    return {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}


def test_every_exception_class_derives_from_bcc_error():
    """Exception classes are found from their bases (builtin exceptions, or other exception classes of
    bcc, to a fixed point), so a class that derives from ValueError alone, or is defined inside a
    function, is caught as well as a module-level one."""
    builtin_errors = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    classes = _class_defs()
    exceptions, bcc_errors = set(builtin_errors), {"BccError"}
    changed = True
    while changed:
        changed = False
        for _, node in classes:
            bases = _base_names(node)
            if bases & exceptions and node.name not in exceptions:
                exceptions.add(node.name)
                changed = True
            if bases & bcc_errors and node.name not in bcc_errors:
                bcc_errors.add(node.name)
                changed = True
    ours = [(name, node) for name, node in classes if node.name in exceptions]
    assert len(ours) > 20, "the walk found too few exception classes: is the base detection broken?"
    bad = [f"bcc/{name}:{node.lineno} {node.name}({', '.join(sorted(_base_names(node)))})"
           for name, node in ours if node.name not in bcc_errors and node.name != "BccError"]
    assert not bad, "every exception class bcc defines must derive from bcc.errors.BccError:\n" + "\n".join(bad)


def test_bcc_error_is_caught_in_one_place():
    """`bcc.cli.call` is the one `except BccError` of the entry points (bcc and python -m bcc.train)."""
    catches = [f"bcc/{name}:{node.lineno}" for name, tree in MODULES.items() if name.startswith("cli/")
               or name in ENTRY_SHIMS for node in _walk(tree) if isinstance(node, ast.ExceptHandler)
               and node.type is not None and "BccError" in ast.unparse(node.type)]
    assert catches == ["bcc/cli/__init__.py:" + str(_line_of("cli/__init__.py", "call", ast.ExceptHandler))], catches


def _line_of(module: str, function: str, kind: type) -> int:
    fn = next(n for n in ast.walk(MODULES[module]) if isinstance(n, ast.FunctionDef) and n.name == function)
    return next(n.lineno for n in ast.walk(fn) if isinstance(n, kind))


INFERENCE_STACK = ("bcc.predict", "bcc.evaluate", "bcc.export", "bcc.export_hf", "bcc.gradcam", "bcc.report")


def test_training_never_calls_the_inference_stack():
    """Calibration and the operating point at the end of training are fitted on every rank from the
    training eval path's val logits (bcc.train.val_fit.calibrate_in_memory), never by reloading the best
    checkpoint through predict/evaluate."""
    bad = [f"bcc/{name}:{line} imports {mod}" for name, tree in MODULES.items() if name.startswith("train/")
           for line, mod in _module_imports(name) if any(_is_under(mod, s) for s in INFERENCE_STACK)]
    assert not bad, "\n".join(bad)


def _calls(tree: ast.Module) -> list[tuple[int, str]]:
    return [(n.lineno, ast.unparse(n.func)) for n in _walk(tree) if isinstance(n, ast.Call)]


# (what, the test on an import or call, the modules allowed to do it)
OWNERS = [
    ("a file renamed into place (tmp-then-rename)", lambda mod, call: call in ("os.replace", "os.rename"),
     # files: bcc.atomic; checkpoint directories and their links; the packed OUT directory committed whole
     {"atomic.py", "checkpoint_store.py", "pack.py"}),
    # the tar bytes of a shard are written by bcc.tar_writer, read and verified by bcc.shards
    ("tar reading/writing", lambda mod, call: _is_under(mod, "tarfile"), {"shards.py", "tar_writer.py"}),
    ("image decoding (PIL)", lambda mod, call: call.endswith("Image.open"), {"imageio.py"}),
    ("ECE", lambda mod, call: "calibration_error" in mod or "calibration_error" in call, {"calibration.py"}),
    ("AUROC", lambda mod, call: "auroc" in mod.lower() or "roc_auc" in call, {"metrics.py"}),
    ("the leaf decision without its fallback", lambda mod, call: call.endswith("taxonomy.decide"), {"metrics.py"}),
    ("tracker logging (the one `RunLog.log(row, step)` seam)", lambda mod, call: call.endswith("accelerator.log"),
     {"train/runlog.py"}),
]


@pytest.mark.parametrize("what,is_use,owners", OWNERS, ids=[o[0] for o in OWNERS])
def test_one_owner_per_helper(what, is_use, owners):
    bad = []
    for name in MODULES:
        if name in owners:
            continue
        bad += [f"bcc/{name}:{line} {mod}" for line, mod in _module_imports(name) if is_use(mod, "")]
        bad += [f"bcc/{name}:{line} {call}()" for line, call in _module_calls(name) if is_use("", call)]
    assert not bad, f"{what} belongs to {sorted(owners)}:\n" + "\n".join(bad)


def test_the_manifest_suffixes_and_old_metric_names_have_one_owner():
    """The manifest format id is spelled only beside its reader/writer; the image suffix list only in
    bcc.imageio (a second list of '.jpg', '.png', ... would drift from it); the old metric names only in
    the config's rename table (rows are migrated by `bcc.train.runlog.migrate_row`, report included)."""
    bad = []
    for name, tree in MODULES.items():
        for node in _walk(tree):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            if node.value.startswith("bcc-shards") and name != "manifest.py":
                bad.append(f"bcc/{name}:{node.lineno} spells the manifest format {node.value!r}")
            if node.value in ("acc4", "bacc4") and name != "config.py":  # RENAMED_METRICS; rows: runlog.migrate_row
                bad.append(f"bcc/{name}:{node.lineno} spells the old metric name {node.value!r}")
        for node in _walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and name != "imageio.py":
                strings = {e.value.lower() for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(strings & {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}) >= 2:
                    bad.append(f"bcc/{name}:{node.lineno} lists image suffixes")
    assert not bad, "\n".join(bad)


def test_one_step_timer():
    """A step is timed by `bcc.bench.step.time_steps` only: no function outside the training package
    (whose epoch loop logs its own throughput) both reads a clock and runs a backward pass or a train
    step (bench step/gpu/gpu_ddp and compare's step times all call time_steps)."""
    clocks = {"time.perf_counter", "time.monotonic", "time.time", "perf_counter"}
    bad = []
    for name, tree in MODULES.items():
        if name == "bench/step.py" or name.startswith("train/"):
            continue
        calls = _module_calls(name)
        if not any(c in clocks for _, c in calls) or not any(c.endswith(("backward", "train_step")) for _, c in calls):
            continue  # the common case: this module cannot hold such a function
        for fn in _walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                called = {ast.unparse(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
                if called & clocks and any(c.endswith(("backward", "train_step")) for c in called):
                    bad.append(f"bcc/{name}:{fn.lineno} {fn.name} times steps itself")
    assert not bad, "use bcc.bench.step.time_steps:\n" + "\n".join(bad)



def test_one_set_up_for_fit_bench_and_compare():
    """The run's components (model, groups, stages, loss, optimizer) come from `bcc.train.setup` for
    `fit`, `bcc bench step`/`gpu` and `bcc compare`'s step times (through `bcc.bench.step_seconds`); the
    only other optimizer is bench step's deliberately plain PyTorch baseline."""
    def imported(name: str) -> set[str]:
        return {mod for _, mod in _module_imports(name)}

    for user in ("train/fit.py", "bench/step.py", "bench/gpu_ddp.py"):
        assert "bcc.train.setup.build_components" in imported(user), f"bcc/{user} builds its own components"
    assert "bcc.bench.step_seconds" in imported("compare.py"), "bcc compare times steps on its own"
    optimizers = [f"bcc/{name}:{line} {call}" for name in MODULES for line, call in _module_calls(name)
                  if call.startswith("torch.optim.") and not call.startswith("torch.optim.lr_scheduler")]
    assert [o.split(":")[0] for o in optimizers] == ["bcc/bench/step.py", "bcc/train/setup.py", "bcc/train/setup.py"], \
        optimizers


def test_one_metrics_log_reader(tmp_path):
    """metrics.jsonl is read by `bcc.train.runlog.read_rows` alone (compare, report, model card, demo):
    old names migrated, a damaged line an error naming it, never a JSONDecodeError traceback."""
    from bcc.report import read_metrics_log
    from bcc.train.runlog import RunLogError, read_rows

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"split": "val", "bacc4": 0.5, "acc4": 0.6, "acc": 0.7}\n\n{"split": "test", "bacc": 0.8}\n')
    assert read_rows(log) == read_metrics_log(tmp_path) == [{"split": "val", "bacc": 0.5, "acc": 0.7},
                                                             {"split": "test", "bacc": 0.8}]
    log.write_text('{"split": "val"}\n{"split": "te\n')
    with pytest.raises(RunLogError, match=r"metrics.jsonl line 2 is not JSON"):
        read_metrics_log(tmp_path)
    readers = [name for name in MODULES for node in NODES[name]
               if isinstance(node, ast.Constant) and node.value == "metrics.jsonl"
               and name not in ("train/runlog.py", "report.py", "compare.py")]
    for name in readers:  # any other module naming the file must read it through read_rows
        calls = {c for _, c in _module_calls(name)}
        assert "json.loads" not in calls or "read_rows" in calls, f"bcc/{name} reads metrics.jsonl itself"


@pytest.mark.parametrize("function", ["train_one_epoch", "evaluate", "train_step"])
def test_the_epoch_functions_fit_on_one_screen(function):
    """`bcc.train.epoch`'s loop is free functions in the torchvision references' style, each short
    enough to read on one screen (docstring included)."""
    fn = next(n for n in NODES["train/epoch.py"] if isinstance(n, ast.FunctionDef) and n.name == function)
    assert fn.end_lineno - fn.lineno + 1 <= 60, f"bcc.train.epoch.{function} is {fn.end_lineno - fn.lineno + 1} lines"

# --------------------------------------------------------------------------- the one catch, through the real CLI


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_compare_and_report_errors_reach_the_one_catch(tmp_path, bcc_main, monkeypatch):
    """`bcc compare` once printed its BccErrors itself and `bcc report` its OSErrors: one line, but
    BCC_DEBUG=1 could not show where they came from. Both now go through `bcc.cli.call`."""
    import bcc.report
    from bcc.compare import CompareError
    from bcc.report import ReportError

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "report.html"))

    monkeypatch.setattr(bcc.report, "write_report", unwritable)
    compare = ("compare", "--aggregate", tmp_path, "--bootstrap", "0")
    assert "--bootstrap must be >= 1" in _one_error_line(bcc_main(*compare))
    assert "Permission denied" in _one_error_line(bcc_main("report", tmp_path))
    monkeypatch.setenv("BCC_DEBUG", "1")
    with pytest.raises(CompareError):
        bcc_main(*compare)
    with pytest.raises(ReportError):
        bcc_main("report", tmp_path)


def test_design_md_names_every_module():
    """docs/DESIGN.md's module map stays the tree's (issue 10 item 6): every library module is named in it."""
    root = Path(__file__).resolve().parents[1]
    design = (root / "docs" / "DESIGN.md").read_text()
    missing = [p.relative_to(root).as_posix() for p in sorted((root / "bcc").rglob("*.py"))
               if p.parent.name != "cli" and p.name != "__init__.py"
               and p.relative_to(root).as_posix() not in design and f"`{p.name}`" not in design]
    assert not missing, f"docs/DESIGN.md does not name {missing}"
