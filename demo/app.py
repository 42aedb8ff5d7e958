"""Interactive F-LMM demo: chat with a frozen LMM and see what its words refer to.

Upload an image, ask a question: the frozen LMM answers with its own chat template and the phrases of
its answer are grounded from the attention it paid to the image while it spoke (`model.chat`). The
answer is shown with its phrases coloured (the legend) and the image with the masks in the same colours.

    python demo/app.py --model outputs/demo          # the folder `python train.py` writes
    python demo/app.py --model org/flmm-llava-1.5-7b # any saved model folder or Hub id
    python demo/app.py --tiny-random                 # a random tiny model built in-process (no files)

Needs `pip install "flmm-hf[demo]"` (Gradio). Runs offline: nothing is fetched at run time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage statistics calls

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # `python demo/app.py` from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flmm_hf import FLMMForGrounding, FLMMProcessor  # noqa: E402
from flmm_hf.grounded_chat import GroundedAnswer, PhraseNotFoundError  # noqa: E402

logger = logging.getLogger(__name__)

# Distinct, colour-blind-friendly colours (Okabe-Ito + extras), cycled over the phrases.
PALETTE = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
    "#999999", "#8C564B", "#17BECF",
]
SELECTORS = {
    "LMM lists the objects it mentioned": "lmm",
    "noun chunks (spaCy)": "noun_chunks",
    "auto (spaCy if installed, else LMM)": "auto",
}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def load_model(name_or_path: str, device: str | None = None) -> tuple[FLMMForGrounding, FLMMProcessor]:
    """A saved F-LMM (folder, e.g. `train.py`'s output, or Hub id) and its processor."""
    model = FLMMForGrounding.from_pretrained(name_or_path)
    processor = FLMMProcessor.from_pretrained(name_or_path)
    if device:
        model.to(device)
    return model.eval(), processor


def tiny_random_model(seed: int = 0) -> tuple[FLMMForGrounding, FLMMProcessor]:
    """An untrained F-LMM around the demo's tiny random LLaVA (word-level tokenizer), built in-process.

    It answers with random words and its masks are noise: it exists to exercise the app without files.
    """
    from flmm_hf.demo_backbone import build_demo_backbone

    lmm, lmm_processor = build_demo_backbone(seed=seed)
    torch.manual_seed(seed)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, mask_head_channels=8)
    return model.eval(), FLMMProcessor(lmm_processor)


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def overlay_masks(image: Image.Image, masks: torch.Tensor, colours: list[str], alpha: float = 0.5) -> Image.Image:
    """`image` with each `[H, W]` mask of `masks` painted in its colour (later masks on top), edges darkened."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        m = mask.cpu().numpy().astype(bool)
        if not m.any():
            continue
        canvas[m] = (1 - alpha) * canvas[m] + alpha * _rgb(colour)
        # A thin outline keeps overlapping masks apart.
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        canvas[edge] = 0.5 * _rgb(colour)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def legend_segments(answer: GroundedAnswer) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """The answer cut into `(text, label)` pieces for `gr.HighlightedText`, and the label -> colour map."""
    segments: list[tuple[str, str | None]] = []
    colour_map: dict[str, str] = {}
    cursor = 0
    order = sorted(range(len(answer.spans)), key=lambda k: answer.spans[k])
    for k in order:
        start, end = answer.spans[k]
        label = f"{k + 1}. {answer.phrases[k]}"
        colour_map[label] = PALETTE[k % len(PALETTE)]
        if start < cursor:  # overlapping phrases: the legend shows the first; the masks show both
            continue
        if start > cursor:
            segments.append((answer.text[cursor:start], None))
        segments.append((answer.text[start:end], label))
        cursor = end
    if cursor < len(answer.text):
        segments.append((answer.text[cursor:], None))
    return segments, colour_map


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
class DemoState:
    """What the app keeps between calls (the last answer, for inspection and tests)."""

    def __init__(self) -> None:
        self.last_answer: GroundedAnswer | None = None


def respond(
    model: FLMMForGrounding,
    processor: FLMMProcessor,
    image: Image.Image | None,
    question: str,
    phrases_text: str,
    use_refiner: bool,
    selector_label: str,
    max_new_tokens: int,
    state: DemoState | None = None,
) -> tuple[list[dict[str, str]], list[tuple[str, str | None]], dict[str, str], Image.Image | None, str]:
    """One turn: the grounded answer as chat messages, legend segments + colours, the overlay, and a status line."""
    if image is None:
        return [], [], {}, None, "Upload an image first."
    question = (question or "").strip() or "Please give me a description of the image."
    explicit = [p.strip() for p in (phrases_text or "").split(",") if p.strip()] or None
    try:
        answer = model.chat(
            image, question, phrases=explicit, processor=processor, selector=SELECTORS.get(selector_label, "auto"),
            use_refiner=use_refiner, on_missing="skip", max_new_tokens=int(max_new_tokens),
        )
    except (ImportError, PhraseNotFoundError, ValueError, TypeError, RuntimeError, OSError) as error:
        # Shown in the status line: an exception escaping a Gradio handler shows only a generic "Error" badge.
        logger.warning("respond failed: %s", error)
        return [{"role": "user", "content": question}], [], {}, image, f"Error: {error}"
    if state is not None:
        state.last_answer = answer
    colours = [PALETTE[k % len(PALETTE)] for k in range(len(answer.phrases))]
    segments, colour_map = legend_segments(answer)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer.text or "(empty answer)"}]
    status = f"{len(answer.phrases)} phrase(s) grounded ({answer.selector})."
    if answer.missing:
        status += f" Not in the answer: {', '.join(answer.missing)}."
    return messages, segments, colour_map, overlay_masks(image, answer.masks, colours), status


def build_demo(
    model: FLMMForGrounding,
    processor: FLMMProcessor,
    state: DemoState | None = None,
    title: str = "F-LMM",
    max_new_tokens: int = 48,
):
    """The Gradio app around a loaded model (components carry `elem_id`s for browser tests)."""
    import gradio as gr

    state = state if state is not None else DemoState()
    has_refiner = model.head.has_refiner
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}: grounded chat with a frozen LMM\n"
            "The LMM answers; the phrases of its answer are segmented from the attention it paid to the image."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="image-input")
                question = gr.Textbox(label="Question", value="Please give me a description of the image.", elem_id="question")
                phrases = gr.Textbox(
                    label="Phrases to ground (optional, comma-separated; empty = chosen by the selector)",
                    elem_id="phrases",
                )
                with gr.Row():
                    use_refiner = gr.Checkbox(
                        label="Refine with SAM", value=has_refiner, interactive=has_refiner, elem_id="use-refiner"
                    )
                    max_new_tokens = gr.Slider(4, 256, value=max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens")
                selector = gr.Radio(
                    list(SELECTORS), value=list(SELECTORS)[2], label="Phrase selector", elem_id="selector"
                )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=220)
                legend = gr.HighlightedText(label="Answer and legend", show_legend=True, elem_id="legend")
                overlay = gr.Image(type="pil", label="Grounded phrases", interactive=False, elem_id="overlay")
                status = gr.Markdown(elem_id="status")

        def on_ask(img, q, p, refine, sel, n, history):
            messages, segments, colour_map, picture, line = respond(model, processor, img, q, p, refine, sel, n, state)
            history = (history or []) + messages
            return history, gr.HighlightedText(value=segments, color_map=colour_map), picture, line

        ask.click(
            on_ask,
            inputs=[image, question, phrases, use_refiner, selector, max_new_tokens, chatbot],
            outputs=[chatbot, legend, overlay, status],
        )
    demo.flmm_state = state  # the last answer, for tests and notebooks
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved F-LMM folder (e.g. train.py's output_dir) or Hub id")
    source.add_argument("--tiny-random", action="store_true", help="an untrained tiny model built in-process")
    parser.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, processor = tiny_random_model() if args.tiny_random else load_model(args.model, args.device)
    build_demo(model, processor).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
