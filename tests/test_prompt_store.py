"""The prompt data pipeline: prompt lists -> umT5 (a tiny random UMT5 and an offline word-level tokenizer) ->
sharded bf16 store -> lazy reads. Round trip, resume after an interrupted encode, bounded memory, errors."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from self_forcing.training.encode_prompts import main as encode_main
from self_forcing.training.prompt_store import (NEGATIVE_PROMPT, PromptStore, StoreError, encode_store,
                                                shard_name, toy_prompt_encoder)
from self_forcing.training.prompts import PromptFileError, read_prompts
from self_forcing.training.umt5 import _WAN_BLOCK_KEYS, load_umt5, wan_clean

WORDS = "a an the cat dog fox bird runs jumps flies sleeps on in under over beach forest city sky red blue " \
        "green small big at night day slowly quickly river".split()
PROMPTS = ["a red cat runs on the beach", "the big dog sleeps", "a fox jumps over the river at night",
           "blue sky", "a small green bird flies quickly over the city", "the cat", "dog runs in the forest",
           "a big red fox sleeps under the blue sky at day"]


def fake_encoder(dim: int):
    """Deterministic per text: [1 + words, dim] random rows keyed by the text."""
    def encode(texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
            out.append(torch.randn(1 + len(t.split()), dim, generator=g))
        return out

    encode.name = f"fake-{dim}"
    return encode


@pytest.fixture(scope="module")
def tiny_umt5(tmp_path_factory):
    """A diffusers-style folder (text_encoder/ + tokenizer/) with a random 2-layer UMT5 and a word-level
    tokenizer that appends </s>, as umT5's does. Returns (folder, model, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(str(root / "text_encoder"))
    return str(root), model, fast


def reference(model, tokenizer, text):
    """umT5 of one prompt alone, no padding: the ground truth the store must hold."""
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).last_hidden_state[0]


# -- prompt lists ----------------------------------------------------------------------------------
def test_read_prompt_lists(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa cat\n\n  the dog runs  \r\n\t\nblue sky".encode())
    assert read_prompts(str(txt)) == ["a cat", "the dog runs", "blue sky"]
    csv = tmp_path / "p.csv"
    csv.write_text('id,Caption,score\n1,"a cat, sleeping",3\n2,,4\n\n3,"two\nlines",5\n', encoding="utf-8")
    assert read_prompts(str(csv)) == ["a cat, sleeping", "two\nlines"]
    first = tmp_path / "first.csv"
    first.write_text("description,id\nred fox,1\nblue bird,2\n")
    assert read_prompts(str(first)) == ["red fox", "blue bird"]  # no known header: the first column
    assert read_prompts(str(first), column="id") == ["1", "2"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("text\tn\nsky at night\t1\n")
    assert read_prompts(str(tsv)) == ["sky at night"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a fox", "x": 1}\n\n"plain string"\n{"caption": " big dog "}\n{"text": ""}\n')
    assert read_prompts(str(jl)) == ["a fox", "plain string", "big dog"]
    other = tmp_path / "prompts.list"
    other.write_text("one\ntwo\n")
    assert read_prompts(str(other), fmt="text") == ["one", "two"]


@pytest.mark.parametrize("name,content,line,match", [
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "broken"\n', 3, "not valid JSON"),
    ("nokey.jsonl", '{"prompt": "ok"}\n{"title": "x"}\n', 2, "no 'prompt' / 'text' / 'caption' key"),
    ("num.jsonl", '{"prompt": 5}\n', 1, "must be a string, got int"),
    ("short.csv", "a,prompt\n1,x\n2\n", 3, "row has 1 column"),
    ("nul.txt", "fine\nbin\x00ary\n", 2, "NUL byte"),
    ("empty.txt", "\n  \n", None, "holds no prompts"),
    ("p.docx", "x", None, "unknown prompt-list extension"),
])
def test_prompt_list_errors_name_file_and_line(tmp_path, name, content, line, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=match) as err:
        read_prompts(str(path))
    assert err.value.path == str(path) and err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}:" if line else f"{path}:")


def test_prompt_list_encoding_and_missing_column(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(PromptFileError, match=r"latin.txt:2: not UTF-8"):
        read_prompts(str(path))
    csv = tmp_path / "c.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(PromptFileError, match=r"c.csv:1: no column named 'prompt_text'"):
        read_prompts(str(csv), column="prompt_text")
    with pytest.raises(PromptFileError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))


# -- umT5 ----------------------------------------------------------------------------------------------
def test_umt5_store_round_trip(tiny_umt5, tmp_path):
    folder, model, tokenizer = tiny_umt5
    encoder = load_umt5(folder, device="cpu", dtype=torch.float32)
    store = encode_store(PROMPTS, str(tmp_path / "store"), encoder, shard_size=3, batch_size=2, progress=False)
    m = store.manifest
    assert len(store) == m["count"] == len(PROMPTS) and store.dim == m["dim"] == 32
    assert [s["file"] for s in m["shards"]] == [shard_name(k) for k in range(3)]
    assert [s["count"] for s in m["shards"]] == [3, 3, 2] and m["dtype"] == "bfloat16"
    assert store.texts() == PROMPTS and store.negative_text == NEGATIVE_PROMPT
    for i, text in enumerate(PROMPTS):
        ref = reference(model, tokenizer, text)
        row = store.embedding(i)
        assert row.dtype == torch.bfloat16 and row.shape == ref.shape  # unpadded: real tokens + </s>
        assert store.tokens(i) == len(text.split()) + 1
        torch.testing.assert_close(row.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 of the same numbers
    # the negative prompt went through the same encoder (whitespace-free Chinese: one unknown word + </s>)
    torch.testing.assert_close(store.negative().float(), reference(model, tokenizer, NEGATIVE_PROMPT),
                               rtol=1e-2, atol=1e-2)
    # padding is per batch: zeros after each prompt's tokens, truncation past text_len
    batch = store.batch([5, 0], text_len=6, device="cpu")
    assert batch.shape == (2, 6, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0, :3], store.embedding(5).float()) and torch.count_nonzero(batch[0, 3:]) == 0
    assert torch.equal(batch[1], store.embedding(0)[:6].float())
    PromptStore(str(tmp_path / "store"), verify=True)  # every sha256 matches
    assert wan_clean(" a &amp;amp; b\n\t c ") == "a & b c"  # Wan's cleaning: HTML unescaped twice, whitespace
    torch.testing.assert_close(encoder(["the  cat\n"])[0], reference(model, tokenizer, "the cat"))


def test_umt5_weight_files_load_the_same_encoder(tiny_umt5, tmp_path):
    """Wan's .pth key names and a single transformers-keyed .safetensors (also fp8 with scale_weight, as
    ComfyUI ships) give the encoder of the transformers folder."""
    from safetensors.torch import save_file

    folder, model, tokenizer = tiny_umt5
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inverse = {v: k for k, v in _WAN_BLOCK_KEYS.items()}
    wan = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for k, v in sd.items():
        if k.startswith("encoder.block."):
            _, _, i, rest = k.split(".", 3)
            wan[f"blocks.{i}.{inverse[rest]}"] = v
    torch.save(wan, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    save_file({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}, str(tmp_path / "umt5.safetensors"))
    fp8 = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and ".block." in k:
            scale = v.abs().max() / 448.0
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            fp8[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        elif k != "encoder.embed_tokens.weight":
            fp8[k] = v
    fp8["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, str(tmp_path / "umt5_fp8_scaled.safetensors"))
    tok = os.path.join(folder, "tokenizer")
    texts = PROMPTS[:3]
    want = [reference(model, tokenizer, t) for t in texts]
    for name, tol in [("models_t5_umt5-xxl-enc-bf16.pth", 1e-5), ("umt5.safetensors", 1e-5),
                      ("umt5_fp8_scaled.safetensors", 0.25)]:
        enc = load_umt5(str(tmp_path / name), tok, dtype=torch.float32)
        for got, ref in zip(enc(texts), want):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_umt5(str(tmp_path / "umt5.safetensors"), dtype=torch.float32)
    save_file({"x.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a umT5 encoder"):
        load_umt5(str(tmp_path / "other.safetensors"), tok)


# -- resume, errors ------------------------------------------------------------------------------------
class Interrupted(RuntimeError):
    pass


def counting(encoder, fail_after: int | None = None):
    """The encoder, counting the prompts it encodes and raising after ``fail_after`` calls (a kill)."""
    def encode(texts):
        encode.calls += 1
        if fail_after is not None and encode.calls > fail_after:
            raise Interrupted("killed")
        encode.prompts += len(texts)
        return encoder(texts)

    encode.calls, encode.prompts, encode.name = 0, 0, encoder.name
    return encode


def test_interrupted_encode_resumes_where_it_stopped(tmp_path):
    prompts = [f"prompt number {i} " + "word " * (i % 5) for i in range(23)]
    full = encode_store(prompts, str(tmp_path / "full"), fake_encoder(8), shard_size=5, batch_size=2,
                        progress=False)
    out = str(tmp_path / "resumed")
    first = counting(fake_encoder(8), fail_after=8)  # the negative + 7 batches: shards 0 (3 batches) and 1 done
    with pytest.raises(Interrupted):
        encode_store(prompts, out, first, shard_size=5, batch_size=2, progress=False)
    assert sorted(f for f in os.listdir(out) if f.startswith("shard_")) == [shard_name(0), shard_name(1)]
    with pytest.raises(StoreError, match="unfinished prompt store"):
        PromptStore(out)
    open(os.path.join(out, shard_name(2) + ".tmp"), "wb").write(b"half a shard")  # a write cut short
    second = counting(fake_encoder(8))
    store = encode_store(prompts, out, second, shard_size=5, batch_size=2, progress=False)
    assert second.prompts == len(prompts) - 10  # shards 0 and 1 (and the negative) were not encoded again
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for i in range(len(prompts)):
        assert torch.equal(store.embedding(i), full.embedding(i))
    assert torch.equal(store.negative(), full.negative())
    assert [s["sha256"] for s in store.manifest["shards"]] == [s["sha256"] for s in full.manifest["shards"]]
    again = counting(fake_encoder(8))
    encode_store(prompts, out, again, shard_size=5, batch_size=2, progress=False)
    assert again.calls == 0  # a finished store is not encoded again
    with pytest.raises(StoreError, match=r"other input \(differs in \['count', 'prompts_sha256'\]\)"):
        encode_store(prompts[:-1], out, fake_encoder(8), shard_size=5, progress=False)
    with pytest.raises(StoreError, match=r"differs in \['encoder'\]"):
        encode_store(prompts, out, fake_encoder(4), shard_size=5, batch_size=2, progress=False)
    small = encode_store(prompts[:3], out, fake_encoder(4), shard_size=5, overwrite=True, progress=False)
    assert len(small) == 3 and small.dim == 4 and sorted(os.listdir(out)) == sorted(
        ["manifest.json", "plan.json", "prompts.jsonl", "negative.safetensors", shard_name(0)])


def test_damaged_stores_and_bad_encoders_are_refused(tmp_path):
    out = str(tmp_path / "s")
    with pytest.raises(StoreError, match="not a prompt store"):
        PromptStore(out)
    encode_store(PROMPTS, out, fake_encoder(8), shard_size=4, progress=False)
    path = os.path.join(out, shard_name(1))
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # same size, one byte changed
    open(path, "wb").write(bytes(data))
    PromptStore(out)  # sizes match: opening stays cheap
    with pytest.raises(StoreError, match="checksum mismatch"):
        PromptStore(out, verify=True)
    open(path, "wb").write(bytes(data[:-10]))
    with pytest.raises(StoreError, match="wrong size"):
        PromptStore(out)
    with pytest.raises(StoreError, match=r"returned 1 embeddings for 2 prompts"):
        encode_store(["a", "b"], str(tmp_path / "x"), lambda t: [torch.zeros(2, 4)], negative=None, progress=False)
    with pytest.raises(StoreError, match=r"one \[tokens >= 1, dim\] tensor per prompt"):
        encode_store(["a"], str(tmp_path / "y"), lambda t: [torch.zeros(4)], negative=None, progress=False)
    mixed = iter([[torch.zeros(2, 4)], [torch.zeros(2, 5)]])
    with pytest.raises(StoreError, match="returned width 5"):
        encode_store(["a", "b"], str(tmp_path / "z"), lambda t: next(mixed), batch_size=1, negative=None,
                     progress=False)


def test_toy_text_encoder_fills_a_store(tmp_path):
    from self_forcing.toy.text import ToyTextEncoder

    enc = ToyTextEncoder(text_dim=16, seed=3)
    prompts = ["a red circle bouncing on a black background", "a blue square and a green triangle"]
    store = encode_store(prompts, str(tmp_path / "toy"), toy_prompt_encoder(enc), negative=None, progress=False)
    want = enc.encode(prompts)
    for i, p in enumerate(prompts):
        n = len(p.split())
        assert store.tokens(i) == n and store.negative() is None
        assert torch.equal(store.embedding(i), want[i, :n].to(torch.bfloat16))


# -- lazy loading ----------------------------------------------------------------------------------------
def test_reads_only_the_requested_prompts(tmp_path):
    """Bytes materialised for a batch do not depend on the number of prompts in the store."""
    dim = 64
    read = []
    for count in (10, 2000):
        prompts = [f"prompt {i} " + "w " * (i % 7) for i in range(count)]
        store = encode_store(prompts, str(tmp_path / f"s{count}"), fake_encoder(dim), shard_size=100,
                             negative=None, progress=False)
        batch = store.batch([3, 7, 1, 9], text_len=16)
        want = sum(store.tokens(i) for i in (3, 7, 1, 9)) * dim * 2
        read.append(store.bytes_read)
        assert store.bytes_read == want and batch.shape == (4, 16, dim)
    assert read[0] == read[1]


RSS_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from self_forcing.training.prompt_store import PromptStore
    store = PromptStore(sys.argv[1])
    for step in range(20):
        ids = [(step * 37 + j * 101) % len(store) for j in range(4)]
        store.batch(ids, text_len=64)
    # peak resident memory of this process image (ru_maxrss would carry the parent's peak across exec)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


def test_peak_rss_does_not_grow_with_the_number_of_prompts(tmp_path):
    """A 2000-prompt store of ~65 MB (bf16, unpadded) read a batch at a time costs the process no more
    memory than a 10-prompt one (an eager load would add the whole store, padded in float32 ~1 GB)."""
    dim = 512
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    rss, sizes = {}, {}
    for count in (10, 2000):
        prompts = [f"prompt {i} " + "w " * (20 + i % 40) for i in range(count)]
        out = tmp_path / f"s{count}"
        encode_store(prompts, str(out), fake_encoder(dim), shard_size=250, negative=None, progress=False)
        sizes[count] = sum(f.stat().st_size for f in out.iterdir())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        res = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env,
                             check=True)
        rss[count] = int(res.stdout.strip().splitlines()[-1]) * 1024  # VmHWM is in KiB
    assert sizes[2000] > 60e6
    assert rss[2000] - rss[10] < 0.25 * sizes[2000], (rss, sizes)


# -- command line ---------------------------------------------------------------------------------------
def test_encode_prompts_command_line(tiny_umt5, tmp_path, capsys):
    folder, model, tokenizer = tiny_umt5
    lst = tmp_path / "prompts.jsonl"
    lst.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "store"
    rc = encode_main([str(lst), "--encoder", folder, "--out", str(out), "--shard-size", "4", "--batch-size", "3",
                      "--device", "cpu", "--dtype", "fp32", "--limit", "6", "--negative-prompt", "a blue sky",
                      "--verify", "--no-progress"])
    assert rc == 0 and "6 prompts" in capsys.readouterr().out
    store = PromptStore(str(out))
    assert store.texts() == PROMPTS[:6] and store.negative_text == "a blue sky"
    torch.testing.assert_close(store.embedding(5).float(), reference(model, tokenizer, PROMPTS[5]),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(store.negative().float(), reference(model, tokenizer, "a blue sky"),
                               rtol=1e-2, atol=1e-2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops}\n')
    assert encode_main([str(bad), "--encoder", folder, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert encode_main([str(lst), "--encoder", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "umT5 weights not found" in capsys.readouterr().err
