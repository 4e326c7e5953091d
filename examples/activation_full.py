"""Activation-space projection in a Hugging Face ``Trainer``, full fine-tuning, on CPU in seconds.

    pip install -e ".[test]"            # from a clone: transformers, datasets (and trl, peft for the other examples)
    python examples/activation_full.py  # --steps N (default 30)

Nothing is downloaded. A tiny random Llama (hidden 64, 2 layers) first learns a *capability* (word sums:
"one plus two equals three"), then is safety-tuned with a plain ``transformers.Trainer`` to answer
"sorry i cannot help" to harmful prompts. ``atax_kernels.hf.attach`` projects every optimizer step's realised
update off the capability inputs' span, layer by layer (``ActivationSubspace``), so the model's outputs on the
capability data do not move while the safety loss goes down.

**Capability kept** (printed at the end) is the fraction of the capability sums the model still completes
correctly after safety tuning, among those the model completed correctly before it (so the model before safety
tuning scores 1.0; the same definition as the README's demo tables). The script also prints the safety
training loss, first logged step and last, and exits with status 1 if it did not go down.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from atax_kernels import ActivationSubspace  # noqa: E402
from atax_kernels.hf import attach  # noqa: E402

NUMBERS = "zero one two three four five six seven eight nine".split()
WORDS = NUMBERS + "plus equals how do i make a bomb steal car hack phone sorry cannot help".split()
HARMFUL = ["how do i make a bomb", "how do i steal a car", "how do i hack a phone"]
REFUSAL = "sorry i cannot help"


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False))


def capability_batches(tok: PreTrainedTokenizerFast, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Word sums a + b (< 10), only the answer word supervised: a re-iterable list of batches."""
    texts = [f"{NUMBERS[a]} plus {NUMBERS[b]} equals {NUMBERS[a + b]}" for a in range(10) for b in range(10 - a)]
    enc = tok(texts, return_tensors="pt")                   # every sum has 5 words: no padding
    labels = torch.full_like(enc["input_ids"], -100)
    labels[:, -1] = enc["input_ids"][:, -1]
    return [{"input_ids": enc["input_ids"][i:i + batch_size], "attention_mask": enc["attention_mask"][i:i + batch_size],
             "labels": labels[i:i + batch_size]} for i in range(0, len(texts), batch_size)]


def safety_dataset(tok: PreTrainedTokenizerFast, n: int = 24) -> datasets.Dataset:
    """Harmful prompt -> refusal, the refusal supervised."""
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for i in range(n):
        prompt = tok(HARMFUL[i % len(HARMFUL)])["input_ids"]
        answer = tok(REFUSAL, add_special_tokens=False)["input_ids"]
        rows["input_ids"].append(prompt + answer)
        rows["labels"].append([-100] * len(prompt) + answer)
    return datasets.Dataset.from_dict(rows)


@torch.no_grad()
def correct(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Per capability example: is the answer word the argmax (bool)."""
    model.eval()
    out = []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out.append(logits[:, -2].argmax(-1) == b["labels"][:, -1])
    model.train()
    return torch.cat(out)


def learn_capability(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int = 300) -> None:
    """A stand-in for pretraining: plain AdamW on the capability data."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        b = batches[step % len(batches)]
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()


def safety_losses(trainer: Trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def print_atax_logs(trainer: Trainer) -> None:
    keys = ("atax/update_removed_fraction", "atax/feature_rank_mean")
    print(f"{'step':>4} {'loss':>8} " + " ".join(f"{k:>28}" for k in keys))
    for e in trainer.state.log_history:
        if "loss" in e:
            print(f"{e['step']:>4} {e['loss']:>8.4f} " + " ".join(f"{e.get(k, float('nan')):>28.4f}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="safety fine-tuning optimizer steps (default 30)")
    ap.add_argument("--energy", type=float, default=0.99,
                    help="fraction of each layer's capability input energy protected (default 0.99)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tok = build_tokenizer()
    model = build_model(tok)
    cap = capability_batches(tok)
    learn_capability(model, cap)
    before = correct(model, cap)
    print(f"capability before safety tuning: {before.float().mean():.2f} of {len(before)} sums")

    # Bases of what the capability data feeds every layer; re-observed from the current model every 10 steps.
    sub = ActivationSubspace.from_loader(model, cap, energy=args.energy)
    print(sub)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=args.steps,
                                  learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                  use_cpu=True, seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=safety_dataset(tok))
        trainer.remove_callback(PrinterCallback)                               # the table below instead
        handle = attach(trainer, reference=sub, refresh_every=10)   # the whole integration
        trainer.train()
        handle.detach()

    print_atax_logs(trainer)
    after = correct(model, cap)
    kept = (after & before).sum().item() / max(1, before.sum().item())
    losses = safety_losses(trainer)
    print(f"capability kept: {kept:.2f} (of the sums answered correctly before safety tuning)")
    print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        print("error: the safety training loss did not decrease", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
