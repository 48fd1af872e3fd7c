"""One vLLM engine process for the end-to-end tests, driven over stdin/stdout.

Usage: ``python engine.py MODEL_DIR [--kvloft SOCKET]``. Reads one JSON command per line on
stdin and answers each with one line ``KVLOFT-E2E {json}`` on stdout (vLLM logs go elsewhere):

- ``{"op": "generate", "prompts": [...], "max_tokens": n}`` -> ``{"outputs": [[token ids]...],
  "metrics": {name: value}}`` (greedy decoding);
- ``{"op": "reset_prefix_cache"}`` -> ``{"ok": true}`` (empties vLLM's own prefix cache, so the
  next prompts can only hit in kvloft);
- ``{"op": "metrics"}`` -> ``{"metrics": {...}}``;
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import json
import sys

MARK = "KVLOFT-E2E "
METRICS = (
    "vllm:external_prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prefix_cache_queries",
    "vllm:kvloft_hit_tokens",
    "vllm:kvloft_loaded_blocks",
    "vllm:kvloft_saved_blocks",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kvloft", metavar="SOCKET", help="use KvloftConnector with this kvloft socket")
    ap.add_argument("--extra", default="{}", help="more kv_connector_extra_config (JSON)")
    args = ap.parse_args()

    out = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the answer channel

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.kvloft:
        extra = {"socket_path": args.kvloft, **json.loads(args.extra)}
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvloftConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "kvloft.vllm",
            "kv_connector_extra_config": extra,
        }
    llm = LLM(
        model=args.model,
        dtype="float32",
        block_size=32,
        max_model_len=1024,
        max_num_seqs=8,
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )

    def metrics() -> dict[str, float]:
        found: dict[str, float] = {}
        for m in llm.get_metrics():
            if m.name in METRICS:
                found[m.name] = found.get(m.name, 0) + float(getattr(m, "value", 0) or 0)
        return found

    def answer(body: dict) -> None:
        out.write(MARK + json.dumps(body) + "\n")
        out.flush()

    answer({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "generate":
            params = SamplingParams(temperature=0.0, max_tokens=int(cmd.get("max_tokens", 8)), ignore_eos=True)
            results = llm.generate(cmd["prompts"], params, use_tqdm=False)
            answer({"outputs": [list(r.outputs[0].token_ids) for r in results], "metrics": metrics()})
        elif op == "reset_prefix_cache":
            answer({"ok": bool(llm.reset_prefix_cache())})
        elif op == "metrics":
            answer({"metrics": metrics()})
        elif op == "quit":
            answer({"bye": True})
            break
        else:
            answer({"error": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
