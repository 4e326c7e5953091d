"""The real-model study's training / scoring / report / CLI layer (``python -m atax_kernels.study``), on a tiny
random Llama with a byte-level tokenizer and a chat template, and the tiny JSONL files in tests/data/study.

A random model answers no capital, so the pipeline tests pass ``--capability-filter none``; the filter itself is
tested as a bad input (a base that answers none of the questions is refused)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from atax_kernels.study.methods import parse_method, parse_methods  # noqa: E402
from atax_kernels.study.scores import rate, wilson  # noqa: E402

DATA = Path(__file__).parent / "data" / "study"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALL_METHODS = "plain,interp:a=0.5,ptx:w=1,kl:w=0.5,grad,act:e=0.9,act:e=0.9:c=0.5,act+ptx:e=0.9:w=1"


def make_tiny(path: Path, *, template: bool = True) -> str:
    """A random 2-layer Llama (hidden 32) and a byte-level BPE tokenizer (no merges), saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    if template:
        tok.chat_template = TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


def args(model: str, out: Path, cache: Path, *extra: str, data: Path = DATA) -> list[str]:
    return ["--model", model, "--capability-data", str(data / "capability.jsonl"),
            "--safety-data", str(data / "harmful.jsonl"), "--benign-data", str(data / "benign.jsonl"),
            "--lookalike-data", str(data / "lookalike.jsonl"), "--response-col", "response", "--group-col", "group",
            "--answer-col", "answer", "--capability-filter", "none", "--steps", "2", "--batch-size", "4",
            "--basis-batches", "2", "--refresh-every", "1", "--max-new-tokens", "4", "--max-eval", "10",
            "--train-eval", "4", "--lr", "3e-3", "--samples", "1", "--no-progress", "--cache-dir", str(cache),
            "--json", str(out / "s.json"), "--markdown", str(out / "s.md"), "--plot", str(out / "s.png"), *extra]


def run_main(argv: list[str]) -> int:
    from atax_kernels.study.__main__ import main

    return main(argv)


# -- units ----------------------------------------------------------------------------------------------
def test_method_specs():
    m = parse_method("act+ptx:e=0.95:w=2:c=0.5")
    assert (m.kind, m.get("e"), m.get("w"), m.get("c")) == ("act+ptx", 0.95, 2.0, 0.5)
    assert m.name == "act e0.95 c0.5 + ptx 2" and m.family == "act+ptx"
    assert parse_method(m.spec) == m
    assert [x.name for x in parse_methods("act:e=0.9,interp:a=0.5")] == ["plain", "interp 0.5", "act e0.9"]
    for bad, msg in (("nope", "unknown method"), ("ptx:w=0", "> 0"), ("act:e=2", "energy"), ("act:q=1", "unknown key"),
                     ("kl:w", "key=value"), ("plain,plain", "twice"), ("grad:mode=x", "one of")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.29
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.71 < lo < 0.73
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(1 - hi) and 0.23 < lo < 0.24
    r = rate([True, False, True, True])
    assert r["value"] == 0.75 and r["n"] == 4 and r["lo"] < 0.75 < r["hi"]
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_encode_masks_the_prompt(tiny):
    from transformers import AutoTokenizer

    from atax_kernels.study import models as M
    from atax_kernels.study.train import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(tiny)
    row = encode(tok, "What is the capital of France?", "Paris.", max_length=256, chat_pair=M.chat_pair)
    labelled = [t for t in row["labels"] if t != IGNORE]
    assert tok.decode(labelled).startswith("Paris.")
    assert len(row["labels"]) == len(row["input_ids"]) and row["labels"][0] == IGNORE


# -- the pipeline ---------------------------------------------------------------------------------------
def test_every_method_both_objectives(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", ALL_METHODS, "--objective", "sft,dpo")) == 0
    res = json.loads((out / "s.json").read_text())
    h = res["header"]
    for key in ("machine", "date", "commit", "command", "wall_seconds", "versions"):
        assert h[key] not in (None, ""), key
    assert "torch" in h["versions"] and "atax_kernels.study" in h["command"]
    rows = res["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"base", "plain", "interp 0.5", "ptx 1", "kl 0.5", "grad", "act e0.9", "act e0.9 c0.5",
                       "act e0.9 + ptx 1"}
    for obj in ("sft", "dpo"):
        assert len([r for r in rows if r["objective"] == obj]) == 8
    for r in rows:
        for k in ("capability", "safety", "over_refusal", "drift_nll", "ece", "entropy"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["method"], k)
        assert 0 <= r["capability_lo"] <= r["capability"] <= r["capability_hi"] <= 1
        assert r["samples"], r["method"]
    by = {(r["objective"], r["method"]): r for r in rows}
    assert (by["sft", "ptx 1"]["extra_forward"], by["sft", "ptx 1"]["extra_backward"]) == (1.0, 1.0)
    assert (by["sft", "kl 0.5"]["extra_forward"], by["sft", "kl 0.5"]["extra_backward"]) == (2.0, 1.0)
    assert by["sft", "act e0.9"]["extra_backward"] == 0.0 and by["sft", "act e0.9"]["refresh_checks"] == 1
    assert by["sft", "act e0.9"]["refreshes"] in (0, 1)  # the quick tier's --refresh-tol keeps unmoved bases
    assert 0 < by["sft", "act e0.9"]["removed_fraction"] <= 1 and by["sft", "act e0.9"]["basis_mib"] > 0
    assert by["dpo", "grad"]["removed_fraction"] is not None
    # training moved the weights: the plain run's drift differs from the base's
    assert by["sft", "plain"]["drift_nll"] != by["-", "base"]["drift_nll"]
    md = (out / "s.md").read_text()
    for text in ("machine:", "commit:", "command:", "wall time:", "versions:", "### objective dpo",
                 "Sampled generations", "act e0.9 + ptx 1"):
        assert text in md
    assert (out / "s.png").stat().st_size > 10_000
    # base generations cached; a second run reads them
    assert len(list((tmp_path / "cache" / "generations").glob("*.json"))) == 1


def _numbers(rows):
    skip = ("seconds", "time")
    return [{k: v for k, v in r.items() if not any(s in k for s in skip) and k != "notes"} for r in rows]


def test_same_seed_same_row(tiny, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "act+ptx:e=0.9:w=1",
                             "--objective", "dpo", "--steps", "3")) == 0
        runs.append(json.loads((out / "s.json").read_text()))
    assert runs[1]["setup"]["base_generations_cached"] is True
    assert _numbers(runs[0]["rows"]) == _numbers(runs[1]["rows"])


class _Cut(RuntimeError):
    pass


def test_interrupted_study_resumes_from_its_rows(tiny, tmp_path, monkeypatch):
    """Each finished run is logged; a partial report exists after the interruption; --resume retrains only
    what is missing and the rows equal an uninterrupted run's."""
    grid = ("--methods", "plain,interp:a=0.5,ptx:w=1", "--seeds", "0,1", "--steps", "2")
    full_out = tmp_path / "full"
    assert run_main(args(tiny, full_out, tmp_path / "cache", *grid)) == 0
    full = json.loads((full_out / "s.json").read_text())
    assert full["runs_done"] == full["runs_total"] == 4

    out = tmp_path / "cut"
    calls, cut_at = [], [3]
    from atax_kernels.study import train as study_train

    real_train = study_train.train

    def train_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) == cut_at[0]:
            raise _Cut("the third training run is cut short")
        return real_train(*a, **kw)

    monkeypatch.setattr(study_train, "train", train_then_stop)
    with pytest.raises(_Cut):
        run_main(args(tiny, out, tmp_path / "cache", *grid))
    logged = [json.loads(line)["row"] for line in (out / "s.json.rows.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["spec"]) for r in logged] == [(0, "plain"), (0, "interp:a=0.5"), (0, "ptx:w=1")]
    partial = json.loads((out / "s.json").read_text())
    assert partial["runs_done"] == 2 and partial["runs_total"] == 4
    assert "Partial result: 2 of 4" in (out / "s.md").read_text()

    calls.clear()
    cut_at[0] = -1
    assert run_main(args(tiny, out, tmp_path / "cache", *grid, "--resume")) == 0
    assert len(calls) == 2  # seed 1's plain and ptx only
    resumed = json.loads((out / "s.json").read_text())
    assert resumed["runs_done"] == 4 and resumed["resumed_rows"] == 3
    key = lambda r: (r["seed"], r["objective"], r["lr"], r["spec"])  # noqa: E731
    strip = lambda rows: sorted(({k: v for k, v in r.items() if k != "resumed"} for r in _numbers(rows)), key=key)  # noqa: E731
    assert strip(resumed["rows"]) == strip(full["rows"])
    assert "Partial" not in (out / "s.md").read_text()

    # a different configuration does not reuse the log
    calls.clear()
    assert run_main(args(tiny, out, tmp_path / "cache", *grid, "--resume", "--batch-size", "2")) == 0
    assert len(calls) == 4


def test_lora(tiny, tmp_path):
    out = tmp_path / "out"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "plain,act:e=0.9,act+ptx:e=0.9:w=1",
                         "--lora-r", "4")) == 0
    rows = json.loads((out / "s.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"base", "plain", "act e0.9", "act e0.9 + ptx 1"}
    assert "LoRA r=4" in (out / "s.md").read_text()


# -- bad input: a clear error before any training step, nothing written ----------------------------------
def _refused(argv: list[str], capsys, tmp_path: Path, pattern: str) -> None:
    from atax_kernels.study import train as T

    called = []
    orig = T.train
    T.train = lambda *a, **k: called.append(1) or orig(*a, **k)
    try:
        rc = run_main(argv)
    finally:
        T.train = orig
    err = capsys.readouterr().err
    assert rc == 2, err
    assert pattern.lower() in err.lower(), err
    assert not called
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))


def test_bad_model_path(tmp_path, capsys):
    _refused(args(str(tmp_path / "no-such-model"), tmp_path / "out", tmp_path / "cache"), capsys, tmp_path,
             "no such file")


def test_gguf_without_package(tmp_path, capsys, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    argv = args("x", tmp_path / "out", tmp_path / "cache")
    argv = argv[2:] + ["--gguf", str(f)]
    _refused(argv, capsys, tmp_path, "pip install gguf")


def test_missing_column(tiny, tmp_path, capsys):
    argv = args(tiny, tmp_path / "out", tmp_path / "cache")
    argv[argv.index("--answer-col") + 1] = "capital"
    _refused(argv, capsys, tmp_path, "capital")


def test_too_few_held_out(tiny, tmp_path, capsys):
    small = tmp_path / "data"
    small.mkdir()
    for name in ("capability", "harmful", "benign", "lookalike"):
        lines = (DATA / f"{name}.jsonl").read_text().splitlines()
        (small / f"{name}.jsonl").write_text("\n".join(lines[:12] if name == "benign" else lines) + "\n")
    _refused(args(tiny, tmp_path / "out", tmp_path / "cache", data=small), capsys, tmp_path, "held-out")


def test_base_answers_nothing(tiny, tmp_path, capsys):
    argv = args(tiny, tmp_path / "out", tmp_path / "cache")
    argv[argv.index("--capability-filter") + 1] = "base"
    _refused(argv, capsys, tmp_path, "answers none")


def test_no_chat_template(tmp_path, capsys):
    bare = make_tiny(tmp_path / "bare", template=False)
    _refused(args(bare, tmp_path / "out", tmp_path / "cache"), capsys, tmp_path, "chat template")


def test_unwritable_output(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = args(tiny, tmp_path / "out", tmp_path / "cache")
    argv[argv.index("--json") + 1] = str(blocker / "s.json")
    _refused(argv, capsys, tmp_path, "cannot be written")


# -- the scale path on CPU: DDP over 2 processes (gloo) ---------------------------------------------------
def test_ddp_two_processes(tiny, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "atax_kernels.study", *args(tiny, out, tmp_path / "cache", "--methods", "plain,act:e=0.9,grad")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "s.json").read_text())
    assert res["world_size"] == 2 and {r["method"] for r in res["rows"]} == {"base", "plain", "act e0.9", "grad"}


def test_dpo_through_trl(tiny, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "out"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "plain,grad,act:e=0.9", "--objective", "dpo",
                         "--dpo-impl", "trl")) == 0
    rows = {r["method"]: r for r in json.loads((out / "s.json").read_text())["rows"]}
    assert set(rows) == {"base", "plain", "grad", "act e0.9"}
    assert rows["grad"]["removed_fraction"] is not None and rows["act e0.9"]["basis_mib"] > 0
    assert math.isfinite(rows["plain"]["loss_first"])


def test_refresh_tol_checks_instead_of_rebuilding(tiny, tmp_path):
    """--refresh-tol: refresh steps observe the basis batches and keep the bases while they still fit (at a tiny
    learning rate they do), doubling the interval; --refresh-tol 0 rebuilds at every refresh step."""
    rows = {}
    for tol in ("0", "0.5"):
        out = tmp_path / f"t{tol}"
        assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "act:e=0.9", "--steps", "4",
                             "--lr", "1e-7", "--refresh-tol", tol)) == 0
        rows[tol] = json.loads((out / "s.json").read_text())["rows"][-1]
    fixed, adaptive = rows["0"], rows["0.5"]
    assert (fixed["refreshes"], fixed["refresh_checks"]) == (3, 3)      # steps 1, 2, 3 (--refresh-every 1)
    assert (adaptive["refreshes"], adaptive["refresh_checks"]) == (0, 2)  # steps 1 and 3: kept, interval 2
    assert fixed["extra_forward"] == pytest.approx(2 / 1)     # as before the setting: 2 batches every step
    assert adaptive["extra_forward"] == pytest.approx(2 * 2 / 4)  # the checks made: 2 batches at 2 of 4 steps


def test_refresh_tol_keeps_older_rows_resumable(monkeypatch):
    """A setting added later is left out of the fingerprint at its old behaviour's value, so rows written before
    it existed still resume; any other value changes the fingerprint."""
    from dataclasses import asdict

    from atax_kernels.study import resume
    from atax_kernels.study.config import StudyConfig

    monkeypatch.setattr(resume, "model_identity", lambda cfg: {"model": "fixed"})
    now = resume.fingerprint(StudyConfig(refresh_tol=0.0), "d")
    monkeypatch.setattr(resume, "asdict", lambda c: {k: v for k, v in asdict(c).items() if k != "refresh_tol"})
    before_the_setting = resume.fingerprint(StudyConfig(), "d")
    monkeypatch.setattr(resume, "asdict", asdict)
    assert now == before_the_setting
    assert resume.fingerprint(StudyConfig(refresh_tol=0.02), "d") != now


def test_bad_refresh_tol(tiny, tmp_path, capsys):
    _refused(args(tiny, tmp_path / "o", tmp_path / "cache", "--refresh-tol", "1.5"), capsys, tmp_path,
             "--refresh-tol")


def test_lookalike_nll_rows_refused_under_trl(tiny, tmp_path, capsys):
    pytest.importorskip("trl")
    _refused(args(tiny, tmp_path / "o", tmp_path / "cache", "--methods", "plain:la=nll", "--objective", "dpo",
                  "--dpo-impl", "trl"), capsys, tmp_path, "la=nll")


def test_refresh_tol_with_trl_dpo(tiny, tmp_path):
    """Under --dpo-impl trl the drift-checked refresh reaches attach() as a RefreshSchedule: at a tiny learning
    rate its checks keep the bases (refresh_checks counted, refreshes 0), as in the study's own loop."""
    pytest.importorskip("trl")
    from atax_kernels.study.__main__ import build_parser, config_from_args

    for argv in (["--dpo-impl", "trl", "--objective", "dpo"], []):
        assert config_from_args(build_parser().parse_args(argv), argv).refresh_tol == 0.02
    assert config_from_args(build_parser().parse_args(["--full"]), ["--full"]).refresh_tol == 0.0
    out = tmp_path / "o"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "act:e=0.9", "--objective", "dpo",
                         "--dpo-impl", "trl", "--steps", "4", "--lr", "1e-7", "--refresh-tol", "0.5")) == 0
    row = {r["method"]: r for r in json.loads((out / "s.json").read_text())["rows"]}["act e0.9"]
    assert (row["refreshes"], row["refresh_checks"]) == (0, 2)   # steps 1 and 3 (--refresh-every 1): kept


def test_act_modules_selector(tiny, tmp_path):
    """act:mods=attn|mlp protects only the layers of those blocks; the default spec is what it was before the key
    existed (committed rows keep resuming); a run with mods=mlp trains and reports its (smaller) bases."""
    from transformers import AutoModelForCausalLM

    from atax_kernels.study.methods import parse_method
    from atax_kernels.study.train import block_modules

    assert parse_method("act:e=0.9").spec == "act:e=0.9:c=0:pos=all"
    m = parse_method("act:e=0.9:mods=mlp")
    assert m.spec == "act:e=0.9:c=0:pos=all:mods=mlp" and m.name == "act e0.9 mlp only"
    with pytest.raises(ValueError, match="mods"):
        parse_method("act:mods=heads")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    attn, mlp = block_modules(model, "attn"), block_modules(model, "mlp")
    assert attn and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in attn)
    assert mlp and all(n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for n in mlp)
    assert block_modules(model, "all") is None
    out = tmp_path / "out"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "act:e=0.9,act:e=0.9:mods=mlp")) == 0
    rows = {r["method"]: r for r in json.loads((out / "s.json").read_text())["rows"]}
    assert 0 < rows["act e0.9 mlp only"]["basis_mib"] < rows["act e0.9"]["basis_mib"]


def test_answered_lookalikes_join_the_safety_data(tiny, tmp_path, monkeypatch):
    """la=1: the train look-alikes, answered as the base answers them, join the safety rows (SFT), or join as
    pairs whose chosen is the base's answer and rejected a refusal (DPO); la=0 trains on the harmful rows only;
    the default spec is what it was before the key existed (committed rows keep resuming)."""
    from atax_kernels.study import train as T

    assert parse_method("plain").spec == "plain" and parse_method("act:e=0.9").spec == "act:e=0.9:c=0:pos=all"
    m = parse_method("act:e=0.9:la=1")
    assert m.spec == "act:e=0.9:c=0:pos=all:la=1" and m.name == "act e0.9 + look-alikes" and m.answers_lookalikes
    assert parse_method(m.spec) == m
    for bad, msg in (("plain:la=2", "one of"), ("interp:la=1", "unknown key"),
                     ("plain,plain:la=1,interp:a=0.5", "one plain")):
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    seen = []
    real_train = T.train

    def recording_train(model, base, method, safety, retain, cfg, **kw):
        seen.append((cfg.objective, method.name, len(safety.chosen),
                     None if safety.rejected is None else len(safety.rejected), safety))
        return real_train(model, base, method, safety, retain, cfg, **kw)

    monkeypatch.setattr(T, "train", recording_train)
    out = tmp_path / "out"
    assert run_main(args(tiny, out, tmp_path / "cache", "--methods", "plain,plain:la=1,act:e=0.9:la=1,grad:la=nll",
                         "--objective", "sft,dpo")) == 0
    res = json.loads((out / "s.json").read_text())
    split = res["setup"]["splits"]["0"]
    n_harm, n_look = split["harmful"]["train"], split["lookalike"]["train"]
    assert n_look > 0
    by = {(obj, name): (n_c, n_r, s) for obj, name, n_c, n_r, s in seen}
    assert by["sft", "plain"][:2] == (n_harm, None)
    assert by["sft", "plain + look-alikes"][:2] == (n_harm + n_look, None)
    assert by["sft", "act e0.9 + look-alikes"][:2] == (n_harm + n_look, None)
    assert by["dpo", "plain"][:2] == (n_harm, n_harm)
    assert by["dpo", "plain + look-alikes"][:2] == (n_harm + n_look, n_harm + n_look)
    plain, la = by["sft", "plain"][2], by["sft", "plain + look-alikes"][2]
    assert la.chosen[:n_harm] == plain.chosen   # the harmful rows unchanged, the look-alikes appended
    dpo = by["dpo", "plain + look-alikes"][2]
    assert dpo.ref_chosen.shape == (n_harm + n_look,) and dpo.ref_rejected.shape == (n_harm + n_look,)
    rows = {(r["objective"], r["method"]) for r in res["rows"]}
    assert {("sft", "plain + look-alikes"), ("dpo", "act e0.9 + look-alikes")} <= rows
    # la=nll: for SFT the la=1 rows themselves; for DPO the look-alikes are NLL rows (rejected = chosen, unused)
    assert by["sft", "grad + look-alikes (NLL)"][2] is la
    nll = by["dpo", "grad + look-alikes (NLL)"][2]
    assert nll.nll_rows.tolist() == [False] * n_harm + [True] * n_look
    assert nll.chosen[:n_harm] == dpo.chosen[:n_harm] and nll.rejected[:n_harm] == dpo.rejected[:n_harm]
    assert nll.rejected[n_harm:] == nll.chosen[n_harm:] and nll.chosen[n_harm:] == dpo.chosen[n_harm:]
    assert dpo.nll_rows is None
    assert parse_method("act:e=0.9:la=nll").name == "act e0.9 + look-alikes (NLL)"
    with pytest.raises(ValueError, match="contrast"):
        parse_method("act:c=0.5:la=nll")
