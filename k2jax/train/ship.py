"""Copies a trained run's export into the package (``k2jax/default_weights``) with its card.

The directory then holds what ``k2jax.load_default`` reads: the HF K2 checkpoint
(``config.json``, safetensors shards and index), ``tokenizer.model``, ``loss.png`` and
``MODEL_CARD.md`` (data, steps, loss, and the evaluation of ``benchmarks/default_model_eval.py``
when its ``evaluation.json`` is in the run directory; copied too, for the tests that replay it).
"""

from __future__ import annotations

import json
import os
import shutil

from k2jax.train import loop

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(PACKAGE_DIR, "default_weights")
MAX_BYTES = 30 * 1024 * 1024


def ship(run_dir: str, target: str = TARGET) -> str:
    """Replaces ``target`` with the run's export and card; returns ``target``."""
    export = os.path.join(run_dir, "export")
    if not os.path.isfile(os.path.join(export, "model.safetensors.index.json")):
        raise FileNotFoundError(f"{export}: no exported checkpoint (train the recipe first)")
    if os.path.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(export, target)
    for name in ("loss.png", "evaluation.json"):
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(target, name))
    with open(os.path.join(target, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(model_card(run_dir))
    for name in os.listdir(target):  # safetensors writes 0600; package data is world-readable
        os.chmod(os.path.join(target, name), 0o644)
    size = sum(os.path.getsize(os.path.join(target, n)) for n in os.listdir(target))
    if size > MAX_BYTES:
        raise ValueError(f"{target} holds {size} bytes, over the {MAX_BYTES}-byte budget")
    return target


def model_card(run_dir: str) -> str:
    with open(os.path.join(run_dir, "export", "config.json")) as f:
        config = json.load(f)
    records = loop.read_metrics(run_dir)
    info = config.get("k2jax_training", {})
    tail = records[-20:]
    final_loss = sum(r["loss"] for r in tail) / max(len(tail), 1)
    seconds = sum(r["seconds"] for r in records)
    lines = [
        "# k2jax trained default model",
        "",
        "Kimi K2 Thinking's architecture at toy size, trained on this project's CPU by",
        "`python -m k2jax.train --recipe default` (k2jax/train/recipe.py). It was trained only",
        "on generated tool-use conversations (k2jax/train/conversations.py): it thinks in one",
        "short sentence, calls `calculator`, `convert_units` or `get_capital`",
        "(k2jax/chat/tools.py) with K2's tool-call tokens, and answers from the results. It",
        "knows nothing else; do not expect general text.",
        "",
        "## Architecture",
        "",
        f"- hidden {config['hidden_size']}, {config['num_hidden_layers']} layers "
        f"({config['first_k_dense_replace']} dense, then MoE), MLA ({config['num_attention_heads']}"
        f" heads, q_lora {config['q_lora_rank']}, kv_lora {config['kv_lora_rank']}), YaRN "
        f"factor {config['rope_scaling']['factor']}",
        f"- {config['n_routed_experts']} routed experts (top-{config['num_experts_per_tok']}, "
        f"{config['n_group']} groups, best {config['topk_group']} kept, sigmoid scores with a "
        f"correction bias), {config['n_shared_experts']} shared expert, INT4 routed experts "
        "(group 32, bf16 scales, compressed-tensors pack-quantized), bf16 elsewhere",
        f"- vocabulary {config['vocab_size']}: a sentencepiece BPE tokenizer trained on the "
        "training text (byte fallback, K2's chat tokens as control symbols)",
        "",
        "## Training",
        "",
        f"- recipe `{info.get('recipe')}`, {info.get('steps')} steps, " + _qat_line(info),
        f"- AdamW with warm-up and cosine decay; loss on assistant turns only; "
        f"{sum(r['tokens'] for r in records):.0f} trained (assistant) tokens",
        f"- final training loss (mean of the last {len(tail)} steps): {final_loss:.4f} nats",
        f"- wall time of the steps: {seconds / 60:.1f} minutes on a shared 2-core CPU",
        "",
        "![loss](loss.png)",
        "",
    ]
    notes = os.path.join(run_dir, "notes.md")  # how this run was made, if not in one go
    if os.path.exists(notes):
        with open(notes, encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    evaluation = os.path.join(run_dir, "evaluation.json")
    if os.path.exists(evaluation):
        with open(evaluation) as f:
            lines += evaluation_table(json.load(f))
    return "\n".join(lines) + "\n"


def _qat_line(info: dict) -> str:
    """How the experts were trained: QAT from the start, as a final phase, or not at all."""
    if not info.get("qat"):
        return "no QAT (float experts, rounded to INT4 at export)"
    start = info.get("qat_from_step")
    if not start:
        return "QAT (experts fake-quantized to INT4) throughout"
    return (
        f"float experts for steps 1-{start}, then QAT (experts fake-quantized to INT4) for "
        f"steps {start + 1}-{info.get('steps')}"
    )


def evaluation_table(result: dict) -> list[str]:
    """Markdown lines of ``benchmarks/default_model_eval.py``'s JSON."""
    lines = [
        "## Evaluation",
        "",
        f"Held-out conversations: generator seed {result['seed']} (never used in training), "
        f"{result['conversations']} conversations, half of their requests in phrasings kept out "
        "of training; greedy decoding through the agent loop with the built-in tools.",
        "",
        "| model | tool choice + arguments | final answers | held-out loss |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        tool = "" if row.get("tool_accuracy") is None else f"{row['tool_accuracy']:.1%}"
        answer = "" if row.get("answer_accuracy") is None else f"{row['answer_accuracy']:.1%}"
        lines.append(f"| {row['model']} | {tool} | {answer} | {row['loss']:.4f} |")
    lines.append("")
    if "qat_loss_vs_float" in result:
        lines += [
            "QAT model's held-out loss against the same model trained without quantization "
            f"(float experts): {result['qat_loss_vs_float']:+.2%} (target: within 2%).",
            "",
        ]
    per_kind = result["rows"][0].get("per_kind", {})
    if per_kind:
        lines += [
            "By kind (first row): "
            + ", ".join(
                f"{kind} {v['tool']:.0%} / {v['answer']:.0%} (n={v['n']})"
                for kind, v in sorted(per_kind.items())
            ),
            "",
        ]
    if "calculator_set" in result:
        c = result["calculator_set"]
        lines += [
            f"Fixed calculator set (seed {c['seed']}, {c['count']} questions, replayed by "
            f"tests/test_default_model.py): tool calls {c['tool_accuracy']:.1%}, answers "
            f"{c['answer_accuracy']:.1%}.",
            "",
        ]
    return lines
