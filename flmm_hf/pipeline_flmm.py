"""The `referring-segmentation` pipeline of F-LMM, a transformers custom pipeline.

`FLMMForGrounding.save_pretrained` (hence `push_to_hub`) copies this file into the saved folder with the model
code and records it in config.json's `custom_pipelines`, so that

    pipe = pipeline("referring-segmentation", model="<folder or Hub id>", trust_remote_code=True)
    pipe(image, text="two cats lying on a pink blanket.", phrases=["two cats", "a pink blanket"])
    pipe(image, question="What is in the picture?")

work without flmm_hf installed. With flmm_hf imported the task is also registered in transformers'
`PIPELINE_REGISTRY`, so `pipeline("referring-segmentation", model=<FLMMForGrounding>, processor=<FLMMProcessor>)`
builds it around a model in memory.

The outputs follow the `image-segmentation` pipeline: one dict per phrase, `{"label": phrase, "mask": PIL image,
"score": float}`, the mask a mode "L" image of the input image's size (255 inside, 0 outside). The score is the
mean foreground probability over the mask's pixels (so it lies in (threshold, 1] for a non-empty mask) and 0.0
for an empty mask.

Shipped with the model as Hub custom code: imports only numpy, PIL, torch, transformers and its flat siblings.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .processing_flmm import check_threshold

TASK = "referring-segmentation"
"""The task name under which the pipeline is registered and recorded in config.json."""

CUSTOM_PIPELINE_ENTRY = {"impl": "pipeline_flmm.ReferringSegmentationPipeline", "pt": ["AutoModel"], "type": "multimodal"}
"""The `custom_pipelines` entry of a saved config.json: the class as `module.Class` of the copied code, and the
transformers Auto class that loads the model (through the folder's `auto_map`)."""

# Arguments of `chat` that the pipeline passes on; everything else a grounded-chat call gets goes to `generate`
# only through `max_new_tokens` or `generate_kwargs`, so that a misspelt argument is an error, not a generate flag.
_CHAT_ARGUMENTS = ("selector", "on_missing")
# `pipeline(..., local_files_only=True)` also hands this one to the pipeline class; it is about loading only.
_LOADING_ARGUMENTS = ("local_files_only",)


class ReferringSegmentationPipeline(Pipeline):
    """
    Referring segmentation and grounded conversation with an F-LMM model (`FLMMForGrounding`).

    Two calls:

    - `pipe(image, text=..., phrases=[...])`: the masks of `phrases` (substrings of `text`, or `(start, end)`
      character spans of it; default: the whole `text` as one referring expression), through
      `FLMMForGrounding.ground`. Returns a list with one dict per phrase, in the order given:
      `{"label": phrase, "mask": PIL.Image (mode "L", the image's size), "score": float}`.
    - `pipe(image, question=...)`: the frozen LMM answers and the phrases of its answer are grounded, through
      `FLMMForGrounding.chat`. Returns `{"answer": str, "segments": [dicts as above], "missing": [phrases]}`;
      `phrases=[...]` then names phrases of the answer (see `chat` for `selector` and `on_missing`).

    `image` is a PIL image, a numpy array (H, W, 3), a local path, a URL or a base64 string; a list of images
    gives a list of results. `threshold` (default 0.5) is the probability above which a pixel is in a mask;
    `use_refiner=False` skips the SAM refiner. `score` is the mean foreground probability over the mask's pixels,
    0.0 for an empty mask. A grounded-chat call also takes `max_new_tokens`, `selector`, `on_missing` and
    `generate_kwargs` (a dict for `generate`); a call with `text` does not use them. Any argument can also be
    given once to `pipeline(...)`, for every call.

    The processor is an `FLMMProcessor`: `processor=` if given, else `model.processor` if set, else the one saved
    in the model's folder or Hub repo (at its default revision: with `revision=`, pass `processor=` loaded at it).
    """

    # The FLMMProcessor is the one preprocessing component (tokenizer and image processor are its backbone's). It
    # is no `ProcessorMixin` (see its docstring), which transformers' loader refuses, so __init__ loads it.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any):
        local_files_only = kwargs.get("local_files_only", False)
        super().__init__(*args, **kwargs)
        processor = self.processor if self.processor is not None else getattr(self.model, "processor", None)
        if processor is None:
            processor = self._load_flmm_processor(local_files_only)
        # The same check (and message) as `ground` / `chat`: a plain backbone processor has no phrase_ids.
        self.processor = self.model.resolve_processor(processor)

    def _load_flmm_processor(self, local_files_only: bool) -> Any:
        """The FLMMProcessor saved beside the model (`FLMMProcessor.save_pretrained` into the model's folder)."""
        from .processing_flmm import FLMMProcessor

        source = getattr(self.model, "name_or_path", None) or ""
        if not source:
            raise ValueError(
                "the model was not loaded from a folder or the Hub, so there is no saved processor to load. Fix: pass "
                "processor=FLMMProcessor(<the backbone's processor>) (or FLMMProcessor.from_pretrained(<folder>)), or "
                "set model.processor"
            )
        # Running as the folder's remote code means its code was trusted: the processor's loader may read the
        # folder's config.json with the remote FLMMConfig too.
        trusted = type(self).__module__.startswith("transformers_modules")
        try:
            return FLMMProcessor.from_pretrained(source, trust_remote_code=trusted, local_files_only=local_files_only)
        except (OSError, ValueError) as error:
            raise OSError(
                f"the pipeline could not load the FLMMProcessor saved with the model from {source!r}: {error}\nFix: "
                "save it beside the model (processor.save_pretrained(folder)), or pass processor=FLMMProcessor(...) "
                "to pipeline(...)"
            ) from error

    def __call__(self, images: Any, **kwargs: Any) -> list[dict[str, Any]] | dict[str, Any] | list[Any]:
        """
        Ground phrases of a text (`text=`, `phrases=`) or of the LMM's answer to `question=` in `images`.

        Args:
            images: one image (PIL, numpy array, path, URL or base64 string) or a list of them.
            text (`str`): the text whose `phrases` are grounded (referring segmentation).
            phrases (`list[str | tuple[int, int]]`, *optional*): substrings (or character spans) of `text`, or of
                the answer with `question`. Default: `[text]`, or the phrases chosen by `selector`.
            question (`str`): ask the frozen LMM; its answer's phrases are grounded (grounded conversation).
            threshold (`float`, *optional*, defaults to 0.5), use_refiner (`bool`, *optional*, defaults to True).
            max_new_tokens, selector, on_missing, generate_kwargs: grounded chat only (see `FLMMForGrounding.chat`).

        Returns:
            With `text`: a list of `{"label", "mask", "score"}` dicts, one per phrase. With `question`:
            `{"answer": str, "segments": [such dicts], "missing": [str]}`. A list of images gives a list of these.
        """
        return super().__call__(images, **kwargs)

    def _sanitize_parameters(
        self,
        text: str | None = None,
        phrases: list[str] | list[tuple[int, int]] | None = None,
        question: str | None = None,
        threshold: float | None = None,
        use_refiner: bool | None = None,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        unknown = sorted(set(kwargs) - set(_CHAT_ARGUMENTS) - set(_LOADING_ARGUMENTS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {unknown}. It takes text, phrases, question, "
                "threshold, use_refiner, timeout and, for a grounded-chat call, max_new_tokens, selector, on_missing "
                "and generate_kwargs (a dict passed to generate)."
            )
        preprocess = {key: value for key, value in
                      {"text": text, "phrases": phrases, "question": question, "timeout": timeout}.items()
                      if value is not None}
        forward = {key: kwargs[key] for key in _CHAT_ARGUMENTS if key in kwargs}
        if use_refiner is not None:
            forward["use_refiner"] = bool(use_refiner)
        if generate_kwargs is not None or max_new_tokens is not None:
            if generate_kwargs is not None and not isinstance(generate_kwargs, dict):
                raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}")
            generate = dict(generate_kwargs or {})
            if max_new_tokens is not None:
                if "max_new_tokens" in generate:
                    raise ValueError("max_new_tokens is given twice: as an argument and in generate_kwargs; give it once")
                generate["max_new_tokens"] = max_new_tokens
            forward["generate_kwargs"] = generate
        postprocess = {}
        if threshold is not None:
            check_threshold(threshold)  # at the call, before the model runs
            postprocess["threshold"] = threshold
        return preprocess, forward, postprocess

    def preprocess(
        self,
        image: Any,
        text: str | None = None,
        phrases: list[str] | list[tuple[int, int]] | None = None,
        question: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        if text is not None and question is not None:
            raise ValueError(
                "pass either text= (ground phrases of your text) or question= (ground the LMM's answer), not both"
            )
        if text is None and question is None:
            raise ValueError(
                "nothing to ground: pass text='...' with phrases=[...] (substrings of the text; default the whole "
                "text) to segment what the text refers to, or question='...' for a grounded answer of the LMM"
            )
        given = text if text is not None else question
        if not isinstance(given, str) or not given.strip():
            name = "text" if text is not None else "question"
            raise ValueError(f"{name} must be a non-empty string, got {given!r}")
        if isinstance(phrases, str):
            raise TypeError(f"phrases must be a list of phrases, got the str {phrases!r}: pass phrases=[{phrases!r}]")
        if phrases is not None and len(phrases) == 0 and text is not None:
            raise ValueError("phrases is empty: pass at least one phrase of the text, or leave phrases out to "
                             "ground the whole text")
        if isinstance(image, (str, os.PathLike)):
            image = load_image(str(image), timeout=timeout)
        elif not isinstance(image, (Image.Image, np.ndarray)):
            raise TypeError(
                f"image must be a PIL image, a numpy array (H, W, 3), a path, a URL or a base64 string, got "
                f"{type(image).__name__}"
            )
        if text is not None:
            return {"image": image, "text": text, "phrases": list(phrases) if phrases is not None else [text]}
        return {"image": image, "question": question, "phrases": list(phrases) if phrases is not None else None}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        use_refiner: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
        **chat_arguments: Any,
    ) -> dict[str, Any]:
        image, phrases = model_inputs["image"], model_inputs["phrases"]
        if "text" in model_inputs:
            # Chat-only arguments are not used here: they may have been given once to `pipeline(...)` for the
            # grounded-chat calls of a pipeline that serves both.
            text = model_inputs["text"]
            probabilities = self.model.ground(
                image, text, phrases, processor=self.processor, use_refiner=use_refiner, return_probabilities=True
            )
            labels = [phrase if isinstance(phrase, str) else text[int(phrase[0]) : int(phrase[1])] for phrase in phrases]
            return {"probabilities": probabilities, "labels": labels}
        answer = self.model.chat(
            image, model_inputs["question"], phrases=phrases, processor=self.processor, use_refiner=use_refiner,
            return_probabilities=True, **chat_arguments, **(generate_kwargs or {}),
        )
        return {"probabilities": answer.probabilities, "labels": answer.phrases, "answer": answer.text,
                "missing": answer.missing}

    def postprocess(self, model_outputs: dict[str, Any], threshold: float = 0.5) -> list[dict[str, Any]] | dict[str, Any]:
        segments = [
            segment_entry(label, probabilities, threshold)
            for label, probabilities in zip(model_outputs["labels"], model_outputs["probabilities"])
        ]
        if "answer" not in model_outputs:
            return segments
        return {"answer": model_outputs["answer"], "segments": segments, "missing": list(model_outputs["missing"])}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model (with this pipeline's code and `custom_pipelines` entry) and its FLMMProcessor, so that
        `pipeline("referring-segmentation", model=save_directory, trust_remote_code=True)` rebuilds the pipeline."""
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


def segment_entry(label: str, probabilities: torch.Tensor, threshold: float = 0.5) -> dict[str, Any]:
    """One output entry from a phrase's `[H, W]` foreground probabilities: the mask `probabilities > threshold`
    (the rule of `FLMMProcessor.post_process_masks`) as a mode "L" image (255 inside), and its score, the mean
    probability over the mask's pixels (0.0 for an empty mask)."""
    mask = probabilities > threshold
    score = float(probabilities[mask].mean()) if bool(mask.any()) else 0.0
    image = Image.fromarray(mask.to(torch.uint8).mul(255).cpu().numpy())  # 2-D uint8: mode "L"
    return {"label": label, "mask": image, "score": score}


__all__ = ["CUSTOM_PIPELINE_ENTRY", "TASK", "ReferringSegmentationPipeline", "segment_entry"]
