"""Pseudo-3D inflation: function preservation, the switch-off, and which parameters are temporal."""

import copy

import pytest
import torch
from einops import rearrange

from stages.config import UNetConfig
from stages.temporal import (FrameContext, PseudoAttention, PseudoConv3d, TemporalAttention, frame_positions, inflate,
                             spatial_state_dict, temporal_parameter_names)
from stages.unet import VideoUNet, build_unet2d, widen_input


def _cfg(cross: int | None) -> UNetConfig:
    return UNetConfig(
        block_out_channels=(8, 16),
        attention=(False, True),
        attention_head_dim=8,
        norm_num_groups=4,
        cross_attention_dim=cross,
        temporal_heads=2,
    )


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _per_frame(unet2d, x, t, **kwargs):
    """The 2D network applied to every frame of ``x`` (``b c f h w``)."""
    b, f = x.shape[0], x.shape[2]
    frames = rearrange(x, "b c f h w -> (b f) c h w")
    kwargs = {k: v.repeat_interleave(f, 0) for k, v in kwargs.items()}
    out = unet2d(frames, t.repeat_interleave(f), **kwargs).sample
    return rearrange(out, "(b f) c h w -> b c f h w", b=b)


@pytest.mark.parametrize("cross", [None, 16], ids=["UNet2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("perturbed", [False, True], ids=["init", "perturbed-2d"])
def test_inflation_is_function_preserving(cross, perturbed):
    torch.manual_seed(0)
    cfg = _cfg(cross)
    unet2d = build_unet2d(cfg, in_channels=3)
    if perturbed:
        _perturb(unet2d, 1)
    net = VideoUNet(cfg, unet2d=copy.deepcopy(unet2d)).eval()
    x = torch.randn(2, 3, 5, 16, 16)
    t = torch.tensor([3, 700])
    temb = unet2d.time_embedding.linear_2.out_features
    kwargs = {"class_labels": torch.zeros(2, temb)}
    if cross:
        kwargs["encoder_hidden_states"] = torch.zeros(2, 1, cross)
    with torch.no_grad():
        assert (net(x, t) - _per_frame(unet2d, x, t, **kwargs)).abs().max() < 1e-5


def test_inflate_pretrained_diffusers_dir(tmp_path):
    """A UNet2DConditionModel saved with save_pretrained and loaded with from_pretrained inflates to the same function."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = _cfg(16)
    _perturb(src := build_unet2d(cfg, in_channels=3), 2)
    src.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet", use_safetensors=True)
    net = VideoUNet(cfg, image_embed_dim=12, context_tokens=2, unet2d=copy.deepcopy(loaded)).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    t = torch.tensor([10])
    y = torch.randn(1, 12)
    with torch.no_grad():
        cond = net.image_proj(y)
        tokens = rearrange(net.image_tokens(y), "b (k d) -> b k d", k=2)
        ref = _per_frame(loaded, x, t, class_labels=cond, encoder_hidden_states=tokens)
        assert (net(x, t, image_embeds=y) - ref).abs().max() < 1e-5


def test_new_layers_start_as_identity():
    cfg = _cfg(16)
    net = VideoUNet(cfg)
    convs = [m for m in net.modules() if isinstance(m, PseudoConv3d)]
    attns = [m for m in net.modules() if isinstance(m, PseudoAttention)]
    assert convs and attns
    for m in convs:
        w = m.temporal_conv.weight
        k = w.shape[-1]
        assert torch.equal(w[:, :, k // 2], torch.eye(w.shape[0]))
        assert w[:, :, torch.arange(k) != k // 2].abs().sum() == 0
    for m in attns:
        assert m.temporal_attn.to_out.weight.abs().sum() == 0
        assert m.temporal_attn.to_out.bias.abs().sum() == 0


def test_temporal_off_equals_2d_network_after_training_changes():
    """With temporal layers switched off (or on a single frame) the network is the 2D network, even once
    the temporal layers no longer are the identity."""
    torch.manual_seed(0)
    cfg = _cfg(None)
    unet2d = build_unet2d(cfg, in_channels=3)
    net = VideoUNet(cfg, unet2d=copy.deepcopy(unet2d)).eval()
    _perturb(net, 3)  # every weight moves, temporal ones included
    spatial = build_unet2d(cfg, in_channels=3)
    spatial.load_state_dict({k[len("unet."):]: v for k, v in spatial_state_dict(net).items() if k.startswith("unet.")})
    x = torch.randn(1, 3, 4, 16, 16)
    t = torch.tensor([50])
    temb = unet2d.time_embedding.linear_2.out_features
    ref = _per_frame(spatial, x, t, class_labels=torch.zeros(1, temb))
    with torch.no_grad():
        on = net(x, t)
        net.set_temporal(False)
        off = net(x, t)
        net.set_temporal(True)
        single = torch.cat([net(x[:, :, i : i + 1], t) for i in range(4)], dim=2)
    assert (on - ref).abs().max() > 1e-3  # the perturbed temporal layers do act on videos
    assert (off - ref).abs().max() < 1e-5
    assert (single - ref).abs().max() < 1e-5


def test_temporal_parameter_names_are_exactly_the_added_ones():
    cfg = _cfg(16)
    net = VideoUNet(cfg)
    names = set(temporal_parameter_names(net))
    assert names
    flat = VideoUNet(UNetConfig(**{**cfg.__dict__, "temporal": False}))
    assert len(dict(net.named_parameters())) - len(names) == len(dict(flat.named_parameters()))


def test_inflate_twice_is_an_error():
    unet = build_unet2d(_cfg(None), in_channels=3)
    inflate(unet)
    with pytest.raises(ValueError, match="already inflated"):
        inflate(unet)


def test_widen_input_preserves_function():
    torch.manual_seed(0)
    net = VideoUNet(_cfg(16), image_embed_dim=12, context_tokens=2, fps_cond=True).eval()
    wide = widen_input(net, 4).eval()
    x = torch.randn(1, 3, 3, 16, 16)
    t = torch.tensor([100])
    kw = {"image_embeds": torch.randn(1, 12), "fps": torch.tensor([8.0])}
    with torch.no_grad():
        ref = net(x, t, **kw)
        out = wide(x, t, cond_frames=torch.randn(1, 4, 3, 16, 16), **kw)
    assert (out - ref).abs().max() < 1e-6


def _temporal_conv_as_conv1d(layer: PseudoConv3d, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The temporal conv in its first layout: every pixel's frames as a Conv1d sequence, ``(b h w) c f``."""
    h, w = x.shape[-2:]
    seq = rearrange(layer.spatial(x), "(b f) c h w -> (b h w) c f", f=frames)
    return rearrange(layer.temporal_conv(seq), "(b h w) c f -> (b f) c h w", h=h, w=w)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_temporal_conv_as_conv3d_equals_the_conv1d_layout(channels_last):
    """The (k, 1, 1) Conv3d on the ``b c f h w`` view computes the Conv1d over ``(b h w) c f`` (within round-off),
    from the same parameters; on channels-last memory its result is channels-last, with no copy to undo."""
    torch.manual_seed(0)
    context = FrameContext()
    context.frames = 5
    layer = PseudoConv3d(torch.nn.Conv2d(6, 8, 3, padding=1), context, kernel=3).eval()
    _perturb(layer, 4)
    x = torch.randn(2 * 5, 6, 7, 9)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = layer(x)
        ref = _temporal_conv_as_conv1d(layer, x, 5)
    assert (out - ref).abs().max() < 1e-5
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    # the state dict is the Conv1d's: same names and shapes, so bundles saved before load as they are
    assert layer.state_dict()["temporal_conv.weight"].shape == (8, 8, 3)


def _attention_as_einops(layer: TemporalAttention, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The temporal attention in its first layout: every pixel's frames as a sequence, ``(b h w) f c``, and back."""
    h, w = x.shape[-2:]
    tokens = rearrange(x, "(b f) c h w -> (b h w) f c", f=frames)
    y = layer.norm(tokens) + frame_positions(frames, tokens.shape[-1], x.device, x.dtype)
    q, k, v = rearrange(layer.to_qkv(y), "n f (three nh d) -> three n nh f d", three=3, nh=layer.heads)
    y = layer.to_out(rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "n nh f d -> n f (nh d)"))
    return rearrange(tokens + y, "(b h w) f c -> (b f) c h w", h=h, w=w)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("frames", [1, 4, 16])
def test_temporal_attention_equals_the_einops_layout(frames, heads, channels_last):
    """Per-token ops on ``(b f) h w c`` and attention on strided views compute the ``(b h w) f c`` layout's
    output and gradients (within round-off), from the same parameters, in the input's memory format."""
    torch.manual_seed(0)
    layer = TemporalAttention(8, heads, FrameContext())
    _perturb(layer, 5)  # to_out away from zero, so the attention shows in the output
    x = torch.randn(2 * frames, 8, 5, 6)  # batch 2: (b h w) cannot be a view of (b f) h w
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().requires_grad_()
    out = layer.attend(x, frames)
    ref = _attention_as_einops(layer, x_ref, frames)
    assert (out - ref).abs().max() < 1e-5
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = torch.randn_like(out)
    params = list(layer.parameters())
    got = torch.autograd.grad(out, [x, *params], grad)
    want = torch.autograd.grad(ref, [x_ref, *params], grad)
    for name, g, w in zip(["x", *(n for n, _ in layer.named_parameters())], got, want):
        assert (g - w).abs().max() < 1e-5 * max(1.0, w.abs().max().item()), name
    assert set(layer.state_dict()) == {"norm.weight", "norm.bias", "to_qkv.weight", "to_out.weight", "to_out.bias"}


def test_temporal_attention_switched_off_or_on_one_frame_returns_its_input():
    context = FrameContext()
    layer = TemporalAttention(8, 2, context)
    _perturb(layer, 6)
    x = torch.randn(4, 8, 3, 3)
    context.frames = 1
    assert layer(x) is x
    context.frames, context.enabled = 4, False
    assert layer(x) is x
    context.enabled = True
    assert (layer(x) - x).abs().max() > 1e-3
