"""`qlora-ext`: argument handling, bad input, outputs, checkpoints and bit-exact resume.

End-to-end runs use the hidden `--builtin-config test` (a 2-layer, 64-wide built-in model) so
that each takes seconds on two CPU cores."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_ext import cli
from qlora_ext.finetune_data import DataError, read_jsonl
from qlora_ext.png_plot import encode_png, plot_lines
from qlora_ext.progress import ProgressBar

REPO = Path(__file__).resolve().parents[1]
FAST = ["--builtin-config", "test", "--warmup-steps", "5", "--log-every", "5", "--device", "cpu", "--eval-size", "40"]


def run(tmp_path: Path, *args: str, out: str = "out") -> int:
    return cli.main(["finetune", "--output-dir", str(tmp_path / out), *FAST, *args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- JSONL ---------------------------------------------------------------------------------------

def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "reverse: ab", "completion": "ba"})
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x"}', "'completion' must be a string"),
    ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string"),
    ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ('{"text": "x"}', "expected keys"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least 2 messages"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "role 'assistant'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', r"messages\[0\]"),
], ids=["json", "array", "no-completion", "prompt-type", "empty-completion", "keys", "one-message",
        "last-not-assistant", "no-content"])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "d.jsonl", [GOOD, "", CHAT, bad, GOOD])
    with pytest.raises(DataError, match=message) as err:
        read_jsonl(path)
    assert f"{path}:4:" in str(err.value)


def test_jsonl_reads_both_formats_and_skips_blank_lines(tmp_path):
    records = read_jsonl(write(tmp_path / "d.jsonl", [GOOD, "  ", CHAT]))
    assert [("messages" in r) for r in records] == [False, True]


def test_empty_jsonl_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(write(tmp_path / "d.jsonl", ["", ""]))


# ---- bad input on the command line: exit 2, nothing written ---------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--seq-len", "4"], "--seq-len must be at least 8"),
    (["--seq-len", "1000"], "at most 256"),
    (["--data", "/nonexistent.jsonl"], "no such file"),
    (["--model", "/nonexistent-model"], "no such directory"),
    (["--r", "0"], "--r must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dropout", "1.5"], "--dropout"),
    (["--device", "tpu"], "--device"),
    (["--resume"], "no checkpoint"),
    (["--offload-checkpoints"], "--offload-checkpoints needs --model"),
], ids=["seq-len-small", "seq-len-large", "data", "model", "r", "lr", "dropout", "device", "resume", "offload"])
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    assert run(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lines, message", [
    ([GOOD, GOOD, "{oops"], ":3: not valid JSON"),
    ([], "no examples"),
])
def test_bad_data_exits_2_and_leaves_output_alone(tmp_path, capsys, lines, message):
    data = write(tmp_path / "d.jsonl", lines)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"qlora_ext_version": "0"}))
    assert run(tmp_path, "--data", str(data)) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]
    assert json.loads((out / "run_config.json").read_text()) == {"qlora_ext_version": "0"}


def test_refuses_a_foreign_non_empty_output_dir(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert run(tmp_path, "--steps", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# VeRA trains a few scaling vectors only: it needs a larger learning rate (as its paper uses).
@pytest.mark.parametrize("method, optimizer, peft_type, lr", [("dora", "paged_adamw", "LORA", "3e-3"), ("vera", "adamw", "VERA", "5e-2")])
def test_finetune_with_other_methods_and_paged_adamw(tmp_path, method, optimizer, peft_type, lr):
    assert run(tmp_path, "--steps", "30", "--save-every", "0", "--method", method, "--optimizer", optimizer, "--lr", lr) == 0
    out = tmp_path / "out"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (method == "dora")
    train = [r for r in metrics(out) if r["type"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]


def test_method_change_is_refused_on_resume(tmp_path, capsys):
    assert run(tmp_path, "--steps", "4", "--save-every", "2", "--stop-after", "2") == 0
    assert run(tmp_path, "--steps", "4", "--resume", "--method", "dora") == 2
    assert "method" in capsys.readouterr().err


def test_version_and_info_through_the_module_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    done = subprocess.run([sys.executable, "-m", "qlora_ext.cli", "--version"], capture_output=True, text=True, env=env)
    import qlora_ext

    assert done.returncode == 0 and done.stdout.strip() == f"qlora-ext {qlora_ext.__version__}"
    done = subprocess.run([sys.executable, "-m", "qlora_ext.cli", "info"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "device:" in done.stdout and "torch" in done.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "finetune" in capsys.readouterr().err


# ---- PNG and progress ----------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + n
    return chunks


def check_png(data: bytes, width: int, height: int) -> bytes:
    """Validates signature, chunk CRCs, IHDR and the image data; returns the raw RGB rows."""
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h, depth, colour, interlace) == (width, height, 8, 2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.size == (width, height) and img.mode == "RGB"
    return raw


def test_png_encoder_round_trip():
    w, h = 5, 3
    rgb = bytes(v for y in range(h) for x in range(w) for v in (x * 40, y * 80, 7))
    raw = check_png(encode_png(w, h, rgb), w, h)
    rows = [raw[y * (1 + 3 * w) : (y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows) and b"".join(r[1:] for r in rows) == rgb
    with pytest.raises(ValueError, match="width\\*height\\*3"):
        encode_png(2, 2, b"\x00")


def test_plot_draws_lines_on_white():
    data = plot_lines([([0, 1, 2, 3], [4.0, 2.0, 1.5, float("nan")], (255, 0, 0)), ([0, 3], [3.0, 1.0], (0, 0, 255))],
                      width=200, height=120)
    raw = check_png(data, 200, 120)
    pixels = {raw[i : i + 3] for r in range(120) for i in range(r * 601 + 1, (r + 1) * 601, 3)}
    assert {b"\xff\xff\xff", b"\xff\x00\x00", b"\x00\x00\xff"} <= pixels
    check_png(plot_lines([]), 640, 400)  # nothing to draw is still a valid image


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(20, every=5, stream=stream)
    for step in range(1, 21):
        bar.update(step, {"loss": "1.0"})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in stream.getvalue()
    assert lines[-1].startswith("100%") and "20/20" in lines[-1] and "loss 1.0" in lines[-1]


def test_progress_bar_redraws_in_place_on_a_terminal():
    stream = FakeTTY()
    bar = ProgressBar(3, stream=stream)
    bar.update(1, {"loss": "2"})
    bar.write("a message")
    bar.update(3, {"loss": "1"})
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r") and "a message\n" in text and "3/3" in text and text.endswith("\n")


# ---- end to end ----------------------------------------------------------------------------------

def test_finetune_writes_adapter_metrics_plot_and_learns(tmp_path, capsys):
    assert run(tmp_path, "--steps", "60", "--save-every", "20", "--eval-size", "100") == 0
    out = tmp_path / "out"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all(k.startswith("base_model.model.") for k in weights)
    records = metrics(out)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train)
    assert train[-1]["loss"] < train[0]["loss"] * 0.85
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 60)
    assert after["loss"] < before["loss"] and after["exact_match"] > before["exact_match"]
    check_png((out / "loss.png").read_bytes(), 640, 400)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000060"]
    stdout = capsys.readouterr().out
    assert "held-out before" in stdout and "held-out after" in stdout
    # A second run into the same (qlora-ext) directory replaces it without --overwrite.
    assert run(tmp_path, "--steps", "2", "--save-every", "0") == 0
    assert not (out / "checkpoints").exists() and metrics(out)[-1]["step"] == 2


def test_resume_is_bit_exact(tmp_path, capsys):
    common = ["--steps", "16", "--save-every", "4", "--dropout", "0.1", "--batch-size", "8", "--grad-accum", "2",
              "--eval-every", "8"]
    assert run(tmp_path, *common, out="whole") == 0
    assert run(tmp_path, *common, "--stop-after", "10", out="parts") == 0
    parts = tmp_path / "parts"
    assert not (parts / "adapter").exists()
    assert [p.name for p in (parts / "checkpoints").iterdir()] == ["step-00000010"]
    assert run(tmp_path, "--resume", out="parts") == 0
    assert "resumed from" in capsys.readouterr().out

    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(parts / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in recs]  # noqa: E731
    assert strip(metrics(parts)) == strip(metrics(tmp_path / "whole"))


def test_packing_trains_the_same_as_padding(tmp_path):
    """--packing changes only how a micro-batch is laid out: the logged losses follow the padded
    run's (float summation order aside)."""
    common = ["--steps", "10", "--save-every", "0", "--batch-size", "8", "--seq-len", "64"]
    assert run(tmp_path, *common, out="padded") == 0
    assert run(tmp_path, *common, "--packing", out="packed") == 0
    padded = [r for r in metrics(tmp_path / "padded") if r["type"] == "train"]
    packed = [r for r in metrics(tmp_path / "packed") if r["type"] == "train"]
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [5, 10]
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert json.loads((tmp_path / "packed" / "run_config.json").read_text())["packing"] is True


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert run(tmp_path, "--steps", "4", "--save-every", "2", "--stop-after", "2") == 0
    assert run(tmp_path, "--resume", "--r", "8") == 2
    assert "differs from the run being resumed" in capsys.readouterr().err
    assert run(tmp_path, "--resume", "--steps", "6") == 0  # more steps is fine
    assert metrics(tmp_path / "out")[-1]["step"] == 6


def test_checkpoint_in_progress_is_ignored(tmp_path):
    from qlora_ext.finetune import latest_checkpoint

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000004").mkdir(parents=True)
    (ckpts / "step-00000004" / "trainer_state.json").write_text("{}")
    (ckpts / ".tmp-step-00000008").mkdir()
    (ckpts / "step-00000006").mkdir()  # incomplete: no trainer_state.json
    assert latest_checkpoint(tmp_path) == ckpts / "step-00000004"


# ---- a local transformers checkpoint -------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "<s>", "</s>", "<pad>", "reverse", "upper", ":", "ab", "ba", "cd", "dc", "AB", "CD",
             "user", "assistant"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                          "{% if add_generation_prompt %}assistant : {% endif %}")
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [[], ["--packing", "--offload-checkpoints"]], ids=["padded", "packed-offloaded"])
def test_finetune_a_local_transformers_checkpoint(tmp_path, hf_checkpoint, extra):
    lines = []
    for w, rev, up in [("ab", "ba", "AB"), ("cd", "dc", "CD")] * 10:
        lines.append(json.dumps({"prompt": f"reverse : {w}", "completion": rev}))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"upper : {w}"},
                                              {"role": "assistant", "content": up}]}))
    data = write(tmp_path / "d.jsonl", lines)
    code = cli.main(["finetune", "--model", str(hf_checkpoint), "--data", str(data), "--output-dir",
                     str(tmp_path / "out"), "--steps", "8", "--lr", "5e-3", "--batch-size", "8", "--eval-size", "8",
                     "--log-every", "4", "--save-every", "0", "--device", "cpu", "--r", "4", *extra])
    assert code == 0
    records = metrics(tmp_path / "out")
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 2 and evals[-1]["loss"] < evals[0]["loss"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "q_proj" in config["target_modules"]
