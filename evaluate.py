#!/usr/bin/env python
"""Evaluate an F-LMM model on referring expression segmentation and panoptic narrative grounding.

    python evaluate.py --model_name_or_path org/flmm-llava-1.5-7b \\
        --refcoco build/refcoco --refcoco_plus build/refcoco+ --refcocog build/refcocog \\
        --png build/png --output_dir eval_output
    accelerate launch --multi_gpu --num_processes 8 evaluate.py ...   # sharded over processes
    torchrun --nproc_per_node 8 evaluate.py ...                       # the same (gloo on CPU)

Datasets are folders or Hub ids of the Parquet datasets that ``dataset_scripts/build_refcoco.py``
and ``build_png.py`` write (``datasets.load_dataset(<folder or id>)``). RES is scored on
RefCOCO/RefCOCO+ val, testA, testB and RefCOCOg val, test under the paper's ``concat`` protocol
and the common ``per_sentence`` one; PNG on val. Coarse and refined masks are both reported.
The frozen LMM is loaded in bf16, as the paper ran it (``--lmm_dtype float32`` or ``auto`` for
another dtype). Writes ``<output_dir>/eval_results.json`` and a recall-curve plot per PNG split,
and prints a table. A dataset that is not the benchmark it is passed as (its dataset card says so,
e.g. the shapes demo set) is labelled by its own name; unknown ``--splits`` and missing folders
are refused. The logic lives in :mod:`flmm_hf.evaluation`.

Why the first lines below exist: this file is named ``evaluate.py`` and sits at the repo root.
``python evaluate.py`` (and ``accelerate launch evaluate.py``) put the script's folder first on
``sys.path``, so any ``import evaluate`` made afterwards (by us, by ``flmm_hf.metrics``' metric
modules, by ``evaluate.load``) would import this script instead of the Hugging Face ``evaluate``
library. Likewise ``python -m pytest`` or ``python -c`` run from the repo root put the root on
``sys.path`` and an ``import evaluate`` there finds this file. So, before anything else:

- run as a script: import the ``evaluate`` library with this folder removed from ``sys.path``,
  which pins the library in ``sys.modules["evaluate"]`` for every later import, then restore
  ``sys.path`` (``flmm_hf`` may be importable only from this folder);
- imported as the module ``evaluate`` (the shadowing case): do the same and put the library in
  ``sys.modules["evaluate"]``, so the importer receives the library, not this script.
"""
import os
import sys

_SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))


def _import_evaluate_library():
    """The Hugging Face ``evaluate`` library, imported without this folder on ``sys.path`` (None if absent)."""
    loaded = sys.modules.get("evaluate")
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") != os.path.abspath(__file__):
        return loaded  # the library is already imported
    shadow = sys.modules.pop("evaluate", None)  # this file, when imported as `evaluate`
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _SCRIPT_DIR]
    try:
        import evaluate as library
    except ImportError:
        library = None
    finally:
        sys.path[:] = saved_path
    if library is None and shadow is not None:
        sys.modules["evaluate"] = shadow  # no library installed: leave the import as it was
    return library


_EVALUATE_LIBRARY = _import_evaluate_library()
if __name__ == "evaluate" and _EVALUATE_LIBRARY is not None:
    # `import evaluate` reached this file: hand the importer the library (the import system
    # returns whatever sys.modules["evaluate"] holds once this module body finishes).
    sys.modules["evaluate"] = _EVALUATE_LIBRARY

import logging  # noqa: E402


def main(argv=None):
    from transformers import HfArgumentParser

    from flmm_hf.evaluation import EvaluationArguments, process_state, results_table, run_evaluation

    parser = HfArgumentParser(EvaluationArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    state = process_state()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if state.is_main_process else logging.WARNING,
    )
    output = run_evaluation(args, state=state)
    if state.is_main_process:
        print(results_table(output), end="")
    return output


if __name__ == "__main__":
    main()
