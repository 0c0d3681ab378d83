"""Every supported family: quantize with the default xbit method (embedding table and head quantized too) at 8
bits, save, reload with from_pretrained, compare next-token distributions with the float model, generate, and
serve a completion through the OpenAI client."""

import copy
import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xbit
from tests.families import FAMILIES, calibration_texts, family_model
from tests.tiny import tiny_tokenizer
from xbit import checkpoint
from xbit.arch import UnsupportedModel, adapter_for
from xbit.calibrate import EXPERT_PRIOR_TOKENS, pool_experts
from xbit.modules import XbitEmbedding, XbitLinear

KL_BOUND = 5e-3  # measured 1e-4..1.3e-3 at 8 bits; a dropped embed_scale gives about 0.5


def next_token_kl(model, reloaded, ids) -> float:
    """The median over positions of KL(float || reloaded): robust to the few tokens whose near-tied MoE routing
    flips under any perturbation (one such token alone moves Mixtral's mean 10x), while a wrong scale or norm
    moves every token."""
    with torch.no_grad():
        ref = model(ids).logits.float().log_softmax(-1)
        got = reloaded(ids).logits.float().log_softmax(-1)
    return F.kl_div(got, ref, log_target=True, reduction="none").sum(-1).median().item()


def quantize_default_xbit(model, tok, out_dir):
    q, qconfig, report = xbit.quantize(copy.deepcopy(model), tok, method="xbit", bits=8, calib=calibration_texts(),
                                       calib_samples=8, seq_len=64, progress=False)
    checkpoint.save(q, tok, out_dir, qconfig, report)
    return report


def serve_completion(model_dir, prompt: str = "the time of the") -> str:
    """Serve the checkpoint in-process with the real app and uvicorn; complete one prompt with the OpenAI client."""
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    import requests

    from serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(str(model_dir), device="cpu"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
        return out.choices[0].text
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantizes_reloads_and_serves(family, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = family_model(family)
    out = tmp_path / f"{family}-xbit"
    report = quantize_default_xbit(model, tok, out)
    assert 7.5 < report["bits_per_weight_layers"] <= 8.0

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapter = adapter_for(reloaded)
    assert isinstance(reloaded.get_submodule(adapter.embedding), XbitEmbedding)
    float_linears = [n for n, m in reloaded.get_submodule(adapter.blocks).named_modules()
                     if isinstance(m, nn.Linear) and not isinstance(m, XbitLinear)]
    assert float_linears == []  # every block linear is quantized; routers are not nn.Linear in these families
    ids = torch.randint(3, 120, (2, 48), generator=torch.Generator().manual_seed(1))
    assert next_token_kl(model, reloaded, ids) < KL_BOUND

    generated = reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    assert isinstance(serve_completion(out), str)


def test_gemma_embed_scale_is_kept_and_dropping_it_fails_the_bound(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = family_model("gemma3")
    quantize_default_xbit(model, tok, tmp_path / "g3")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g3", dtype=torch.float32).eval()
    emb = reloaded.get_input_embeddings()
    assert emb.embed_scale == pytest.approx(64**0.5)  # Gemma scales lookups by sqrt(hidden)
    ids = torch.randint(3, 120, (2, 48), generator=torch.Generator().manual_seed(2))
    kept = next_token_kl(model, reloaded, ids)
    assert kept < KL_BOUND
    emb.embed_scale = 1.0  # the bug the adapter prevents
    dropped = next_token_kl(model, reloaded, ids)
    assert dropped > 50 * KL_BOUND and dropped > 300 * kept


def test_multimodal_gemma3_keeps_its_vision_tower_in_float(tmp_path):
    from transformers import AutoModelForCausalLM

    model = family_model("gemma3-multimodal")
    quantize_default_xbit(model, tiny_tokenizer(), tmp_path / "mm")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mm", dtype=torch.float32)
    vision = [m for n, m in reloaded.named_modules() if n.startswith("model.vision_tower")]
    assert vision and not any(isinstance(m, XbitLinear) for m in vision)
    before = dict(model.named_parameters())
    for name, p in reloaded.named_parameters():
        if name.startswith("model.vision_tower"):
            torch.testing.assert_close(p, before[name].half().float())  # stored in float16, untouched


def test_expert_without_calibration_tokens_gets_a_sane_quantization(tmp_path):
    """A router that never picks expert 3: its statistics come from its siblings, so its columns keep bits and
    its weights stay close to the float ones (no zeroed columns, no singular GPTQ solve)."""
    from transformers import AutoModelForCausalLM

    model = family_model("mixtral")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.gate.weight[3] = 0.0
            block.mlp.gate.bias = None
            block.mlp.gate.weight[3, :] = -100.0 * block.mlp.gate.weight[:3].abs().sum(0)  # never in the top 2
    quantize_default_xbit(model, tiny_tokenizer(), tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    for i, block in enumerate(reloaded.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q = block.mlp.experts[3].get_submodule(proj)
            assert isinstance(q, XbitLinear) and int(q.bits.min()) >= 2
            eye = torch.eye(q.in_features)
            w_q = q(eye).t()  # the dequantized weight through the module's own kernel
            fused = model.model.layers[i].mlp.experts
            inter = fused.down_proj.shape[2]
            w = {"gate_proj": fused.gate_up_proj[3, :inter], "up_proj": fused.gate_up_proj[3, inter:],
                 "down_proj": fused.down_proj[3]}[proj]
            assert ((w_q - w).norm() / w.norm()).item() < 0.05


def test_pool_experts_shrinks_towards_the_siblings():
    h = {f"m.layers.0.mlp.experts.{e}.down_proj": torch.eye(3) * (e + 1.0) for e in range(3)}
    h["m.layers.0.self_attn.q_proj"] = torch.eye(3) * 7.0
    tokens = {"m.layers.0.mlp.experts.0.down_proj": 0.0, "m.layers.0.mlp.experts.1.down_proj": 100.0,
              "m.layers.0.mlp.experts.2.down_proj": 300.0, "m.layers.0.self_attn.q_proj": 5.0}
    out = pool_experts(h, tokens)
    pooled = (2.0 * 100 + 3.0 * 300) / 400  # token-weighted mean of the experts' E[x x^T] diagonals
    torch.testing.assert_close(out["m.layers.0.mlp.experts.0.down_proj"], torch.eye(3) * pooled)
    n0 = EXPERT_PRIOR_TOKENS
    torch.testing.assert_close(out["m.layers.0.mlp.experts.2.down_proj"],
                               torch.eye(3) * (3.0 * 300 + pooled * n0) / (300 + n0))
    torch.testing.assert_close(out["m.layers.0.self_attn.q_proj"], torch.eye(3) * 7.0)


def test_unknown_architecture_gets_one_clear_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from xbit.quantize import main

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))
    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not supported.*no decoder blocks at "
                                               "model.layers"):
        adapter_for(model)
    model.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "gpt2"), "--method", "rtn", "--code-bits", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_type 'gpt2' is not supported" in err[0]
