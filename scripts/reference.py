#!/usr/bin/env python3
"""Float64 NumPy reference for the TokenFormer language model (docs/SPEC.md §1, §2, §6).

Reads a checkpoint directory (config.json + model.safetensors) and a file of
whitespace-separated token ids, and prints the evaluation loss the way
`tokenformer eval --json` defines it: next-token cross-entropy over windows of at most
max_seq_len+1 ids starting at 0, T, 2T, ... (T = max_seq_len; a last window of fewer than
2 ids is dropped), averaged over every predicted position.

    python3 scripts/reference.py --checkpoint DIR --tokens FILE

Only NumPy is needed; the safetensors file is parsed here directly.
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

LN_EPS = 1e-5
NORMS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")

_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
}


def read_safetensors(path):
    """Returns {name: float64 array} from a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError(f"{path}: header length {header_len} runs past the end of the file")
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        shape = [int(s) for s in info["shape"]]
        start, end = (int(x) for x in info["data_offsets"])
        raw = body[start:end]
        if dtype == "BF16":
            u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u16.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[dtype])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        count = int(np.prod(shape)) if shape else 1
        if arr.size != count:
            raise ValueError(f"{path}: tensor {name} has {arr.size} elements, shape {shape} needs {count}")
        tensors[name] = arr.astype(np.float64).reshape(shape)
    return tensors


def load_checkpoint(directory):
    with open(os.path.join(directory, "config.json"), "r", encoding="utf-8") as f:
        config = json.load(f)
    params = read_safetensors(os.path.join(directory, "model.safetensors"))
    return config, params


_erfc = np.frompyfunc(math.erfc, 1, 1)


def gelu(x):
    """Exact GELU, x·Φ(x) = ½x(1 + erf(x/√2)), in float64.

    Evaluated as ½x·erfc(−x/√2), which equals it and keeps full relative accuracy in the
    negative tail, where 1 + erf cancels (it matters to gelu_l2_norm, whose normalisation
    turns a row of tiny GELU values into a unit vector).
    """
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def layer_norm(x, weight=None, bias=None):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    y = centred / np.sqrt(var + LN_EPS)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def theta(a, tau, norm):
    """Θ applied to every row of the score matrix a (rows × n parameter tokens)."""
    if norm == "l2_norm_gelu":
        r = np.sqrt((a * a).sum(axis=-1, keepdims=True))
        safe = np.where(r > 0.0, r, 1.0)
        z = np.where(r > 0.0, tau * a / safe, 0.0)
        return gelu(z)
    if norm == "gelu_l2_norm":
        h = gelu(a)
        rho = np.sqrt((h * h).sum(axis=-1, keepdims=True))
        safe = np.where(rho > 0.0, rho, 1.0)
        return np.where(rho > 0.0, tau * h / safe, 0.0)
    if norm == "softmax":
        shifted = a - a.max(axis=-1, keepdims=True)
        e = np.exp(shifted)
        return tau * tau * e / e.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown norm '{norm}' (expected one of {', '.join(NORMS)})")


def pattention(x, keys, values, tau, norm):
    """O = Θ(X·Kᵀ)·V."""
    return theta(x @ keys.T, tau, norm) @ values


def rope(x, rotary_dims, base):
    """GPT-NeoX rotary embedding on the first rotary_dims of the last axis; x is (..., T, d_h)."""
    r = rotary_dims
    if r == 0:
        return x
    seq = x.shape[-2]
    half = r // 2
    inv_freq = base ** (-2.0 * np.arange(half, dtype=np.float64) / r)
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(angles), np.sin(angles)
    rot = x[..., :r]
    rotated_half = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = x.copy()
    out[..., :r] = rot * cos + rotated_half * sin
    return out


class Model:
    def __init__(self, config, params):
        self.config = config
        self.params = params
        self.vocab = int(config["vocab_size"])
        self.d = int(config["d_model"])
        self.n_layers = int(config["n_layers"])
        self.n_heads = int(config["n_heads"])
        self.max_seq_len = int(config["max_seq_len"])
        self.norm = config["norm"]
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm '{self.norm}'")
        if self.d % self.n_heads != 0:
            raise ValueError("n_heads does not divide d_model")
        self.head_dim = self.d // self.n_heads
        self.rotary_dims = int(math.floor(float(config["rotary_pct"]) * self.head_dim))
        if self.rotary_dims % 2 != 0:
            raise ValueError(f"rotary dims {self.rotary_dims} must be even")
        self.rotary_base = float(config["rotary_base"])
        self.tau_qkv = math.sqrt(int(config["qkv_scale_tokens"]))
        self.tau_proj = math.sqrt(int(config["proj_scale_tokens"]))
        self.tau_ffn = math.sqrt(int(config["ffn_scale_tokens"]))
        self._check_shapes()

    def _check_shapes(self):
        c = self.config
        expected = {
            "embed.weight": (self.vocab, self.d),
            "final_norm.weight": (self.d,),
            "final_norm.bias": (self.d,),
        }
        for i in range(self.n_layers):
            for name in ("query", "key", "value", "proj"):
                n = int(c["proj_tokens"] if name == "proj" else c["qkv_tokens"])
                for leaf in ("key_param_tokens", "value_param_tokens"):
                    expected[f"layers.{i}.attention.{name}.{leaf}"] = (n, self.d)
            for leaf in ("key_param_tokens", "value_param_tokens"):
                expected[f"layers.{i}.mlp.{leaf}"] = (int(c["ffn_tokens"]), self.d)
        for name, shape in expected.items():
            if name not in self.params:
                raise ValueError(f"missing tensor {name}")
            if tuple(self.params[name].shape) != shape:
                raise ValueError(f"tensor {name} has shape {self.params[name].shape}, expected {shape}")

    def _p(self, prefix):
        return self.params[prefix + ".key_param_tokens"], self.params[prefix + ".value_param_tokens"]

    def logits(self, ids):
        """Logits (T × V) for one sequence of token ids."""
        p = self.params
        ids = np.asarray(ids, dtype=np.int64)
        seq = ids.shape[0]
        x = p["embed.weight"][ids]
        h, dh = self.n_heads, self.head_dim
        causal = np.tril(np.ones((seq, seq), dtype=bool))
        for i in range(self.n_layers):
            pre = f"layers.{i}"
            y = layer_norm(x)
            q = pattention(y, *self._p(pre + ".attention.query"), self.tau_qkv, self.norm)
            k = pattention(y, *self._p(pre + ".attention.key"), self.tau_qkv, self.norm)
            v = pattention(y, *self._p(pre + ".attention.value"), self.tau_qkv, self.norm)
            q = q.reshape(seq, h, dh).transpose(1, 0, 2)
            k = k.reshape(seq, h, dh).transpose(1, 0, 2)
            v = v.reshape(seq, h, dh).transpose(1, 0, 2)
            q = rope(q, self.rotary_dims, self.rotary_base)
            k = rope(k, self.rotary_dims, self.rotary_base)
            scores = (q @ k.transpose(0, 2, 1)) / math.sqrt(dh)
            scores = np.where(causal[None, :, :], scores, -np.inf)
            scores = scores - scores.max(axis=-1, keepdims=True)
            w = np.exp(scores)
            w = w / w.sum(axis=-1, keepdims=True)
            att = (w @ v).transpose(1, 0, 2).reshape(seq, self.d)
            x = x + pattention(att, *self._p(pre + ".attention.proj"), self.tau_proj, self.norm)
            x = x + pattention(layer_norm(x), *self._p(pre + ".mlp"), self.tau_ffn, self.norm)
        x = layer_norm(x, p["final_norm.weight"], p["final_norm.bias"])
        return x @ p["embed.weight"].T

    def nll_positions(self, window):
        """−log p(next id) at each of the len(window)−1 positions of one window."""
        window = np.asarray(window, dtype=np.int64)
        logits = self.logits(window[:-1])
        m = logits.max(axis=-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
        targets = window[1:]
        picked = logits[np.arange(targets.shape[0]), targets]
        return logz - picked

    def nll_sum(self, window):
        """Sum of −log p(next id) over the len(window)−1 positions of one window."""
        return float(self.nll_positions(window).sum())


def windows(ids, max_seq_len):
    t = max_seq_len
    out = []
    for start in range(0, len(ids), t):
        w = ids[start : start + t + 1]
        if len(w) >= 2:
            out.append(w)
    return out


def evaluate(model, ids):
    """(mean loss, predicted positions) over the eval windows of ids."""
    for i in ids:
        if not 0 <= i < model.vocab:
            raise ValueError(f"token id {i} is outside the vocabulary (size {model.vocab})")
    ws = windows(ids, model.max_seq_len)
    if not ws:
        raise ValueError(f"{len(ids)} token ids give no position to predict (need at least 2)")
    total = 0.0
    count = 0
    for w in ws:
        total += model.nll_sum(w)
        count += len(w) - 1
    return total / count, count


def per_position(model, ids):
    """−log p(ids[i+1]) for every id after the first, in stream order (what
    `tokenformer eval --per-token` writes)."""
    return [float(x) for w in windows(ids, model.max_seq_len) for x in model.nll_positions(w)]


def read_token_ids(path):
    with open(path, "r", encoding="utf-8") as f:
        return [int(s) for s in f.read().split()]


def evaluate_checkpoint(checkpoint, ids):
    config, params = load_checkpoint(checkpoint)
    return evaluate(Model(config, params), ids)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory")
    ap.add_argument("--tokens", required=True, help="file of whitespace-separated token ids")
    ap.add_argument("--per-token", action="store_true", help="also print the loss at every position")
    args = ap.parse_args(argv)
    try:
        ids = read_token_ids(args.tokens)
        config, params = load_checkpoint(args.checkpoint)
        model = Model(config, params)
        loss, tokens = evaluate(model, ids)
        out = {"loss": loss, "tokens": tokens}
        if args.per_token:
            out["losses"] = per_position(model, ids)
    except (OSError, ValueError, KeyError) as e:
        print(f"reference: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
