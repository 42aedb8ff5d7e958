"""The dataset builders' input readers on hostile or broken inputs: inflated or deep pickles,
paths leaving the given folders, truncated images, empty masks, and datasets missing columns."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flmm_hf.datasets_io import UnsafePickleError, load_refs_pickle

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import a builder script from dataset_scripts/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _laughs(depth: int, width: int) -> list:
    """A list holding the same list `width` times, `depth` levels deep: width**depth leaves
    from a pickle of a few hundred bytes (pickle's memo writes each shared list once)."""
    node: list = ["ha"]
    for _ in range(depth):
        node = [node] * width
    return node


def _ref(**extra) -> dict:
    return {"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "val", "category_id": 1,
            "sentences": [{"sent_id": 0, "sent": "the cat", "raw": "The cat"}], **extra}


# --------------------------------------------------------------------------------------
# 1. refs pickle: shared-reference inflation, deep nesting, cycles
# --------------------------------------------------------------------------------------
def test_billion_laughs_pickle_is_refused_quickly_naming_the_file(tmp_path):
    path = tmp_path / "refs(unc).p"
    data = pickle.dumps([_ref(sentences=_laughs(30, 10))], protocol=2)
    assert len(data) < 1000  # 10**30 nodes described in under a kilobyte
    path.write_bytes(data)
    # In a subprocess with a timeout: a reader that expands shared references never returns.
    code = textwrap.dedent(f"""
        import sys, time
        from flmm_hf.datasets_io import UnsafePickleError, load_refs_pickle
        start = time.monotonic()
        try:
            load_refs_pickle({str(path)!r})
        except UnsafePickleError as err:
            print("REFUSED", err)
            print("SECONDS", time.monotonic() - start)
            sys.exit(0)
        sys.exit("accepted")
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    except subprocess.TimeoutExpired:
        pytest.fail("reading a 1 kB pickle of shared references did not finish in 30 s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and str(path) in proc.stdout and "billion laughs" in proc.stdout
    assert float(proc.stdout.split("SECONDS")[1]) < 2


def test_shared_references_are_converted_once_and_stay_shared(tmp_path):
    shared = {b"sent": b"the cat", "tokens": [b"the", b"cat"]}
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([_ref(sentences=[shared] * 3, deep=_laughs(12, 2))], protocol=4))
    (ref,) = load_refs_pickle(path)
    assert ref["sentences"][0] == {"sent": "the cat", "tokens": ["the", "cat"]}
    assert ref["sentences"][0] is ref["sentences"][1] is ref["sentences"][2]
    assert ref["deep"][0] is ref["deep"][1]
    # the cap counts the expanded tree: 2**13 - 1 lists + 2**12 leaves here
    with pytest.raises(UnsafePickleError, match="refs.p.*expands to more than 1,000 nodes"):
        load_refs_pickle(path, max_nodes=1000)


def _deep_list_pickle(depth: int) -> bytes:
    """[{'sentences': [[[...]]]}] nested `depth` lists deep, written opcode by opcode
    (pickle.dumps itself recurses and cannot write it)."""
    return (b"\x80\x02]}U\x09sentences" + b"]" * depth + b"a" * (depth - 1) + b"sa.")


def test_deeply_nested_pickle_does_not_hit_the_recursion_limit(tmp_path):
    depth = 5 * sys.getrecursionlimit()
    path = tmp_path / "refs.p"
    path.write_bytes(_deep_list_pickle(depth))
    (ref,) = load_refs_pickle(path)
    node, levels = ref["sentences"], 1
    while node:
        node, levels = node[0], levels + 1
    assert levels == depth


def test_self_containing_pickle_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([_ref(sentences=loop)], protocol=2))
    with pytest.raises(UnsafePickleError, match="contains itself"):
        load_refs_pickle(path)
