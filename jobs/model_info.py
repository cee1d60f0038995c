#!/usr/bin/env python
"""Parameter counts of a model layout, per component and trainable under the freeze flags.

    python jobs/model_info.py [--model tiny|unimedvl-7b | --model_path DIR] [--freeze_vae True] [--json]
    python jobs/model_info.py --model unimedvl-7b --finetuning_type lora --lora_rank 16 --num_gpus 1 \
        --expected_num_tokens 32768          # + the memory planner (docs/training.md#memory-planner)

Built on the meta device: the 7B layout prints in seconds and allocates nothing. `--json` prints
{"parameters": [{"name", "shape", "trainable"}, ...], "total": N} with the state-dict names a checkpoint
would hold. Exit status 2 for a usage or checkpoint-config error (one message, no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs import prog, true_or_false
from model.config import ConfigError, ModelConfig
from model.info import parameter_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("jobs/model_info.py"),
        description="Print parameter counts per component of the unified model and which are trainable "
                    "under the freeze flags (upstream names and True/False values). Built on the meta device.",
        epilog="Example: python jobs/model_info.py --model unimedvl-7b --freeze_vit True --json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=["tiny", "unimedvl-7b"], default=None,
                     help="a preset layout (default: tiny)")
    src.add_argument("--model_path", help="checkpoint directory with llm_config.json and vit_config.json")
    p.add_argument("--vocab_size", type=int, default=None, help="tiny only: vocabulary size (default 261)")
    for flag, default in (("freeze_llm", False), ("freeze_vit", False), ("freeze_vae", True), ("freeze_und", False),
                          ("visual_gen", True), ("visual_und", True)):
        p.add_argument(f"--{flag}", type=true_or_false, nargs="?", const=True, default=default, metavar="BOOL",
                       help=f"True/False (default {default})")
    plan = p.add_argument_group("memory planner (printed when --finetuning_type, --num_gpus or "
                                "--expected_num_tokens is given; docs/training.md#memory-planner)")
    plan.add_argument("--finetuning_type", choices=["full", "freeze", "lora"], default=None,
                      help="full | freeze (language model frozen) | lora")
    plan.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (default 8)")
    plan.add_argument("--lora_target", default="all", help="all or a comma list of module names (default all)")
    plan.add_argument("--lora_experts", choices=["und", "gen", "both"], default="both",
                      help="which MoT twins get adapters (default both)")
    plan.add_argument("--lora_vit", type=true_or_false, default=False, metavar="BOOL", help="adapters on the ViT too")
    plan.add_argument("--lora_connectors", type=true_or_false, default=False, metavar="BOOL",
                      help="adapters on connector, vae2llm, llm2vae too")
    plan.add_argument("--num_gpus", type=int, default=None, help="GPUs the run shards over (default 1)")
    plan.add_argument("--expected_num_tokens", type=int, default=None, help="tokens per packed batch "
                                                                          "(default 32768)")
    plan.add_argument("--ce_fraction", type=float, default=0.25,
                      help="share of the pack's tokens that are CE targets, for the logits (default 0.25)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def memory_plan(args: argparse.Namespace, config: ModelConfig):
    """The planner's figures for these flags, or None when no planner flag was given."""
    if args.finetuning_type is None and args.num_gpus is None and args.expected_num_tokens is None:
        return None
    from model.adapters import LoraSettings
    from model.memory import plan_memory

    lora = LoraSettings(rank=args.lora_rank, target=args.lora_target, experts=args.lora_experts,
                        vit=args.lora_vit, connectors=args.lora_connectors)
    return plan_memory(config, finetuning_type=args.finetuning_type or "full", lora=lora,
                       num_gpus=1 if args.num_gpus is None else args.num_gpus,
                       expected_num_tokens=32768 if args.expected_num_tokens is None else args.expected_num_tokens,
                       ce_fraction=args.ce_fraction, freeze_vit=args.freeze_vit, freeze_vae=args.freeze_vae)


def build_config(args: argparse.Namespace) -> ModelConfig:
    switches = {"visual_gen": args.visual_gen, "visual_und": args.visual_und}
    if args.model_path:
        return ModelConfig.from_checkpoint_dir(args.model_path, **switches)
    if args.model == "unimedvl-7b":
        return ModelConfig.unimedvl_7b(**switches)
    return ModelConfig.tiny(vocab_size=args.vocab_size or 261, **switches)


def format_table(table: dict, label: str) -> str:
    lines = [f"model {label}: {table['total']:,} parameters in {len(table['parameters'])} tensors", "",
             f"{'component':<20} {'parameters':>16} {'trainable':>16}"]
    for name, c in table["components"].items():
        lines.append(f"{name:<20} {c['parameters']:>16,} {c['trainable']:>16,}")
    trainable = sum(c["trainable"] for c in table["components"].values())
    total = sum(c["parameters"] for c in table["components"].values())
    lines += ["", f"{'total':<20} {total:>16,} {trainable:>16,}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from model.adapters import AdapterError

    try:
        config = build_config(args)
        plan = memory_plan(args, config)
    except (ConfigError, ValueError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = parameter_table(config, freeze_llm=args.freeze_llm or args.finetuning_type == "freeze",
                            freeze_vit=args.freeze_vit, freeze_vae=args.freeze_vae, freeze_und=args.freeze_und)
    if plan is not None and plan.finetuning_type == "lora":   # the base is frozen; the adapters train
        for row in table["parameters"]:
            row["trainable"] = False
        for comp in table["components"].values():
            comp["trainable"] = 0
        table["components"]["lora adapters (peft)"] = {"parameters": plan.trainable_parameters,
                                                       "trainable": plan.trainable_parameters}
    if args.json:
        out = {"parameters": table["parameters"], "total": table["total"]}
        if plan is not None:
            out["memory"] = plan.to_dict()
        print(json.dumps(out))
    else:
        label = args.model_path or args.model or "tiny"
        print(format_table(table, label))
        if plan is not None:
            from model.memory import format_plan

            print()
            print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
