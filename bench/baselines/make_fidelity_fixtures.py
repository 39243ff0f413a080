"""Make ``tests/fixtures/fidelity/expected.{json,npz}``: what the official Keye-VL-1.5 pipeline computes on a tiny
random checkpoint in the official layout (``official_tiny.py``), for six prompts.

Nothing here imports keye. The official pipeline is assembled from code the Keye team and vLLM published, run as is:

- vLLM's Keye-VL-1.5 model file (``vllm/model_executor/models/keye.py`` and ``keye_vl1_5.py``, vLLM 0.33.0, the wheel
  on PyPI; the same functions as in the repository at 03c11e7643b7) for the vision tower, the projector, the
  per-frame prompt expansion (``_get_prompt_updates``) and the M-RoPE positions (``get_mrope_input_positions``).
  Its tensor-parallel layers, attention kernel and registries are replaced by small single-process stand-ins
  (``_install_vllm_shims``: a Linear that returns ``(y, None)``, per-segment SDPA for the varlen kernel); the
  rotary helper is vLLM's own ``ApplyRotaryEmb.forward_static`` (fp32 compute, as the official code asks).
- keye-vl-utils 1.5.2 (``fetch_image``, ``fetch_video``) for image loading/resizing and Slow-Fast frame selection.
- transformers' Qwen3 decoder layers with transformers' Qwen2-VL M-RoPE (``Qwen2VLRotaryEmbedding``, chunked
  sections) for the language model, which vLLM builds as ``Qwen3ForCausalLM`` with ``mrope_section``.
- ms-swift's ``keye_vl_1_5`` chat template (ChatML, default system prompt "You are a helpful assistant.").

Two rules were transcribed because their file is not published outside the model hub, and are the fixture's stated
assumptions (README, "Fidelity"): the image processor's resize (PIL bicubic to the ``smart_resize`` size, rescale
1/255, mean = std = 0.5, 14x14 patches in row-major order, as vLLM's projector ``(t h p1 w p2)`` layout requires), and
the thinking switch (the model card's usage: ``/think`` or ``/no_think`` appended to the user's text, no pre-filled
think block).

Run in ``.venv-baselines`` (``make bench-baselines``; keye-vl-utils needs torchvision) from the repository root,
with vLLM's model files unpacked somewhere (``pip download --no-deps vllm==0.33.0`` and unzip
``vllm/model_executor/models/keye*.py`` and ``vllm/model_executor/layers/rotary_embedding/common.py``):

    .venv-baselines/bin/python bench/baselines/make_fidelity_fixtures.py --vllm-src /path/to/unzipped
    .venv-baselines/bin/python bench/baselines/make_fidelity_fixtures.py --vllm-src ... --write-files  # + tokenizer

``--write-files`` also rewrites the committed config, tokenizer and processor files and the video clip.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import official_tiny as ot  # noqa: E402
from vllm_shims import load_vllm  # noqa: E402

DEFAULT_SYSTEM = "You are a helpful assistant."
NEW_TOKENS = 8
LOGIT_COLUMNS = 64  # vocabulary columns kept at every position (the last position keeps all)


# ------------------------------------------------------------------------------------------------ the model
def ns(d: dict) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: ns(v) if isinstance(v, dict) else v for k, v in d.items()})


class OfficialModel(nn.Module):
    """vLLM's vision tower and projector (run as published) + transformers' Qwen3 decoder with Qwen2-VL M-RoPE."""

    def __init__(self, folder: Path, keye_v1, keye_v15):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import Qwen3Config, Qwen3ForCausalLM
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

        cfg = json.loads((folder / "config.json").read_text())
        self.cfg = cfg
        config = ns(cfg)
        config.vision_config.num_channels = 3
        self.visual = keye_v1.KeyeSiglipVisionModel(config.vision_config)
        self.mlp_AR = keye_v15.KeyeVL1_5Projector(config, config.vision_config)
        self.merge_size = config.vision_config.spatial_merge_size
        text = {
            k: cfg[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rms_norm_eps",
                "tie_word_embeddings",
            )
        }
        rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
        self.llm = Qwen3ForCausalLM(Qwen3Config(**text, rope_parameters=rope, attn_implementation="eager"))
        # not a submodule: its inverse frequencies stay fp32 when the weights go to bf16, as in vLLM
        self.__dict__["rotary"] = Qwen2VLRotaryEmbedding(
            Qwen2VLTextConfig(
                **text, rope_parameters={**rope, "mrope_section": cfg["rope_scaling"]["mrope_section"]}
            )
        )
        state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        ours = {}
        for k, v in state.items():
            if k.startswith("visual.vision_model.head."):
                continue
            if k.startswith(("model.", "lm_head.")):
                ours["llm." + k] = v
            elif ".self_attn.q_proj." in k:
                kk, vv = k.replace("q_proj", "k_proj"), k.replace("q_proj", "v_proj")
                ours[k.replace("q_proj", "qkv_proj")] = torch.cat([v, state[kk], state[vv]])
            elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
                continue
            else:
                ours[k] = v
        missing, unexpected = self.load_state_dict(ours, strict=False)
        missing = [m for m in missing if not m.endswith(("inv_freq", "position_ids"))]
        assert not missing and not unexpected, (missing, unexpected)

    def embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, num_frames):
        emb = self.llm.model.embed_tokens(input_ids)  # (T, D)
        if pixel_values is not None:
            feats = torch.cat(
                self._v1.BaseKeyeModule._process_image_input(
                    self,
                    {"type": "pixel_values", "pixel_values": pixel_values, "image_grid_thw": image_grid_thw},
                )
            )
            mask = input_ids == self.cfg["image_token_id"]
            emb[mask] = feats.to(emb.dtype)
        if pixel_values_videos is not None:
            feats = torch.cat(
                self._v15.KeyeVL1_5ForConditionalGeneration._process_video_input(
                    self,
                    {
                        "type": "pixel_values_videos",
                        "pixel_values_videos": pixel_values_videos,
                        "video_grid_thw": video_grid_thw,
                        "num_frames": num_frames,
                    },
                )
            )
            mask = input_ids == self.cfg["video_token_id"]
            emb[mask] = feats.to(emb.dtype)
        return emb

    def _process_video_embeds(self, *a):
        return self._v1.BaseKeyeModule._process_video_embeds(self, *a)

    def decode(self, emb: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``(T, vocab)`` for embeddings ``(T, D)`` at M-RoPE positions ``(3, T)``."""
        h = emb[None]
        cos, sin = self.rotary(h, positions[:, None, :])
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        for layer in self.llm.model.layers:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), use_cache=False)
            h = h[0] if isinstance(h, tuple) else h
        return self.llm.lm_head(self.llm.model.norm(h))[0]


def set_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Weights only, as vLLM loads a bf16 model: buffers (rotary inverse frequencies) keep their fp32 values."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------------------------ the processor
def patchify(img: np.ndarray, patch: int) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ``(H/p * W/p, 3, p, p)`` row-major, rescaled by 1/255 and normalised (mean = std = 0.5)."""
    h, w = img.shape[:2]
    x = torch.from_numpy(img).float() * (1 / 255)
    x = (x - 0.5) / 0.5
    return x.view(h // patch, patch, w // patch, patch, 3).permute(0, 2, 4, 1, 3).reshape(-1, 3, patch, patch)


def processor_resize(img, pre: dict, keye_v1):
    from PIL import Image

    h, w = keye_v1.smart_resize(
        img.height, img.width, pre["patch_size"] * pre["merge_size"], pre["min_pixels"], pre["max_pixels"]
    )
    return np.asarray(img.resize((w, h), Image.BICUBIC))


def render(messages: list[dict]) -> str:
    """ms-swift's keye_vl_1_5 template: ChatML with the default system prompt; media as vision placeholders."""
    out = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    for m in messages:
        text = m["content"] if isinstance(m["content"], str) else ""
        if not isinstance(m["content"], str):
            for part in m["content"]:
                if part["type"] == "text":
                    text += part["text"]
                else:
                    text += "<|vision_start|><|{}_pad|><|vision_end|>".format(part["type"])
        out += f"<|im_start|>{m['role']}\n{text}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def run_prompt(name, messages, folder, media, model, keye_v1, keye_v15, tokenizer):
    from keye_vl_utils.vision_process import fetch_image, fetch_video
    from PIL import Image

    pre = json.loads((folder / "preprocessor_config.json").read_text())
    cfg = model.cfg
    ids = tokenizer(render(messages), add_special_tokens=False)["input_ids"]
    images, videos = [], []
    for m in messages:
        for part in [] if isinstance(m["content"], str) else m["content"]:
            if part["type"] == "image":
                images.append(fetch_image({"image": str(media / part["image"])}))
            elif part["type"] == "video":
                videos.append(fetch_video({"video": str(media / part["video"])}))
    pix, grids = [], []
    for img in images:
        arr = processor_resize(img, pre, keye_v1)
        pix.append(patchify(arr, pre["patch_size"]))
        grids.append([1, arr.shape[0] // pre["patch_size"], arr.shape[1] // pre["patch_size"]])
    vpix, vgrids, nframes, frame_types, timestamps = [], [], [], [], []
    for frames, kw in videos:  # frames (T, C, H, W) uint8 at native size; kw: keye-vl-utils' processor kwargs
        types_ = kw["frame_types"].tolist()
        for frame, ft in zip(frames, types_):
            size = (kw["fast_width"], kw["fast_height"]) if ft == 1 else (kw["width"], kw["height"])
            arr = np.asarray(Image.fromarray(frame.permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC))
            vpix.append(patchify(arr, pre["patch_size"]))
            vgrids.append([1, arr.shape[0] // pre["patch_size"], arr.shape[1] // pre["patch_size"]])
        nframes.append(len(types_))
        frame_types.append(types_)
        timestamps.append(kw["timestamps"].tolist())

    # vLLM's prompt expansion: each <|video_pad|> becomes the per-frame layout (frame marker, timestamp, fast markers)
    hf_processor = types.SimpleNamespace(
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        frame_token="<|frame|>",
        fast_start="<|fast_start|>",
        fast_end="<|fast_end|>",
    )
    grid_items = {"image": [{"image_grid_thw": types.SimpleNamespace(data=torch.tensor(g))} for g in grids]}

    class _Items(dict):
        def get_data(self):
            return {
                "video_grid_thw": torch.tensor(vgrids or [[0, 0, 0]])[: len(vgrids)],
                "num_frames": torch.tensor(nframes, dtype=torch.long),
            }

    fake = types.SimpleNamespace(
        info=types.SimpleNamespace(
            get_hf_processor=lambda **k: hf_processor,
            get_image_processor=lambda **k: types.SimpleNamespace(merge_size=pre["merge_size"]),
            get_tokenizer=lambda: tokenizer,
        )
    )
    mm_items = types.SimpleNamespace(get_count=lambda modality, strict=False: len(videos))
    kwargs = {"frame_types": frame_types, "timestamps": timestamps} if videos else {}
    updates = keye_v15.KeyeVL1_5MultiModalProcessor._get_prompt_updates(
        fake, mm_items, kwargs, _Items(grid_items)
    )
    replace = {u.modality: u for u in updates}
    expanded, counters, features = [], {"image": 0, "video": 0}, []
    targets = {cfg["image_token_id"]: "image", cfg["video_token_id"]: "video"}
    for tok in ids:
        modality = targets.get(tok)
        if modality is None:
            expanded.append(tok)
            continue
        rep = replace[modality].replacement(counters[modality])
        counters[modality] += 1
        offset = len(expanded)
        expanded.extend(rep)
        features.append((modality, offset, rep))

    # vLLM's M-RoPE positions, fed what its feature specs carry (embed ranges and grids)
    def iter_grids(mm_features):
        merge = pre["merge_size"]
        img_i, vid_frame = 0, 0
        for modality, offset, rep in mm_features:
            if modality == "image":
                t, h, w = grids[img_i]
                img_i += 1
                yield offset, t, h // merge, w // merge
            else:
                token = cfg["video_token_id"]
                runs, i = [], 0
                while i < len(rep):
                    if rep[i] == token:
                        j = i
                        while j < len(rep) and rep[j] == token:
                            j += 1
                        runs.append(offset + i)
                        i = j
                    else:
                        i += 1
                for start in runs:
                    t, h, w = vgrids[vid_frame]
                    vid_frame += 1
                    yield start, t, h // merge, w // merge

    pos_self = types.SimpleNamespace(iter_mm_grid_thw=iter_grids)
    positions, _ = keye_v15.KeyeVL1_5ForConditionalGeneration.get_mrope_input_positions(
        pos_self, expanded, features
    )
    input_ids = torch.tensor(expanded)
    inputs = dict(
        pixel_values=torch.cat(pix) if pix else None,
        image_grid_thw=torch.tensor(grids) if grids else None,
        pixel_values_videos=torch.cat(vpix) if vpix else None,
        video_grid_thw=torch.tensor(vgrids) if vgrids else None,
        num_frames=torch.tensor(nframes) if vgrids else None,
    )
    out = {"input_ids": expanded, "position_ids": positions.tolist()}
    if grids:
        out["image_grid_thw"] = grids
    if vgrids:
        out["video_grid_thw"] = vgrids
        out["frame_types"] = frame_types
        out["timestamps"] = [[round(t, 6) for t in ts] for ts in timestamps]
    arrays = {}
    for dtype, tag in ((torch.float32, ""), (torch.bfloat16, "_bf16")):
        set_dtype(model, dtype)
        cast = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.no_grad():
            emb = model.embed(input_ids, **cast)
            logits = model.decode(emb, positions).float()
            if tag == "":
                cols = np.random.RandomState(0).choice(logits.shape[1], LOGIT_COLUMNS, replace=False)
                arrays[f"{name}.columns"] = cols
                arrays[f"{name}.logits_columns"] = logits[:, cols].numpy()
                # greedy decoding: text positions continue from the largest index so far, on all three axes
                seq, pos, greedy = input_ids.clone(), positions.clone(), []
                for _ in range(NEW_TOKENS):
                    nxt = int(model.decode(model.embed(seq, **cast), pos)[-1].argmax())
                    greedy.append(nxt)
                    seq = torch.cat([seq, torch.tensor([nxt])])
                    pos = torch.cat([pos, (pos.max() + 1).repeat(3, 1)], dim=1)
                out["greedy"] = greedy
            arrays[f"{name}.logits_last{tag}"] = logits[-1].numpy()
    set_dtype(model, torch.float32)
    out["bf16_max_abs_error"] = float(
        np.abs(arrays[f"{name}.logits_last_bf16"] - arrays[f"{name}.logits_last"]).max()
    )
    return out, arrays


PROMPTS = {
    "image": [
        {"role": "user", "content": [{"type": "image", "image": "picture.png"}, {"type": "text", "text": "What is shown?"}]}
    ],
    "video": [
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "What happens?"}]}
    ],
    "two_turn": [
        {"role": "user", "content": [{"type": "image", "image": "picture.png"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A red disc on a grey field."},
        {"role": "user", "content": "What colour is the field?"},
    ],
    "think": [
        {"role": "user", "content": [{"type": "image", "image": "picture.png"}, {"type": "text", "text": "How many discs?/think"}]}
    ],
    "no_think": [
        {"role": "user", "content": [{"type": "image", "image": "picture.png"}, {"type": "text", "text": "How many discs?/no_think"}]}
    ],
    "large_image": [
        {"role": "user", "content": [{"type": "image", "image": "large.png"}, {"type": "text", "text": "Read the sign."}]}
    ],
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ committed files
def write_files() -> None:
    """The tokenizer (byte-level BPE + Qwen's special tokens), config.json, processor files and the video."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = ot.CHECKPOINT_FILES
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [
        "You are a helpful assistant. What is shown? Describe it. What happens? How many discs?",
        "A red disc on a grey field. What colour is the field? Read the sign. /think /no_think",
        "system user assistant 0 1 2 3 4 5 6 7 8 9 0.0 0.5 1.0 1.5 2.0 2.5 3.0 3.5 4.0 the a of and",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=ot.SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.save_pretrained(folder)
    vocab = fast.get_vocab()
    cfg = {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"],
        "model_type": "KeyeVL1_5",
        "vocab_size": len(vocab),
        **{k: v for k, v in ot.TEXT.items() if k not in ("rope_theta", "mrope_section")},
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "rope_theta": ot.TEXT["rope_theta"],
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": ot.TEXT["mrope_section"]},
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "vision_token_id": vocab["<|vision_pad|>"],
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "torch_dtype": "bfloat16",
        "vision_config": {
            **ot.VISION,
            "model_type": "siglip_vision_model",
            "hidden_act": "gelu_pytorch_tanh",
            "num_channels": 3,
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    pre = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "min_pixels": 3136,
        "max_pixels": 1003520,
        "patch_size": 14,
        "temporal_patch_size": 1,
        "merge_size": 2,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    template = (
        "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
        "{{ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": vocab["<|im_end|>"], "pad_token_id": vocab["<|endoftext|>"]}, indent=2)
        + "\n"
    )
    ot.MEDIA.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(ot.natural_image(220, 300, seed=5)).save(ot.MEDIA / "picture.png")
    write_clip(ot.MEDIA / "clip.mp4")


def write_clip(path: Path) -> None:
    """4 s, 12 fps, 320x240 h264: a square moving over a still texture, a hard cut at 2 s to black-and-white stripes
    (HSV unlike the texture, so the plan has two slow frames and fast ones)."""
    import av

    stripes = np.tile((np.arange(320) // 14 % 2 * 220).astype(np.uint8)[None, :, None], (240, 1, 3))
    scenes = [ot.natural_image(240, 320, seed=21), stripes]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"crf": "28", "g": "12"}
        for i in range(48):
            img = scenes[i // 24].copy()
            x = 20 + 8 * (i % 24)
            img[100:140, x : x + 40] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


BUDGETS = [384, 400, 450, 500, 560, 640, 800, 1000, 2000, 65536]  # tokens; 8 frames need at least 384


def video_budgets(clip: Path) -> list[dict]:
    """keye-vl-utils' frame sizes for the clip at several token budgets (``video_total_pixels``)."""
    from keye_vl_utils.vision_process import fetch_video

    out = []
    for budget in BUDGETS:
        _, kw = fetch_video({"video": str(clip), "video_total_pixels": budget * 28 * 28})
        out.append(
            {
                "token_budget": budget,
                "frame_types": kw["frame_types"].tolist(),
                "slow_hw": [kw["height"], kw["width"]],
                "fast_hw": [kw["fast_height"], kw["fast_width"]],
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--vllm-src", type=Path, required=True, help="folder holding vllm/model_executor/models/keye*.py"
    )
    p.add_argument(
        "--write-files", action="store_true", help="also rewrite the committed tokenizer/config/media"
    )
    args = p.parse_args()
    torch.manual_seed(0)
    if args.write_files:
        write_files()
    keye_v1, keye_v15 = load_vllm(args.vllm_src)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "official-tiny"
        sha = ot.build_checkpoint(folder)
        media = Path(tmp) / "media"
        media.mkdir()
        for f in ot.MEDIA.iterdir():
            (media / f.name).write_bytes(f.read_bytes())
        ot.write_large_image(media / "large.png")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = OfficialModel(folder, keye_v1, keye_v15).eval()
        model._v1, model._v15 = keye_v1, keye_v15
        expected, arrays = {"weights_sha256": sha, "new_tokens": NEW_TOKENS, "prompts": {}}, {}
        for name, messages in PROMPTS.items():
            out, arr = run_prompt(name, messages, folder, media, model, keye_v1, keye_v15, tokenizer)
            out["messages"] = messages
            expected["prompts"][name] = out
            arrays.update(arr)
            print(
                name,
                len(out["input_ids"]),
                "tokens, greedy",
                out["greedy"],
                "bf16 err",
                out["bf16_max_abs_error"],
            )
    expected["video_budgets"] = video_budgets(ot.MEDIA / "clip.mp4")
    (ot.FIXTURE / "expected.json").write_text(json.dumps(expected) + "\n")
    np.savez_compressed(ot.FIXTURE / "expected.npz", **arrays)


if __name__ == "__main__":
    main()
