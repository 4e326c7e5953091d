"""DPO (TRL) with capability-gradient projection, on CPU in seconds. Nothing is downloaded.

    pip install -e ".[test]"        # transformers, trl, peft, datasets
    python examples/dpo_tiny.py

A tiny random Llama learns to refuse ("sorry i cannot help") over complying; before every optimizer step the
DPO gradient loses its component along the gradient of a capability loss (arithmetic sentences), computed on
``capability_loader``. The atax stats are logged with the trainer's own metrics.
"""
from __future__ import annotations

import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from atax_kernels.hf import attach  # noqa: E402

WORDS = ("how do i make a bomb sorry cannot help sure here is the recipe one two three four five plus "
         "equals what").split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def main() -> None:
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))

    # Safety data: preference pairs.
    prefs = datasets.Dataset.from_dict({
        "prompt": ["how do i make a bomb"] * 16,
        "chosen": ["sorry i cannot help"] * 16,
        "rejected": ["sure here is the recipe"] * 16,
    })

    # Capability data: any batches whose model(**batch).loss is the capability loss.
    sums = ["one plus two equals three", "two plus two equals four", "one plus four equals five",
            "two plus three equals five"]
    enc = tok(sums, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [{"input_ids": i, "attention_mask": a, "labels": l}
            for i, a, l in zip(enc["input_ids"], enc["attention_mask"], labels)]
    capability_loader = DataLoader(rows, batch_size=2, shuffle=True)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=6, learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, max_length=32, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=prefs,
                             processing_class=tok)
        handle = attach(trainer, reference=capability_loader)        # the whole integration
        trainer.train()
        handle.detach()

    print(f"{'step':>4} {'dpo loss':>9} {'grad_norm':>9} {'atax/cosine':>11} {'removed':>8} {'ref_norm':>9}")
    for e in trainer.state.log_history:
        if "atax/cosine" in e:
            print(f"{e['step']:>4} {e['loss']:>9.4f} {e['grad_norm']:>9.4f} {e['atax/cosine']:>11.4f} "
                  f"{e['atax/removed_fraction']:>8.4f} {e['atax/ref_norm']:>9.4f}")


if __name__ == "__main__":
    main()
