"""Load a native transformers folder (an exported GLM-4-shaped model) the way its users will: offline,
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir)`` WITHOUT ``trust_remote_code``, then generate
greedily from a GLM-4 prompt (``[gMASK]<sop>`` then the text).

    python examples/generate_with_transformers.py --model runs/continue_pretraining/export-hf \\
        --prompt "The for statement" --max-new-tokens 24 --report report.json
    python examples/generate_with_transformers.py --model RELEASE --adapter ADAPTER ...   # + a peft adapter

Prints the model's class, its parameter count and the continuation; ``--report`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

#: GLM-4's input format: generation starts after the prefix (the tokenizer adds no special tokens itself).
GLM4_PREFIX = "[gMASK]<sop>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a folder holding config.json, weights and tokenizer files")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--report", default="", help="write what was loaded and generated to this JSON file")
    parser.add_argument("--adapter", default="", help="a peft adapter folder (--format peft) loaded onto the model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing is fetched
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=False).eval()
    params = sum(p.numel() for p in model.parameters())
    name = type(model).__name__
    print(f"loaded {args.model} without remote code: {name} ({model.__module__}), {params:,} parameters")
    report = {"class": name, "module": model.__module__, "parameters": params, "outputs": []}
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
        report["adapter"] = args.adapter
        print(f"loaded the peft adapter {args.adapter} onto it ({type(model).__name__})")
    for prompt in args.prompt:
        inputs = tokenizer(GLM4_PREFIX + prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(f"prompt {prompt!r} -> {len(new)} new tokens: {text!r}")
        report["outputs"].append({"prompt": prompt, "prompt_ids": inputs["input_ids"][0].tolist(), "new_ids": new})
    if args.report:
        tmp = f"{args.report}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.report)


if __name__ == "__main__":
    main()
