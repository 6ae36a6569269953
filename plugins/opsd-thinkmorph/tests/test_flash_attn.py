"""The optional flash-attn path of the ViT, against a torch stand-in of flash-attn's documented
variable-length interface (the package itself needs a GPU build): our packing of the images
into one call must give the SDPA path's output."""

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch
from opsd_thinkmorph.model import ImageInputs, SiglipAttention

from opsd_core.api import ConfigError

# The CPU tests' helpers, imported by name (the suite runs in importlib mode).
sys.path.insert(0, str(Path(__file__).parent))
from test_backend import debug_backend


def _stand_in(calls: list) -> types.ModuleType:
    """``flash_attn_varlen_func`` as documented: packed (total, H, d) q/k/v, int32 cumulative
    lengths, sequence i spanning rows cu[i]:cu[i+1], causal masks aligned bottom-right."""

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        calls.append((cu_seqlens_q.tolist(), max_seqlen_q, causal))
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(starts_q) - 1):
            qi = q[starts_q[i] : starts_q[i + 1]].transpose(0, 1)  # (H, Lq, d)
            ki = k[starts_k[i] : starts_k[i + 1]].transpose(0, 1).repeat_interleave(group, 0)
            vi = v[starts_k[i] : starts_k[i + 1]].transpose(0, 1).repeat_interleave(group, 0)
            scores = qi @ ki.transpose(1, 2) / qi.shape[-1] ** 0.5
            if causal:
                lq, lk = qi.shape[1], ki.shape[1]
                allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
                scores = scores.masked_fill(~allowed, float("-inf"))
            out[starts_q[i] : starts_q[i + 1]] = (scores.softmax(-1) @ vi).transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_vit_through_flash_attn_equals_sdpa(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in(calls))
    backend = debug_backend()
    model = backend.build_model().eval()
    generator = torch.Generator().manual_seed(0)
    seqlens = [12, 20, 6]
    config = backend.config.vit
    patches = torch.randn(sum(seqlens), config.patch_dim, generator=generator)
    positions = torch.cat([torch.randperm(config.patches_per_side**2, generator=generator)[:n] for n in seqlens])
    images = ImageInputs(patches=patches, position_ids=positions, seqlens=seqlens)
    with torch.no_grad():
        expected = model.embed_images(images)
        for module in model.modules():
            if isinstance(module, SiglipAttention):
                module.flash = True
        got = model.embed_images(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert calls == [([0, 12, 32, 38], 20, False)] * config.num_layers


def test_flash_attn_setting_is_checked_when_the_backend_is_made(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        debug_backend(vit_attention="flash-attn")
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in([]))
    with pytest.raises(ConfigError, match="CUDA devices only"):
        debug_backend(vit_attention="flash-attn")
    assert not any(m.flash for m in debug_backend().build_model().modules() if isinstance(m, SiglipAttention))
