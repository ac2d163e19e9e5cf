"""``python -m kvcompress.vllm import FILE --store DIR ...``: a ``kvcompress compress`` file into the connector's store;
``python -m kvcompress.vllm folder [--model M]``: the local folder of a kvcompress model, for ``vllm serve``."""

from __future__ import annotations

import argparse
import sys

from kvcompress.vllm.codec import PageCodec
from kvcompress.vllm.importer import ImportRefused, import_context
from kvcompress.vllm.store import FolderStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcompress.vllm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="write a saved context's pages into a store (same options as the connector's)")
    imp.add_argument("file", help="a file `kvcompress compress` wrote (method none or kivi:...)")
    imp.add_argument("--store", required=True, help="the connector's store_path")
    imp.add_argument("--model", default=None, help="the model the file was made with (default: the default model)")
    imp.add_argument("--model-folder", default=None, help="the folder vLLM serves (default: the one --model loads from)")
    imp.add_argument("--block-size", type=int, default=128, help="vLLM's block size (its CPU default: 128)")
    imp.add_argument("--bits", type=int, default=4)
    imp.add_argument("--group", type=int, default=64)
    imp.add_argument("--sink", type=int, default=0)
    where = commands.add_parser("folder", help="print the local folder vLLM should serve for a kvcompress model name")
    where.add_argument("--model", default=None, help="a built-in name (default: the default model) or a folder")
    args = parser.parse_args(argv)
    from kvcompress import load_model
    from kvcompress.vllm import model_folder

    if args.command == "folder":
        print(model_folder(args.model))
        return 0
    from kvcompress.persist import CacheFileError

    try:
        codec = PageCodec(bits=args.bits, group=args.group, sink=args.sink)
        model, tokenizer = load_model(args.model, device="cpu")
        done = import_context(args.file, FolderStore(args.store), codec, args.block_size, model, tokenizer, args.model_folder)
    except (ImportRefused, CacheFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{done.written} pages written, {done.present} already in the store; the last {done.tail} tokens are vLLM's to compute")
    return 0


if __name__ == "__main__":
    sys.exit(main())
