#!/usr/bin/env python3
"""Writes the fixtures of tests/import.rs: a small TokenFormer saved the way the authors'
released checkpoints are, and the loss the float64 reference (scripts/reference.py) gives it.

    python3 scripts/make_import_fixtures.py [--out tests/fixtures/import]

Needs PyTorch and NumPy; the files it writes are committed, so `cargo test` needs neither. The
model is built as the official code names its parameters (`sequential.0.word_embeddings`,
`sequential.{i+2}.attention.*`, `sequential.{L+3}.norm`) and saved with a plain `torch.save`:

  fp32/pytorch_model.bin                    the state_dict in float32, as the released files
  fp16-deepspeed/mp_rank_00_model_states.pt  the state_dict in float16 under 'module', with the
                                            other entries a DeepSpeed checkpoint carries
  bf16-pipeline/                            the state_dict in bfloat16 as a pipeline-parallel
                                            DeepSpeed run saves it: 'module': None in
                                            mp_rank_00_model_states.pt, one
                                            layer_NN-model_00-model_states.pt per module
  bf16.safetensors                          the state_dict in bfloat16, safetensors format
  tokens.txt                                token ids to evaluate
  expected.json                             config flags, and the reference loss of each file
                                            (the mean, and at every position)

The reference loss is computed from the values as stored (float16 and bfloat16 widen exactly).
"""

import argparse
import collections
import json
import os
import struct
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

# Small, with every token count different so that a swapped count shows up as a shape error.
CONFIG = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
              qkv_tokens=24, proj_tokens=20, ffn_tokens=40)
SEED = 20241031


class Pattention(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.key_param_tokens = nn.Parameter(torch.empty(n, d))
        self.value_param_tokens = nn.Parameter(torch.empty(n, d))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.query = Pattention(c["qkv_tokens"], d)
        self.key = Pattention(c["qkv_tokens"], d)
        self.value = Pattention(c["qkv_tokens"], d)
        self.proj = Pattention(c["proj_tokens"], d)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.mlp = Pattention(c["ffn_tokens"], c["d_model"])


class Embedding(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["d_model"])


class FinalNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c["d_model"])


class Model(nn.Module):
    """Only the parameter names and shapes of the official model: sequential.1 and
    sequential.{L+2} hold no parameters there either."""

    def __init__(self, c):
        super().__init__()
        layers = [Layer(c) for _ in range(c["n_layers"])]
        self.sequential = nn.Sequential(Embedding(c), nn.Identity(), *layers, nn.Identity(), FinalNorm(c))


def build():
    torch.manual_seed(SEED)
    model = Model(CONFIG)
    # Larger than the training init, so that every layer visibly shapes the loss.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("value_param_tokens"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.normal_()
    return model


def ours(name):
    """The name this project gives a released tensor (SPEC §6.3)."""
    L = CONFIG["n_layers"]
    parts = name.split(".")
    index = int(parts[1])
    rest = ".".join(parts[2:])
    if index == 0:
        return "embed.weight"
    if index == L + 3:
        return "final_norm." + parts[-1]
    return f"layers.{index - 2}.{rest}"


def reference_loss(state_dict, ids):
    params = {ours(k): v.detach().to(torch.float64).numpy() for k, v in state_dict.items()}
    config = dict(CONFIG, qkv_scale_tokens=CONFIG["qkv_tokens"], proj_scale_tokens=CONFIG["proj_tokens"],
                  ffn_scale_tokens=CONFIG["ffn_tokens"], norm="l2_norm_gelu", rotary_pct=0.25,
                  rotary_base=10000.0, tokenizer="byte")
    model = reference.Model(config, params)
    loss, tokens = reference.evaluate(model, ids)
    return {"loss": loss, "tokens": tokens, "losses": reference.per_position(model, ids)}


def write_safetensors(path, state_dict):
    """bfloat16 safetensors, written by hand (the format is a JSON header and raw bytes)."""
    header, chunks, offset = {}, [], 0
    for name, t in state_dict.items():
        raw = t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "import"))
    out = ap.parse_args().out
    model = build()
    rng = np.random.default_rng(SEED)
    # Two full windows and a short last one.
    ids = [int(x) for x in rng.integers(0, CONFIG["vocab_size"], size=40)]

    fp32 = model.state_dict()
    os.makedirs(os.path.join(out, "fp32"), exist_ok=True)
    torch.save(fp32, os.path.join(out, "fp32", "pytorch_model.bin"))

    fp16 = build().half().state_dict()
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    wrapper = {
        "module": fp16,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict((k, v.shape) for k, v in fp16.items())],
        "frozen_param_shapes": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 3,
        "global_samples": 48,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 16, "fp16": {"enabled": True}},
        "ds_version": "0.12.4",
        "iteration": 3,
        "args": {"num_layers": CONFIG["n_layers"], "hidden_size": CONFIG["d_model"]},
        "random_rng_state": None,
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    os.makedirs(os.path.join(out, "fp16-deepspeed"), exist_ok=True)
    torch.save(wrapper, os.path.join(out, "fp16-deepspeed", "mp_rank_00_model_states.pt"))

    bf16 = collections.OrderedDict((k, v.to(torch.bfloat16)) for k, v in fp32.items())
    write_safetensors(os.path.join(out, "bf16.safetensors"), bf16)

    pipeline = os.path.join(out, "bf16-pipeline")
    os.makedirs(pipeline, exist_ok=True)
    torch.save({"module": None, "iteration": 3, "ds_version": "0.12.4"},
               os.path.join(pipeline, "mp_rank_00_model_states.pt"))
    for index, module in enumerate(build().to(torch.bfloat16).sequential):
        layer = module.state_dict()
        if len(layer) > 0:
            torch.save(layer, os.path.join(pipeline, f"layer_{index:02d}-model_00-model_states.pt"))

    with open(os.path.join(out, "tokens.txt"), "w") as f:
        f.write(" ".join(str(i) for i in ids) + "\n")
    expected = {
        "flags": {"heads": CONFIG["n_heads"], "max_seq_len": CONFIG["max_seq_len"]},
        "fp32": reference_loss(fp32, ids),
        "fp16": reference_loss(fp16, ids),
        "bf16": reference_loss(bf16, ids),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
