"""FLMMForGrounding end to end: tiny LLaVA-1.5-shaped LMM (real llava-1.5 processor files) + tiny SAM."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import SamModel

from flmm_hf import FLMMConfig, FLMMForGrounding, FLMMProcessor
from flmm_hf.sam_refiner import UNUSED_SAM_PARAMETERS
from tiny_models import llava_flmm_processor, tiny_flmm, tiny_llava, tiny_sam_config


@pytest.fixture(scope="module")
def processor(fixtures_dir) -> FLMMProcessor:
    return llava_flmm_processor(fixtures_dir)


@pytest.fixture(scope="module")
def model(fixtures_dir) -> FLMMForGrounding:
    return tiny_flmm(fixtures_dir)


@pytest.fixture(scope="module")
def examples(fixtures_dir):
    images = fixtures_dir / "coco" / "images"
    cats = Image.open(images / "000000039769.png")
    bears = Image.open(images / "COCO_train2014_000000157714.jpg")
    people = Image.open(images / "COCO_train2014_000000363252.jpg")  # portrait 375x500
    data = [
        (cats, "two cats lying on a pink blanket.", ["two cats", "a pink blanket"]),
        (bears, "the baby in the middle.", ["the baby in the middle"]),
        (people, "man on left. woman in the middle. guy on right.", ["man on left", "woman in the middle", "guy on right"]),
    ]
    generator = torch.Generator().manual_seed(0)
    out = []
    for image, text, phrases in data:
        width, height = image.size
        masks = torch.rand(len(phrases), height, width, generator=generator) > 0.5
        out.append((image, text, phrases, masks))
    return out


def _batch(processor, examples):
    images, texts, phrases, masks = zip(*examples)
    return processor(images=list(images), texts=list(texts), phrases=list(phrases), masks=list(masks))


def test_config_shapes(model):
    config = model.config
    assert config.num_text_layers == 3
    assert config.mask_head_in_channels == 3 * 4  # layers x heads, one grid for llava
    assert config.lmm_config["model_type"] == "llava"
    assert config.sam_config["model_type"] == "sam"
    with pytest.raises(ValueError, match="merge"):
        FLMMConfig(merge="median")


def test_phrase_attention_shapes_and_lmm_frozen(model, processor, examples):
    inputs = _batch(processor, examples)
    maps = model.phrase_attention(**inputs)
    assert [tuple(m.shape) for m in maps] == [(2, 12, 24, 24), (1, 12, 24, 24), (3, 12, 24, 24)]
    # attention probabilities to image tokens: non-negative, each row sums to at most 1 over the image
    for m in maps:
        assert (m >= 0).all() and (m.sum(dim=(-2, -1)) <= 1 + 1e-5).all()
    model.train()
    assert not model.lmm.training and not model.head.sam_refiner.sam.vision_encoder.training
    assert model.head.mask_head.training
    model.eval()


def test_batch_equals_one_by_one(model, processor, examples):
    """A padded batch of 3 with 2/1/3 phrases gives the per-example outputs and loss."""
    batched = model(**_batch(processor, examples))
    assert batched.loss is not None and torch.isfinite(batched.loss)
    singles = [model(**_batch(processor, [example])) for example in examples]
    for b, single in enumerate(singles):
        torch.testing.assert_close(batched.coarse_logits[b], single.coarse_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.refined_logits[b], single.refined_logits[0], atol=1e-4, rtol=1e-4)
    # the original averages per-example losses weighted by each example's phrase count
    counts = torch.tensor([2.0, 1.0, 3.0])
    for name in ("loss_bce", "loss_dice", "sam_loss_bce", "sam_loss_dice", "accuracy", "aiou"):
        expected = (torch.stack([getattr(s, name) for s in singles]) * counts).sum() / counts.sum()
        torch.testing.assert_close(getattr(batched, name), expected, atol=1e-5, rtol=1e-5)
    expected_loss = sum(s.loss * c for s, c in zip(singles, counts)) / counts.sum()
    torch.testing.assert_close(batched.loss, expected_loss, atol=1e-5, rtol=1e-5)
    # shapes: coarse cropped to the letterbox content, refined at the original size
    assert tuple(batched.coarse_logits[0].shape) == (2, 48, 64)  # 480x640 -> 252x336 content of 64x64
    assert tuple(batched.refined_logits[2].shape) == (3, 500, 375)


def test_gradients_reach_only_trained_parts(model, processor, examples):
    """The loss reaches every parameter of the head's trained modules and nothing else."""
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**_batch(processor, examples[:2]))
    output.loss.backward()
    model.eval()
    trained_prefixes = tuple(f"head.{name}." for name in model.head.trained_modules())
    assert trained_prefixes == (
        "head.mask_head.", "head.text_projection.", "head.sam_refiner.sam.prompt_encoder.",
        "head.sam_refiner.sam.mask_decoder.",
    )
    for name, param in model.named_parameters():
        if name.startswith(("lmm.", "head.sam_refiner.sam.vision_encoder.")):
            assert not param.requires_grad and param.grad is None, name
        elif param.requires_grad:
            assert name.startswith(trained_prefixes), name
            assert param.grad is not None, f"no gradient reached {name}"
        else:
            # segment_anything keeps the positional matrix as a buffer (SamModel ties it to the prompt encoder's)
            frozen_ok = UNUSED_SAM_PARAMETERS + ("prompt_encoder.shared_embedding.", "shared_image_embedding.")
            assert name.removeprefix("head.sam_refiner.sam.").startswith(frozen_ok), f"{name} is frozen"
    head = model.head
    assert head.text_projection.layer_weights.grad.abs().sum() > 0
    assert head.text_projection.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.sam_refiner.sam.prompt_encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_ground_returns_masks_at_original_size(model, processor, examples):
    image, text, phrases, _ = examples[2]
    masks = model.ground(image, text, phrases, processor=processor)
    assert masks.dtype == torch.bool and tuple(masks.shape) == (3, 500, 375)
    coarse = model.ground(image, text, phrases, processor=processor, use_refiner=False)
    assert tuple(coarse.shape) == (3, 500, 375)
    with pytest.raises(ValueError, match="not found|absent|not in"):
        model.ground(image, text, ["a purple giraffe"], processor=processor)
    with pytest.raises(ValueError, match="FLMMProcessor"):
        model.ground(image, text, phrases)
    with pytest.raises(TypeError, match="phrases"):  # one phrase is still a list of phrases, not split into characters
        model.ground(image, text, "man on left", processor=processor)


def test_without_sam_refiner(fixtures_dir, processor, examples):
    model = FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), use_sam=False, mask_head_channels=8)
    assert not model.head.has_refiner and model.head.text_projection is None and model.config.sam_config is None
    output = model(**_batch(processor, examples[:2]))
    assert output.refined_logits is None and output.sam_loss_bce is None
    torch.testing.assert_close(output.loss, output.loss_bce + output.loss_dice)


def test_shared_sam_model_and_layer_subset(fixtures_dir, processor, examples):
    sam = SamModel(tiny_sam_config())
    model = FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), sam=sam, attention_layers=[-1, 0], merge="max")
    assert model.config.selected_layers == [2, 0]
    assert model.config.mask_head_in_channels == 2 * 4
    inputs = _batch(processor, examples[:1])
    maps = model.phrase_attention(**inputs)[0]
    assert tuple(maps.shape) == (2, 8, 24, 24)
    with pytest.raises(ValueError, match="out of range"):
        FLMMForGrounding.from_lmm(tiny_llava(fixtures_dir), use_sam=False, attention_layers=[5])


def test_eager_numerics_give_the_original_maps(fixtures_dir, processor, examples):
    """`attention_numerics="eager"` on a bf16 LMM: the head's input is exactly what the original computed, i.e.
    transformers' eager `output_attentions` in bf16, sliced to the image columns, each phrase's rows averaged in bf16,
    then cast to float32; the default float32 numerics give other maps. The setting round-trips in the config."""
    from flmm_hf.attention_capture import disable_capture

    lmm = tiny_llava(fixtures_dir).to(torch.bfloat16)
    reference_lmm = disable_capture(copy.deepcopy(lmm), "eager")  # the language model eager, the vision tower as ours
    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(lmm, use_sam=False, attention_numerics="eager", mask_head_channels=8)
    assert model.config.attention_numerics == "eager"
    assert FLMMConfig.from_dict(model.config.to_dict()).attention_numerics == "eager"
    assert FLMMConfig().attention_numerics == "float32"
    with pytest.raises(ValueError, match="attention_numerics must be one of .*'bf16'"):
        FLMMConfig(attention_numerics="bf16")

    inputs = _batch(processor, examples[:2])
    maps = model.phrase_attention(**inputs)
    lmm_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        attentions = reference_lmm(**lmm_inputs, output_attentions=True).attentions  # per layer [B, H, L, L], bf16
    assert attentions[0].dtype == torch.bfloat16
    for b, phrases in enumerate(examples[:2]):
        image = inputs["input_ids"][b] == model.image_token_id
        expected = []
        for k in range(len(phrases[2])):
            rows = inputs["phrase_ids"][b] == k
            merged = [layer[b][:, rows][:, :, image].mean(dim=1) for layer in attentions]  # [H, 576] each, bf16
            expected.append(torch.cat(merged).view(-1, 24, 24))
        assert maps[b].dtype == torch.float32
        assert torch.equal(maps[b], torch.stack(expected).float())

    model.config.attention_numerics = "float32"  # read at every call
    float_maps = model.phrase_attention(**inputs)
    # bf16 rounding: measured 6e-6 on maps of at most 1.8e-3 (0.35%; float32 noise would be about 1e-7 of it)
    assert all((f - m).abs().max() > 1e-3 * m.max() for f, m in zip(float_maps, maps))


def test_bad_inputs_have_clear_errors(model, processor, examples):
    inputs = _batch(processor, examples[:1])
    with pytest.raises(ValueError, match="sam_pixel_values"):
        model(**{k: v for k, v in inputs.items() if k != "sam_pixel_values"})
    broken = dict(inputs)
    broken["input_ids"] = inputs["input_ids"].clone()
    broken["input_ids"][broken["input_ids"] == model.image_token_id] = 1
    with pytest.raises(ValueError, match="image tokens"):
        model(**broken)
    bad_masks = dict(inputs, masks=[inputs["masks"][0][:1]])
    with pytest.raises(ValueError, match="masks|phrases"):
        model(**bad_masks)
    with pytest.raises(TypeError, match="lmm must be"):
        FLMMForGrounding.from_lmm(42, use_sam=False)
    with pytest.raises(TypeError, match="sam must be"):
        FLMMForGrounding.from_lmm(copy.deepcopy(model.lmm), sam=3.5)


def test_early_stop_and_offloaded_weights(fixtures_dir, processor, examples):
    """Without hidden states the frozen forward ends inside the deepest captured layer (no decoder layer finishes);
    with accelerate-offloaded weights it runs to the end, so that the hooks can put the weights back, with the same
    result."""
    from accelerate import cpu_offload

    from flmm_hf.attention_capture import has_offloaded_weights

    torch.manual_seed(0)
    model = FLMMForGrounding.from_lmm(
        tiny_llava(fixtures_dir), use_sam=False, attention_layers=[1], mask_head_channels=8
    ).eval()
    inputs = _batch(processor, examples[:2])
    layers = model.lmm.model.language_model.layers
    finished = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: finished.append(i))

    with torch.no_grad():
        early = model(**inputs).coarse_logits
    assert finished == [0]  # layer 1 stopped inside its attention; later layers never ran

    assert not has_offloaded_weights(model.lmm)
    cpu_offload(model.lmm, execution_device=torch.device("cpu"))
    assert has_offloaded_weights(model.lmm)
    finished.clear()
    with torch.no_grad():
        full = model(**inputs).coarse_logits
    assert finished == list(range(len(layers)))
    assert all(p.device.type == "meta" for p in model.lmm.parameters())  # the hook put the weights back
    torch.testing.assert_close(full, early, rtol=0, atol=1e-6)


def test_one_model_serves_concurrent_threads(model, processor, examples):
    """3 threads x 6 `ground` calls on ONE model give exactly the serial masks (and the serial phrase maps, to 1e-6),
    while a plain `model.lmm(...)` forward in a 4th thread keeps its serial output: capture state lives per call,
    not on the shared modules."""
    import threading

    calls = [examples[i % 3][:3] for i in range(6)]
    call_inputs = [processor(images=[image], texts=[text], phrases=[phrases]) for image, text, phrases in calls]
    serial = [model.ground(image, text, phrases, processor=processor) for image, text, phrases in calls]
    with torch.no_grad():
        serial_maps = [model.phrase_attention(**inputs)[0] for inputs in call_inputs]
    plain_inputs = processor(images=[examples[0][0]], texts=[examples[0][1]], return_sam_inputs=False)
    plain_inputs = {k: v for k, v in plain_inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        plain_serial = model.lmm(**plain_inputs).logits

    start = threading.Barrier(4)
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    grounding_done = threading.Event()

    def ground_all(worker: int) -> None:
        try:
            start.wait()
            order = [(worker + j) % 6 for j in range(6)]  # every thread a different order
            results[worker] = [
                (i, model.ground(*calls[i], processor=processor), model.phrase_attention(**call_inputs[i])[0])
                for i in order
            ]
        except BaseException as error:  # reported below, with the thread's traceback
            errors.append(error)

    plain_outputs = []

    def plain_forwards() -> None:
        try:
            start.wait()
            while not grounding_done.is_set() and len(plain_outputs) < 8:
                with torch.no_grad():
                    plain_outputs.append(model.lmm(**plain_inputs).logits)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ground_all, args=(w,)) for w in range(3)] + [threading.Thread(target=plain_forwards)]
    for thread in threads:
        thread.start()
    for thread in threads[:3]:
        thread.join(timeout=300)
    grounding_done.set()
    threads[3].join(timeout=60)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    for worker, outcomes in results.items():
        for i, mask, maps in outcomes:
            assert torch.equal(mask, serial[i]), (worker, i)
            # the captured maps themselves: rows of another thread's call would change them
            torch.testing.assert_close(maps, serial_maps[i], rtol=0, atol=1e-6)
    assert plain_outputs
    for logits in plain_outputs:  # the full forward ran (no early stop leaked in); rounding may differ with load
        torch.testing.assert_close(logits, plain_serial, rtol=0, atol=1e-5)
