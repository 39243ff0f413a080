"""vLLM's Keye model files (``keye.py``, ``keye_vl1_5.py`` of the vllm==0.33.0 wheel) imported as they are, on a machine
without vLLM's engine: everything they import from vLLM that is not model math is a stand-in here (parallel linear
layers as plain ``nn.Linear``, registries and schemas as stubs), so the official layers run unchanged on the CPU.

Used by ``make_fidelity_fixtures.py`` (same folder); nothing here imports keye.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VLLM_REAL = (
    "vllm.model_executor.models.keye",
    "vllm.model_executor.models.keye_vl1_5",
    "vllm.model_executor.layers.rotary_embedding.common",
)


# ------------------------------------------------------------------------------------------------ vLLM stand-ins
class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _Stub(metaclass=_StubMeta):
    """Anything vLLM's module bodies touch but the forward path never runs (registries, schemas, interfaces)."""

    def __init__(self, *a, **k):
        pass

    def __class_getitem__(cls, item):
        return cls

    def __call__(self, *a, **k):
        if len(a) == 1 and not k and callable(a[0]):  # used as a decorator: keep what it decorates
            return a[0]
        return _Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _Linear(nn.Linear):
    def __init__(self, input_size, output_size, bias=True, **kw):
        super().__init__(input_size, output_size, bias=bias)

    def forward(self, x):
        return super().forward(x), None


class _QKV(nn.Linear):
    def __init__(self, hidden_size, head_size, total_num_heads, total_num_kv_heads=None, bias=True, **kw):
        kv = total_num_kv_heads or total_num_heads
        super().__init__(hidden_size, (total_num_heads + 2 * kv) * head_size, bias=bias)

    def forward(self, x):
        return super().forward(x), None


class _Conv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding="valid", **kw):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=padding)


class _EncoderAttention(nn.Module):
    """vLLM's varlen encoder attention: softmax attention within each ``cu_seqlens`` segment."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, **kw):
        super().__init__()
        self.scale = scale

    def forward(self, query, key, value, cu_seqlens, max_seqlen=None):  # (1, N, heads, head_dim)
        out = torch.empty_like(query)
        bounds = cu_seqlens.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            q, k, v = (x[:, s:e].transpose(1, 2) for x in (query, key, value))  # (1, heads, n, d)
            out[:, s:e] = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2)
        return out


class _SiglipMLP(nn.Module):
    def __init__(self, config, **kw):
        super().__init__()
        from transformers.activations import ACT2FN

        self.fc1 = _Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = _Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)[0]))[0]


class _CustomOp(nn.Module):
    def __init__(self, *a, enforce_enable=False, **k):
        super().__init__()

    @staticmethod
    def register(name):
        return lambda cls: cls

    def forward(self, x, cos, sin):
        return self.forward_static(x, cos, sin, self.is_neox_style, self.enable_fp32_compute)


class _PromptReplacement:
    def __init__(self, modality, target, replacement):
        self.modality, self.target, self.replacement = modality, target, replacement


class _PromptUpdateDetails:
    @staticmethod
    def select_token_id(seq, embed_token_id):
        return list(seq)


class _TensorSchema(dict):
    def __init__(self, **kw):
        super().__init__(**kw)


SHIMS = {
    "vllm.model_executor.layers.linear": dict(
        ColumnParallelLinear=_Linear, RowParallelLinear=_Linear, QKVParallelLinear=_QKV
    ),
    "vllm.model_executor.layers.conv": dict(Conv2dLayer=_Conv2d),
    "vllm.model_executor.layers.attention": dict(MMEncoderAttention=_EncoderAttention),
    "vllm.model_executor.models.siglip": dict(SiglipMLP=_SiglipMLP),
    "vllm.model_executor.custom_op": dict(CustomOp=_CustomOp),
    "vllm.distributed": dict(get_tensor_model_parallel_world_size=lambda: 1),
    "vllm.logger": dict(init_logger=logging.getLogger),
    "vllm.platforms": dict(current_platform=types.SimpleNamespace(is_cpu=lambda: True)),
    "vllm.model_executor.models.vision": dict(is_vit_use_data_parallel=lambda: False),
    "vllm.model_executor.models.utils": dict(maybe_prefix=lambda p, n: f"{p}.{n}" if p else n),
    "vllm.utils.torch_utils": dict(
        PIN_MEMORY=False,
        async_tensor_h2d=lambda data, dtype, device, **kw: torch.tensor(data, dtype=dtype, device=device),
    ),
    "vllm.multimodal.processing": dict(
        PromptReplacement=_PromptReplacement, PromptUpdateDetails=_PromptUpdateDetails
    ),
    "vllm.utils.tensor_schema": dict(TensorSchema=_TensorSchema),
}


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = SHIMS.get(self.__name__, {}).get(name)
        if value is None:
            value = type(name, (_Stub,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, src: Path):
        self.src = src

    def find_spec(self, name, path, target=None):
        if name != "vllm" and not name.startswith("vllm."):
            return None
        if name in VLLM_REAL:
            return importlib.util.spec_from_file_location(
                name, self.src.joinpath(*name.split(".")).with_suffix(".py")
            )
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def load_vllm(src: Path):
    for name in VLLM_REAL:
        if not src.joinpath(*name.split(".")).with_suffix(".py").exists():
            raise SystemExit(f"{src}: {name} not found; unzip it from the vllm==0.33.0 wheel")
    sys.meta_path.insert(0, _Finder(src))
    import vllm.model_executor.models.keye as keye_v1
    import vllm.model_executor.models.keye_vl1_5 as keye_v15

    return keye_v1, keye_v15
