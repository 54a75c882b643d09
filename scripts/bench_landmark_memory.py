"""Landmark decode memory: the decode state of a landmark preset with top-k retrieval, on the device (the KV cache)
and host-offloaded (`model.attention.offload_cache`: keys and values in pinned_host memory, landmark keys on the
device), per token of context at every --lengths; and, side by side at --check_len, that both caches decode the
same logits (max abs difference) and their time per token. Prints a table and writes JSON.

    python scripts/bench_landmark_memory.py --preset=tiny --lengths=512,2048,8192,32768 --check_len=2048 \
        --out=docs/benchmarks/landmark_memory.json
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from configs import landmark  # noqa: E402
from lcjax import models  # noqa: E402
from lcjax.config import from_dict  # noqa: E402
from lcjax.eval.decode_tasks import cache_bytes  # noqa: E402
from lcjax.layers import landmark_attention  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "tiny", "configs/landmark.py preset.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "model.attention.retrieval_top_k.")
_LENGTHS = flags.DEFINE_list("lengths", ["512", "2048", "8192", "32768"], "Context lengths (tokens) to size.")
_CHECK_LEN = flags.DEFINE_integer("check_len", 2048, "Tokens decoded by both caches to compare (0: none).")
_PIECE = flags.DEFINE_integer("piece", 1, "Tokens per decode call in the check (1: generation).")
_OUT = flags.DEFINE_string("out", "", "JSON output path (default: none).")


def _model(offload: bool):
    values = landmark.get_config(_PRESET.value).to_dict()
    attention = dict(values["model"]["attention"], retrieval_top_k=_TOP_K.value, offload_cache=offload)
    values["model"]["attention"] = attention
    config = from_dict(values)
    config.validate(jax.device_count())
    return models.build(config, nnx.Rngs(0))


def main(argv):
    del argv
    built = {offload: _model(offload) for offload in (False, True)}
    rows = []
    for length in (int(x) for x in _LENGTHS.value):
        row = {"tokens": length}
        for offload, model in built.items():
            cache = model.init_cache(1, length)
            name = "offloaded" if offload else "device"
            row[f"{name}_device_bytes_per_token"] = cache_bytes(cache, device_only=True) / length
            row[f"{name}_total_bytes_per_token"] = cache_bytes(cache) / length
            del cache
        rows.append(row)
    check = {}
    if _CHECK_LEN.value:
        tokens = jax.random.randint(jax.random.key(0), (1, _CHECK_LEN.value), 0, 256)
        logits = {}
        for offload, model in built.items():
            decode = nnx.jit(lambda model, t, cache: model.decode(t, cache), donate_argnums=2)
            cache, outs, steady = model.init_cache(1, _CHECK_LEN.value), [], 0.0
            for start in range(0, _CHECK_LEN.value, _PIECE.value):
                began = time.perf_counter()
                out, cache = decode(model, tokens[:, start : start + _PIECE.value], cache)
                outs.append(np.asarray(out))
                if start:
                    steady += time.perf_counter() - began
            logits[offload] = np.concatenate(outs, axis=1)
            check[f"{'offloaded' if offload else 'device'}_ms_per_token"] = (
                1000 * steady / (_CHECK_LEN.value - _PIECE.value)
            )
        check["max_abs_logit_diff"] = float(np.abs(logits[True] - logits[False]).max())
        # blocks in the cache vs blocks one call may fetch: the check means something only when fewer are fetched
        cfg = built[True].cfg
        block = cfg.attention.mem_freq + 1
        slots = built[True].init_cache(1, _CHECK_LEN.value)["layers"]["k"].shape[2]
        chunk = _PIECE.value + -(-_PIECE.value // cfg.attention.mem_freq)
        check["cache_blocks"] = slots // block
        check["fetched_blocks_per_call"] = landmark_attention.fetch_budget(
            chunk, cfg.num_heads, _TOP_K.value, block, slots // block, cfg.attention.retrieval_mode
        )
        check |= {"tokens": _CHECK_LEN.value, "piece": _PIECE.value}
    print(f"landmark:{_PRESET.value}, top-k {_TOP_K.value}, {jax.devices()[0].platform}; bytes per token of context")
    print("| tokens | device cache: on device | offloaded: on device | offloaded: in host memory |")
    print("|---|---|---|---|")
    for r in rows:
        host = r["offloaded_total_bytes_per_token"] - r["offloaded_device_bytes_per_token"]
        print(
            f"| {r['tokens']} | {r['device_device_bytes_per_token']:,.0f} | "
            f"{r['offloaded_device_bytes_per_token']:,.0f} | {host:,.0f} |"
        )
    if check:
        print(json.dumps(check))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump({"rows": rows, "check": check, "devices": str(jax.devices()[0])}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
