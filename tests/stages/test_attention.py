"""Sparse-causal attention: frame i's queries see exactly frames 0 and i − 1; the mode adds no weights, is
chosen in the config, and leaves images (f = 1) and the default mode unchanged."""

from dataclasses import replace

import pytest
import torch
from einops import rearrange

from stages.attention import SparseCausalAttnProcessor, sparse_causal_context, spatial_self_attentions, use_spatial_attention
from stages.config import UNetConfig
from stages.temporal import FrameContext
from stages.unet import VideoUNet


def _cfg(mode: str = "full", cross: int | None = 16) -> UNetConfig:
    return UNetConfig(block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8, norm_num_groups=4,
                      cross_attention_dim=cross, temporal_heads=2, spatial_attention=mode)


def _net(mode: str, cross: int | None = 16) -> VideoUNet:
    torch.manual_seed(0)
    net = VideoUNet(_cfg(mode, cross), image_embed_dim=8 if cross else 0, context_tokens=2 if cross else 0).eval()
    with torch.no_grad():  # temporal layers away from identity, so that frames interact through them too
        for name, p in net.named_parameters():
            if "temporal" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    return net


def _inputs(f: int, cross: bool = True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, f, 8, 8, generator=g)
    kwargs = {"image_embeds": torch.randn(2, 8, generator=g)} if cross else {}
    return x, torch.tensor([10, 500]), kwargs


def test_context_is_frame_zero_then_the_previous_frame():
    b, f, n = 2, 5, 3
    x = torch.arange(b * f, dtype=torch.float32)[:, None, None].expand(b * f, n, 4)  # token value = (b, frame) id
    ctx = rearrange(sparse_causal_context(x, f), "(b f) t c -> b f t c", f=f)
    for i in range(b):
        for j in range(f):
            assert ctx[i, j, :n].eq(i * f).all()                  # frame 0 of the same video
            assert ctx[i, j, n:].eq(i * f + max(j - 1, 0)).all()  # frame j - 1 (frame 0 for frame 0)


@pytest.mark.parametrize("cross", [16, None], ids=["cross-attention U-Net", "UNet2DModel"])
def test_keys_and_values_are_frames_zero_and_previous(cross):
    """On the attention's inputs: the tokens projected to keys and values are frame 0's and frame i − 1's
    tokens, those projected to queries frame i's, in every spatial self-attention of the network."""
    net, f = _net("sparse_causal", cross), 4
    attns = spatial_self_attentions(net.unet)
    assert attns and all(isinstance(a.processor, SparseCausalAttnProcessor) for a in attns)
    seen = {}
    hooks = [getattr(a, proj).register_forward_hook(lambda m, i, o, key=(k, proj): seen.__setitem__(key, i[0]))
             for k, a in enumerate(attns) for proj in ("to_q", "to_k", "to_v")]
    x, t, kwargs = _inputs(f, cross is not None)
    with torch.no_grad():
        net(x, t, **kwargs)
    for h in hooks:
        h.remove()
    for k in range(len(attns)):
        q = rearrange(seen[k, "to_q"], "(b f) n c -> b f n c", f=f)
        n = q.shape[2]
        for proj in ("to_k", "to_v"):
            kv = rearrange(seen[k, proj], "(b f) t c -> b f t c", f=f)
            assert kv.shape[2] == 2 * n
            for i in range(f):
                torch.testing.assert_close(kv[:, i, :n], q[:, 0], rtol=0, atol=0)
                torch.testing.assert_close(kv[:, i, n:], q[:, max(i - 1, 0)], rtol=0, atol=0)


def test_a_frame_depends_on_frames_zero_previous_and_itself_only():
    """One spatial self-attention alone: changing frame j's tokens changes frame i's output iff j ∈ {0, i − 1, i}."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    context = FrameContext()
    context.frames = f = 5
    attn.set_processor(SparseCausalAttnProcessor(context))
    x = torch.randn(f, 6, 8)
    with torch.no_grad():
        base = attn(x)
        for j in range(f):
            y = x.clone()
            y[j] += 1.0
            changed = (attn(y) - base).abs().flatten(1).amax(1) > 1e-6
            assert changed.tolist() == [j in (0, i - 1, i) for i in range(f)]


def test_an_image_and_one_frame_compute_what_full_attention_computes():
    full, sparse = _net("full"), _net("sparse_causal")
    sparse.load_state_dict(full.state_dict())
    x, t, kwargs = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x, t, **kwargs), full(x, t, **kwargs))
        x, t, kwargs = _inputs(3)
        assert not torch.allclose(sparse(x, t, **kwargs), full(x, t, **kwargs), atol=1e-4)
        sparse.set_temporal(False)
        full.set_temporal(False)  # temporal layers off: the 2D network on each frame, whatever the mode
        torch.testing.assert_close(sparse(x, t, **kwargs), full(x, t, **kwargs))


def test_switching_a_loaded_network_keeps_its_weights_and_matches_one_built_sparse():
    full = _net("full")
    state = {k: v.clone() for k, v in full.state_dict().items()}
    use_spatial_attention(full, "sparse_causal")
    assert full.cfg.spatial_attention == "sparse_causal"
    assert full.state_dict().keys() == state.keys()
    assert all(torch.equal(full.state_dict()[k], v) for k, v in state.items())
    built = VideoUNet(replace(full.cfg), image_embed_dim=8, context_tokens=2).eval()
    built.load_state_dict(state)
    x, t, kwargs = _inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(full(x, t, **kwargs), built(x, t, **kwargs))
        use_spatial_attention(full, "full")
        torch.testing.assert_close(full(x, t, **kwargs), _net("full")(x, t, **kwargs))


def test_unknown_mode_is_refused_by_name():
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="spatial_attention"):
        _cfg("causal")
