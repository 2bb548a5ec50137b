"""`diffgem convert`: a Hugging Face checkpoint to a (quantized) MLX one."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a HF checkpoint to a (quantized) MLX one"
    )
    p.add_argument("--hf-path", required=True, help="local folder or HF repo id")
    p.add_argument("--mlx-path", required=True, help="output folder")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument(
        "--recipe",
        default=None,
        choices=["mixed"],
        help="mixed: embeddings, attention and router at 8 bits, experts at q-bits",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from ..mlx_backend.convert import convert

    out = convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        bits=args.q_bits,
        group_size=args.q_group_size,
        recipe=args.recipe,
        dtype=args.dtype,
    )
    print(f"wrote {out}")
    return 0
