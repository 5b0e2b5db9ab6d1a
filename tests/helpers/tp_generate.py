"""Run under ``torchrun --nproc-per-node 2``: greedy generation with SelfExtend, heads split per rank.

Usage: ``torchrun --nproc-per-node 2 tests/helpers/tp_generate.py MODEL_DIR IDS.pt OUT.pt``.
Rank 0 saves the generated tokens; the test compares them with a one-GPU run.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import selfextend_llm as se


def main() -> None:
    model_dir, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto").eval()
    se.apply(model, se.SelfExtendConfig(4, 16))
    device = next(model.parameters()).device
    ids = torch.load(ids_path).to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    calls = model._selfextend_settings.calls
    if dist.get_rank() == 0:
        torch.save({"tokens": out.cpu(), "calls": calls}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
