"""One vLLM engine with kvcompress's connector, run by ``tests/test_vllm_connector.py`` in a subprocess (vLLM spawns
processes of its own, and its startup is best paid once per configuration).

    python tests/vllm_engine.py OUT.json --store DIR --bits 8 [--sink 0] [--prompts 8] [--rounds 2] [--damage-after 1] [--extra-prompts F]

Generates greedy answers to ``--prompts`` prompts (pydoc help topics, each a few blocks long, then a question;
then those of ``--extra-prompts``)
``--rounds`` times with vLLM's own prefix cache off, so every token found comes from the store; with
``--damage-after R``, after round R it flips a byte in the middle of every other page file of the store.
Writes ``{"rounds": [[{"tokens": [...], "cached": n, "prompt": n}, ...], ...], "block": T, "pages": n}``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` prompts of 300-700 tokens: a help topic, then a question about it."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    out = []
    for name in sorted(topics):
        ids = tokenizer(topics[name])["input_ids"]
        if len(ids) < 320:
            continue
        question = tokenizer(f"\n\nQuestion: what is the topic '{name}' about? Answer in one sentence:")["input_ids"]
        out.append(ids[:680] + question)
        if len(out) == count:
            break
    return out


def damage(store: Path) -> int:
    """Flip a byte in the middle of every other page file; return how many."""
    pages = sorted(store.rglob("*.page"))[::2]
    for path in pages:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return len(pages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--store", required=True)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--sink", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--damage-after", type=int, default=-1)
    parser.add_argument("--extra-prompts", default=None, help="a JSON file of more prompts, as lists of token ids")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress.vllm import model_folder

    config = {
        "kv_connector": "KVCompressConnector", "kv_role": "kv_both", "kv_connector_module_path": "kvcompress.vllm.connector",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"store_path": args.store, "bits": args.bits, "sink": args.sink},
    }
    llm = LLM(model=model_folder(), kv_transfer_config=config, enable_prefix_caching=False,
              max_model_len=1024, dtype="float32", seed=0)
    extra = json.loads(Path(args.extra_prompts).read_text()) if args.extra_prompts else []
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts(llm.get_tokenizer(), args.prompts) + extra]
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    rounds, damaged = [], 0
    for r in range(args.rounds):
        outputs = llm.generate(batch, greedy, use_tqdm=False)
        rounds.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0, "prompt": len(o.prompt_token_ids)}
                       for o in outputs])
        if r == args.damage_after:
            damaged = damage(Path(args.store))
    result = {"rounds": rounds, "block": llm.llm_engine.vllm_config.cache_config.block_size, "damaged": damaged,
              "pages": len(list(Path(args.store).rglob("*.page")))}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
