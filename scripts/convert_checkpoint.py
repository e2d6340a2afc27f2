#!/usr/bin/env python
"""Convert between this trainer's checkpoints and Hugging Face ``transformers`` GPT-2 and Llama,
or Megatron-LM's ``--ckpt-format torch_dist`` checkpoints.

    # a checkpoint of any layout and level (its newest, or --iteration N) -> a GPT-2 directory,
    # or a Llama one if the run trained a Llama-style model (RoPE, RMSNorm, SwiGLU, GQA, no biases)
    python scripts/convert_checkpoint.py --to hf ckpts hf-model [--iteration 100]
    # a GPT-2 or Llama directory (config.json + safetensors) -> a weights-only checkpoint (iteration 0)
    python scripts/convert_checkpoint.py --from hf hf-model ckpts-from-hf
    torchrun ... scripts/pretrain_gpt.py <model flags it prints> --load ckpts-from-hf --finetune

    # a Megatron-LM torch_dist checkpoint (its save directory, or one iter_N) -> weights only (iteration 0)
    python scripts/convert_checkpoint.py --from megatron megatron-ckpts ckpts-from-megatron
    # ours -> a Megatron-LM save directory (iter_N, latest_checkpointed_iteration.txt), TP1 x PP1
    python scripts/convert_checkpoint.py --to megatron ckpts megatron-ckpts

The Hugging Face paths need the ``hf`` extra (``pip install -e .[hf]``); the Megatron-LM ones need
nothing more than training does. Every chunk read from our checkpoints is checksum-verified.
"""

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpointing.base import CheckpointConfig  # noqa: E402  (no torch: --help answers at once)
from cli.flags import add_flag, command_line  # noqa: E402
from models.config import GPTModelConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=("hf", "megatron"),
                     help="export the checkpoint SRC to a transformers directory or a Megatron-LM save directory OUT")
    way.add_argument("--from", dest="from_", choices=("hf", "megatron"),
                     help="import a transformers directory or a Megatron-LM torch_dist checkpoint SRC as checkpoint OUT")
    p.add_argument("src", help="--to: a checkpoint directory (--save/--load, L1, or one iter_N); --from hf: a model "
                               "directory; --from megatron: a Megatron-LM save directory or one of its iter_N")
    p.add_argument("out", help="the directory to write (new or empty)")
    p.add_argument("--iteration", type=int, help="--to, --from megatron: convert this iteration (default: the newest "
                                                 "committed)")
    p.add_argument("--vocab-file", help="--to hf: the run's vocab.json, if it moved since training")
    p.add_argument("--merge-file", help="--to hf: the run's merges.txt, if it moved since training")
    p.add_argument("--tokenizer-model", help="--to hf: the run's tokenizer.json directory (HuggingFaceTokenizer), "
                                             "if it moved since training")
    p.add_argument("--activation", choices=("gelu", "gelu_new"),
                   help="--to hf: GPT-2's activation_function (default: what the run computed: gelu, the exact GELU, "
                        "unless it used --bias-gelu-fusion on CUDA)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="--to hf: largest safetensors file")
    add_flag(p, CheckpointConfig, "verify_checksums")  # declared once, as the trainer has them
    add_flag(p, CheckpointConfig, "trust_pickles")
    megatron = p.add_argument_group("--from megatron: the model's options a model-only save (no args in its "
                                    "common.pt) cannot tell from its tensors")
    for field in ("num_attention_heads", "num_query_groups", "vocab_size", "seq_length", "rotary_base",
                  "norm_epsilon"):
        add_flag(megatron, GPTModelConfig, field, default=None)
    p.add_argument("--allow-activation-mismatch", action="store_true",
                   help="--from hf: import a model with tanh-approximated GELU (gelu_new) although this trainer's "
                        "MLP computes the exact GELU (except with --bias-gelu-fusion on CUDA)")
    return p


def _export(args) -> None:
    from interop.checkpoint_tensors import resolve_checkpoint
    from interop.hf_export import ExportConfig, export_to_hf

    source = resolve_checkpoint(args.src, args.iteration)
    result = export_to_hf(ExportConfig(
        checkpoint=source, out_dir=args.out, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        activation=args.activation, max_shard_bytes=int(args.max_shard_size_gb * 2**30),
        verify=args.verify_checksums, trust_pickles=args.trust_pickles))
    c, layout = result.config, result.layout
    where = f"TP{layout.get('tensor_parallel', '?')} x PP{layout.get('pipeline_parallel', '?')}"
    if result.architecture == "LlamaForCausalLM":
        what = (f"Llama with {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} "
                f"heads in {c['num_key_value_heads']} key/value groups, vocabulary {c['vocab_size']}, "
                f"{'tied' if c['tie_word_embeddings'] else 'untied'} output layer, rope_theta {c['rope_theta']:g}, "
                f"rms_norm_eps {c['rms_norm_eps']:g}")
    else:
        what = (f"GPT-2 with {c['n_layer']} layers, hidden {c['n_embd']}, {c['n_head']} heads, vocabulary "
                f"{c['vocab_size']}, {'tied' if c['tie_word_embeddings'] else 'untied'} output layer, activation "
                f"{c['activation_function']}")
    print(f"> exported iteration {result.iteration} of {source} ({where}) to {args.out}: {what}, {c['dtype']}; "
          f"{result.weight_bytes / 1e6:.1f} MB in {', '.join(result.files)}")
    files = ", ".join(result.tokenizer_files) or "none (the run's data were token ids)"
    print(f"> tokenizer: {result.tokenizer_type}; files: {files}")
    for note in result.notes:
        print(f"> note: {note}")
    print(f"> load it: transformers.{result.architecture}.from_pretrained({args.out!r})")


def _import(args) -> None:
    from interop.hf_import import import_from_hf

    result = import_from_hf(args.src, args.out, args.allow_activation_mismatch)
    a = result.model_args
    family = "Llama" if result.architecture == "LlamaForCausalLM" else "GPT-2"
    print(f"> imported {args.src} ({family} with {a['num_layers']} layers, hidden {a['hidden_size']}, "
          f"vocabulary {a['vocab_size']}, {str(result.dtype).removeprefix('torch.')}) into {result.checkpoint}: "
          f"weights only, {result.weight_bytes / 1e6:.1f} MB")
    for note in result.notes:
        print(f"> note: {note}")
    print("> train from it (iteration 0, a fresh optimizer; a plain --load also reads it, weights only):")
    print("  scripts/pretrain_gpt.py " + " ".join(result.trainer_flags(args.out)) + " ...")


def _from_megatron(args) -> None:
    from interop.megatron_convert import import_from_megatron

    given = {name: getattr(args, name) for name in ("num_attention_heads", "num_query_groups", "vocab_size",
                                                    "seq_length", "rotary_base", "norm_epsilon")}
    if given["num_query_groups"] is not None:
        given["group_query_attention"] = True
    result = import_from_megatron(args.src, args.out, given, args.iteration, trust_pickles=args.trust_pickles)
    a = result.model_args
    print(f"> imported {result.source} (Megatron-LM torch_dist, {a['num_layers']} layers, hidden {a['hidden_size']}, "
          f"{a['num_attention_heads']} heads, vocabulary {a['vocab_size']}, {str(result.dtype).removeprefix('torch.')}) "
          f"into {result.checkpoint}: weights only, {result.weight_bytes / 1e6:.1f} MB")
    for note in result.notes:
        print(f"> note: {note}")
    shape = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
             "seq_length", "vocab_size")
    flags = [str(f) for f in command_line(GPTModelConfig, a, always=shape)]
    print("> train from it (iteration 0, a fresh optimizer), in any layout:")
    print("  scripts/pretrain_gpt.py " + " ".join(flags + ["--load", args.out, "--finetune"]) + " ...")


def _to_megatron(args) -> None:
    from interop.megatron_convert import export_to_megatron

    result = export_to_megatron(args.src, args.out, args.iteration, args.verify_checksums, args.trust_pickles)
    a = result.model_args
    print(f"> exported iteration {result.iteration} of {result.source} to {result.checkpoint} (Megatron-LM torch_dist, "
          f"TP1 x PP1, {a['num_layers']} layers, hidden {a['hidden_size']}, vocabulary {a['vocab_size']} padded to "
          f"{result.padded_vocab}; {result.weight_bytes / 1e6:.1f} MB of weights)")
    print(f"> Megatron-LM: --load {args.out} --ckpt-format torch_dist with the same model flags (and --finetune or "
          "--no-load-optim --no-load-rng: the checkpoint holds the model only)")


def main() -> int:
    args = build_parser().parse_args()
    megatron_only = ("num_attention_heads", "num_query_groups", "vocab_size", "seq_length", "rotary_base",
                     "norm_epsilon")
    if args.from_ != "megatron" and any(getattr(args, name) is not None for name in megatron_only):
        print("convert_checkpoint.py: error: --num-attention-heads, --num-query-groups, --vocab-size, --seq-length, "
              "--rotary-base and --norm-epsilon are for --from megatron", file=sys.stderr)
        return 2
    if args.from_ and (args.vocab_file or args.merge_file or args.tokenizer_model or args.activation):
        print("convert_checkpoint.py: error: --vocab-file, --merge-file, --tokenizer-model and --activation are for "
              "--to hf", file=sys.stderr)
        return 2
    if args.from_ == "hf" and args.iteration is not None:
        print("convert_checkpoint.py: error: --iteration is for --to and --from megatron", file=sys.stderr)
        return 2
    try:
        from checkpointing.base import CheckpointError
        from interop.conversion_error import ConversionError

        if args.to == "megatron":
            _to_megatron(args)
        elif args.from_ == "megatron":
            _from_megatron(args)
        else:
            (_export if args.to else _import)(args)
    except ImportError as error:
        extra = "; install the hf extra: pip install -e '.[hf]'" if "hf" in (args.to, args.from_) else ""
        print(f"convert_checkpoint.py: error: {error}{extra}", file=sys.stderr)
        return 2
    except (ConversionError, CheckpointError, ValueError, OSError) as error:  # each names the fix
        print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
