#!/usr/bin/env python3
"""Checks `tokenformer eval` against the float64 reference in scripts/reference.py.

For each case: a random small config (1-3 layers, head dim 8 or 16, token counts that are
not powers of two, τ token counts that sometimes differ from the token counts, as after
growth), a checkpoint written here with random f32 tensors, and random token-id files of
assorted lengths. The binary's loss must match the reference to a relative 1e-5. For the
l2 variants the checkpoint is also grown with `tokenformer grow` and the grown model's
eval output must be bit-identical to the original's; every grown model (softmax included,
whose growth is not output-preserving) is also checked against the reference.

    python3 scripts/reference_check.py --binary target/release/tokenformer --cases 30
"""

import argparse
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

REL_TOL = 1e-5
NORMS = reference.NORMS


def write_safetensors(path, tensors):
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def non_power_of_two(rng, lo, hi):
    while True:
        n = rng.randint(lo, hi)
        if n & (n - 1) != 0:
            return n


def random_config(rng, norm):
    head_dim = rng.choice([8, 16])
    n_heads = rng.randint(1, 4)
    qkv = non_power_of_two(rng, 3, 90)
    proj = non_power_of_two(rng, 3, 90)
    ffn = non_power_of_two(rng, 5, 150)

    def scale(n):
        # n₀ of τ = √n₀: the creation count, smaller than n after growth; now and then larger.
        u = rng.random()
        if u < 0.4:
            return n
        if u < 0.85:
            return rng.randint(1, n)
        return rng.randint(n + 1, 2 * n + 5)

    pct = rng.choice([0.25, 0.25, 0.25, 0.5, 1.0, 0.0])
    return {
        "vocab_size": rng.randint(20, 300),
        "d_model": head_dim * n_heads,
        "n_layers": rng.randint(1, 3),
        "n_heads": n_heads,
        "max_seq_len": rng.randint(8, 40),
        "qkv_tokens": qkv,
        "proj_tokens": proj,
        "ffn_tokens": ffn,
        "qkv_scale_tokens": scale(qkv),
        "proj_scale_tokens": scale(proj),
        "ffn_scale_tokens": scale(ffn),
        "norm": norm,
        "rotary_pct": pct,
        "rotary_base": rng.choice([10000.0, 10000.0, 10000.0, 500.0]),
        "tokenizer": "byte",
    }


def random_params(rng, nprng, config):
    """Random tensors; returns (params, notes on the edge cases planted)."""
    v, d, layers = config["vocab_size"], config["d_model"], config["n_layers"]
    norm = config["norm"]
    notes = []
    embed_std = rng.uniform(0.2, 0.5)
    key_std = 0.02 * rng.choice([1.0, 5.0, 10.0] if norm == "softmax" else [5.0, 10.0, 25.0, 50.0])
    # Large enough that the Pattention outputs dominate the residual stream (so the loss is
    # sensitive to Θ), small enough that f32 stays well-conditioned. τ²·softmax sums to n₀.
    value_std = rng.uniform(0.05, 0.3) if norm == "softmax" else rng.uniform(0.3, 0.8)

    def token_pair(n, n0):
        keys = nprng.normal(0.0, key_std, size=(n, d))
        vstd = value_std / math.sqrt(n0) if norm == "softmax" else value_std / math.sqrt(max(1.0, n / 16.0))
        values = nprng.normal(0.0, vstd, size=(n, d))
        return keys, values

    params = {"embed.weight": nprng.normal(0.0, embed_std, size=(v, d))}
    if rng.random() < 0.3:
        # A zero embedding row: LN₀ gives an exact zero row, every score row is zero (‖a‖ = 0).
        params["embed.weight"][0] = 0.0
        notes.append("embed row 0 zero")
    counts = {
        "query": ("qkv_tokens", "qkv_scale_tokens"),
        "key": ("qkv_tokens", "qkv_scale_tokens"),
        "value": ("qkv_tokens", "qkv_scale_tokens"),
        "proj": ("proj_tokens", "proj_scale_tokens"),
    }
    for i in range(layers):
        for name, (nk, sk) in counts.items():
            k, val = token_pair(config[nk], config[sk])
            params[f"layers.{i}.attention.{name}.key_param_tokens"] = k
            params[f"layers.{i}.attention.{name}.value_param_tokens"] = val
        k, val = token_pair(config["ffn_tokens"], config["ffn_scale_tokens"])
        params[f"layers.{i}.mlp.key_param_tokens"] = k
        params[f"layers.{i}.mlp.value_param_tokens"] = val
    layer_keys = [n for n in sorted(params) if n.endswith("key_param_tokens")]
    if rng.random() < 0.3:
        name = rng.choice(layer_keys)
        params[name][:] = 0.0
        notes.append(f"{name} all zero")
    if rng.random() < 0.3:
        name = rng.choice(layer_keys)
        rows = params[name].shape[0]
        m = rng.randint(1, max(1, rows // 3))
        params[name][rows - m :] = 0.0
        notes.append(f"{name} last {m} rows zero")
    params["final_norm.weight"] = 1.0 + nprng.normal(0.0, 0.1, size=(d,))
    params["final_norm.bias"] = nprng.normal(0.0, 0.1, size=(d,))
    return params, notes


def token_lengths(rng, t):
    picks = [t + 1, 2 * t, 2 * t + 1, 2 * t + 2, 3 * t + 1, t + 2, 2, 3, t - 1]
    lengths = [rng.choice(picks), rng.randint(t + 2, 4 * t + 7)]
    return lengths


def random_ids(rng, n, vocab, zero_heavy):
    ids = [rng.randrange(vocab) for _ in range(n)]
    if zero_heavy:
        for i in range(n):
            if rng.random() < 0.25:
                ids[i] = 0
    return ids


class Runner:
    def __init__(self, binary, timeout):
        self.binary = binary
        self.timeout = timeout

    def run(self, *args):
        cmd = [self.binary, *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
        return p.stdout

    def eval(self, checkpoint, tokens_file):
        out = self.run("eval", "--checkpoint", checkpoint, "--tokens", tokens_file, "--json").strip()
        line = out.splitlines()[-1] if out else ""
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"eval printed no JSON object ({e}): {out[-500:]!r}")
        return line, parsed


def raw_loss_field(line):
    """The loss exactly as printed (the text between "loss": and the next comma or brace)."""
    key = '"loss":'
    i = line.index(key) + len(key)
    j = i
    while j < len(line) and line[j] not in ",}":
        j += 1
    return line[i:j].strip()


def describe(config, notes):
    c = config
    parts = [
        f"norm={c['norm']}",
        f"L={c['n_layers']} d={c['d_model']} H={c['n_heads']} V={c['vocab_size']} T={c['max_seq_len']}",
        f"tokens qkv/proj/ffn={c['qkv_tokens']}/{c['proj_tokens']}/{c['ffn_tokens']}",
        f"scale={c['qkv_scale_tokens']}/{c['proj_scale_tokens']}/{c['ffn_scale_tokens']}",
        f"rotary_pct={c['rotary_pct']} base={c['rotary_base']}",
    ]
    if notes:
        parts.append("[" + "; ".join(notes) + "]")
    return " ".join(parts)


def check_case(index, rng, runner, workdir, norm, verbose, stats):
    """Returns a list of (check name, ok, message)."""
    results = []
    seed = rng.randrange(2**32)
    nprng = np.random.default_rng(seed)
    config = random_config(rng, norm)
    params, notes = random_params(rng, nprng, config)
    ckpt = os.path.join(workdir, f"case{index}")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    write_safetensors(os.path.join(ckpt, "model.safetensors"), params)
    desc = f"case {index} (seed {seed}): {describe(config, notes)}"
    if verbose:
        print(desc, flush=True)

    zero_heavy = "embed row 0 zero" in notes
    token_files = []
    for j, n in enumerate(token_lengths(rng, config["max_seq_len"])):
        path = os.path.join(workdir, f"case{index}_tokens{j}.txt")
        ids = random_ids(rng, n, config["vocab_size"], zero_heavy)
        with open(path, "w", encoding="utf-8") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        token_files.append((path, ids))

    def compare(label, checkpoint, path, ids):
        try:
            line, got = runner.eval(checkpoint, path)
        except Exception as e:  # noqa: BLE001
            return None, (label, False, f"{desc}\n    {label}: binary failed: {e}")
        ref_loss, ref_tokens = reference.evaluate_checkpoint(checkpoint, ids)
        loss = float(got.get("loss", float("nan")))
        rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
        ok = got.get("tokens") == ref_tokens and math.isfinite(loss) and rel < REL_TOL
        if math.isfinite(rel):
            stats["max_rel"] = max(stats["max_rel"], rel)
        if verbose:
            print(f"    {label}: {len(ids)} ids: loss {loss!r} vs {ref_loss!r} (ln V {math.log(config['vocab_size']):.4f}), rel {rel:.2e}")
        msg = (
            f"{desc}\n    {label}: {len(ids)} ids: binary loss {loss!r} tokens {got.get('tokens')}, "
            f"reference loss {ref_loss!r} tokens {ref_tokens}, relative difference {rel:.3e}"
        )
        return line, (label, ok, msg)

    originals = []
    for j, (path, ids) in enumerate(token_files):
        line, res = compare(f"eval[{j}]", ckpt, path, ids)
        originals.append(line)
        results.append(res)

    # Growth: exact for the l2 variants (bit-identical eval), allowed but not output-preserving
    # for softmax (checked against the reference only).
    add = {"qkv": rng.randint(0, 13), "proj": rng.randint(0, 13), "ffn": rng.randint(0, 21)}
    if sum(add.values()) == 0:
        add["ffn"] = 7
    grown = ckpt + "_grown"
    args = ["grow", "--checkpoint", ckpt, "--out", grown, "--seed", str(rng.randrange(1000))]
    for k, n in add.items():
        args += [f"--{k}", str(n)]
    label = f"grow(+{add['qkv']}/+{add['proj']}/+{add['ffn']})"
    try:
        runner.run(*args)
    except Exception as e:  # noqa: BLE001
        results.append((label, False, f"{desc}\n    {label}: {e}"))
        return results
    with open(os.path.join(grown, "config.json"), "r", encoding="utf-8") as f:
        gcfg = json.load(f)
    expect = dict(config)
    expect["qkv_tokens"] += add["qkv"]
    expect["proj_tokens"] += add["proj"]
    expect["ffn_tokens"] += add["ffn"]
    diffs = [k for k in expect if gcfg.get(k) != expect[k]]
    results.append(
        (
            f"{label} config",
            not diffs,
            f"{desc}\n    {label}: grown config differs in {diffs}: " + ", ".join(f"{k}={gcfg.get(k)!r} (expected {expect[k]!r})" for k in diffs),
        )
    )
    for j, (path, ids) in enumerate(token_files):
        line, res = compare(f"{label} eval[{j}]", grown, path, ids)
        results.append(res)
        if norm != "softmax" and line is not None and originals[j] is not None:
            a, b = raw_loss_field(originals[j]), raw_loss_field(line)
            results.append(
                (
                    f"{label} bit-identical[{j}]",
                    a == b and originals[j] == line,
                    f"{desc}\n    {label}: eval output changed by exact growth: before {originals[j]!r}, after {line!r}",
                )
            )
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=os.path.join("target", "release", "tokenformer"))
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per binary call")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    if not os.path.isfile(args.binary):
        print(f"reference check: binary {args.binary} not found", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"reference check: seed {seed}, {args.cases} cases, relative tolerance {REL_TOL:g}", flush=True)
    rng = random.Random(seed)
    runner = Runner(os.path.abspath(args.binary), args.timeout)
    workdir = tempfile.mkdtemp(prefix="tokenformer-refcheck-")
    passed = failed = 0
    cases_failed = 0
    stats = {"max_rel": 0.0}
    try:
        for i in range(args.cases):
            norm = NORMS[i % len(NORMS)]
            try:
                results = check_case(i, rng, runner, workdir, norm, args.verbose, stats)
            except Exception as e:  # noqa: BLE001
                results = [(f"case {i}", False, f"case {i} ({norm}): unexpected error: {type(e).__name__}: {e}")]
            for _name, ok, msg in results:
                if ok:
                    passed += 1
                else:
                    failed += 1
                    print(f"FAIL {msg}", flush=True)
            if not all(ok for _name, ok, _msg in results):
                cases_failed += 1
    finally:
        keep = args.keep or failed > 0
        if keep:
            print(f"reference check: work directory kept at {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"reference check: {args.cases - cases_failed} passed, {cases_failed} failed "
        f"({passed} of {passed + failed} comparisons passed; largest relative difference "
        f"{stats['max_rel']:.2e}; seed {seed})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
