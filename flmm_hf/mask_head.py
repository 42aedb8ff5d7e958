"""The U-Net mask head of F-LMM: word-to-image attention maps -> coarse mask logits.

The head reproduces, in plain PyTorch, the network the original F-LMM code builds with
mmsegmentation's `UNet` (4 stages, base width 64, GroupNorm with one group, interpolation
upsampling) plus a 1x1 `conv_seg`, together with the input preprocessing of F-LMM's
`UNetHead` (normalise each map by its spatial sum, upsample to >= 64 px, pad to a multiple
of 8). With converted weights (`flmm_hf.convert`) the outputs equal the original's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormReLU(nn.Module):
    """Convolution (no bias, the norm has one) -> GroupNorm -> ReLU, like mmcv's `ConvModule`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.act = nn.ReLU(inplace=True)
        # mmcv initialises every ConvModule conv with Kaiming-normal (fan_out, relu); we keep that
        # so that training from scratch starts where the original did.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden_states)))


class DoubleConv(nn.Module):
    """Two 3x3 `ConvNormReLU` layers (mmseg's `BasicConvBlock` with two convs)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 1):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormReLU(in_channels, out_channels, 3, num_groups),
            ConvNormReLU(out_channels, out_channels, 3, num_groups),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.convs(hidden_states)


class Upsample2xConv(nn.Module):
    """Bilinear x2 upsampling then a 1x1 `ConvNormReLU` (mmseg's `InterpConv`, `conv_first=False`)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 1):
        super().__init__()
        self.conv = ConvNormReLU(in_channels, out_channels, 1, num_groups)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        # F-LMM patched mmseg's Upsample to interpolate in float32 to an explicit size.
        upsampled = F.interpolate(
            hidden_states.float(), size=(2 * height, 2 * width), mode="bilinear", align_corners=False
        ).to(hidden_states.dtype)
        return self.conv(upsampled)


class UpBlock(nn.Module):
    """Decoder stage: upsample the deeper features to the skip width, concatenate the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, num_groups: int = 1):
        super().__init__()
        self.upsample = Upsample2xConv(in_channels, skip_channels, num_groups)
        self.conv_block = DoubleConv(2 * skip_channels, skip_channels, num_groups)

    def forward(self, skip: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.upsample(hidden_states)
        return self.conv_block(torch.cat([skip, hidden_states], dim=1))


class UNetMaskHead(nn.Module):
    """U-Net that turns per-phrase attention maps into one mask-logit map per phrase.

    Args:
        in_channels (`int`):
            Number of attention maps per phrase (layers x heads, times the number of grids).
        base_channels (`int`, *optional*, defaults to 64):
            Width of the first stage; stage `i` has `base_channels * 2**i` channels.
        num_stages (`int`, *optional*, defaults to 4):
            Encoder stages (2x2 max-pool between them); the decoder has `num_stages - 1`.
        num_groups (`int`, *optional*, defaults to 1):
            Groups of every GroupNorm.
        upsample_input (`int`, *optional*, defaults to 64):
            The input is upsampled bilinearly so that its longer side is at least this; `None` disables it.
        normalize_input (`bool`, *optional*, defaults to `True`):
            Divide each input map by its spatial sum (attention maps are non-negative).

    Attributes:
        channels_last_training (`bool`, defaults to `True`):
            In training mode on CPU, run the convolutions channels-last (about 20% faster; equal to NCHW to float
            rounding). Inference always runs NCHW, bit-exact to the original head. A runtime switch, not saved.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        num_stages: int = 4,
        num_groups: int = 1,
        upsample_input: int | None = 64,
        normalize_input: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.upsample_input = upsample_input
        self.normalize_input = normalize_input
        # Train in channels-last layout on CPU (see `forward`); a runtime switch, not a saved setting.
        self.channels_last_training = True

        widths = [base_channels * 2**i for i in range(num_stages)]
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels if i == 0 else widths[i - 1], widths[i], num_groups) for i in range(num_stages)]
        )
        # decoder[i] maps stage i+1 back to stage i; it runs from the deepest (i = num_stages-2) to i = 0.
        self.decoder = nn.ModuleList([UpBlock(widths[i + 1], widths[i], num_groups) for i in range(num_stages - 1)])
        self.conv_seg = nn.Conv2d(base_channels, 1, kernel_size=1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """
        Args:
            maps (`torch.Tensor` of shape `(num_phrases, in_channels, height, width)`):
                Non-negative attention maps of each phrase on the (padded) image grid.

        Returns:
            `torch.Tensor` of shape `(num_phrases, out_height, out_width)`: mask logits on the same
            canvas as the input, `out_* = floor(in_* * scale)` with scale = max(1, upsample_input / max(h, w)).
        """
        hidden_states = maps
        if self.normalize_input:
            # [K, C, h, w] / [K, C, 1, 1]; the clamp keeps all-zero maps at zero.
            hidden_states = hidden_states / hidden_states.sum((-2, -1), keepdim=True).clamp(min=1e-12)

        height, width = hidden_states.shape[-2:]
        if self.upsample_input is not None:
            # A scale factor (not a target size) as in the original: the output size is floor(h * scale)
            # and the sampling grid uses 1 / scale.
            scale_factor = max(1.0, self.upsample_input / max(height, width))
            hidden_states = F.interpolate(hidden_states.float(), scale_factor=scale_factor, mode="bilinear").to(
                hidden_states.dtype
            )
            height, width = hidden_states.shape[-2:]

        # Zero-pad bottom/right so that every max-pool halves exactly.
        divisor = 2 ** (self.num_stages - 1)
        padded_height = math.ceil(height / divisor) * divisor
        padded_width = math.ceil(width / divisor) * divisor
        hidden_states = F.pad(hidden_states, (0, padded_width - width, 0, padded_height - height))
        if self.training and self.channels_last_training and hidden_states.device.type == "cpu":
            # Training on CPU: oneDNN's convolutions run forward+backward about 20% faster on NHWC (BENCHMARKS.md,
            # section 2b), equal to NCHW to float rounding. Inference stays NCHW: there the logits equal the
            # original's bit for bit and do not depend on which examples share a batch (NHWC rounds differently
            # for different batch sizes).
            hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)

        skips = []
        for stage, block in enumerate(self.encoder):
            if stage > 0:
                hidden_states = F.max_pool2d(hidden_states, kernel_size=2)
            hidden_states = block(hidden_states)
            skips.append(hidden_states)
        for stage in range(self.num_stages - 2, -1, -1):
            hidden_states = self.decoder[stage](skips[stage], hidden_states)

        hidden_states = hidden_states[..., :height, :width]
        return self.conv_seg(hidden_states)[:, 0]  # [K, H', W']


def crop_to_content(
    logits: torch.Tensor,
    canvas_size: Sequence[int] | torch.Tensor,
    content_box: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Crop logits predicted on a (letterboxed) canvas to the image region, as the original F-LMM does.

    The canvas and the box may be in any pixel unit (original image pixels, or the LMM's resized
    pixels as the original code used) as long as both use the same one. With `(Hp, Wp)` the logit
    size, the crop starts at `int(top * Hp / canvas_h)` and is `int((bottom - top) * Hp / canvas_h + 0.5)`
    rows tall (columns alike): the original truncates the offset and rounds the extent. The crop keeps at
    least one row and one column (very thin images), so that it can always be resized to the image.

    Args:
        logits (`torch.Tensor` of shape `(..., Hp, Wp)`): logits on the canvas grid.
        canvas_size (`(height, width)`): size of the canvas the LMM saw.
        content_box (`(top, left, bottom, right)`): the image inside the canvas.

    Returns:
        `torch.Tensor` of shape `(..., h, w)`: a view of `logits` over the image region.
    """
    canvas_h, canvas_w = (int(v) for v in canvas_size)
    top, left, bottom, right = (int(v) for v in content_box)
    logit_h, logit_w = logits.shape[-2:]
    start_y = int(top * logit_h / canvas_h)
    start_x = int(left * logit_w / canvas_w)
    # At least one row and column: a very thin image (aspect ratio beyond about 112:1) would round to an empty
    # crop, which no later resize can take; the original fails there, elsewhere the crop is the original's.
    crop_h = max(1, int((bottom - top) * logit_h / canvas_h + 0.5))
    crop_w = max(1, int((right - left) * logit_w / canvas_w + 0.5))
    start_y = min(start_y, logit_h - crop_h)
    start_x = min(start_x, logit_w - crop_w)
    return logits[..., start_y : start_y + crop_h, start_x : start_x + crop_w]
