"""Single-process checks of the Qwen model pieces; writes measured values to a JSON file for pytest.

Usage: python model_checks.py OUT.json   (no launcher: exercises the single-process start-up)
"""
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F


def parameter_counts():
    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.presets import PRESETS

    counts = {}
    for name, cfg in PRESETS.items():
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(cfg, perform_initialization=False)
        total = sum(p.numel() for p in model.parameters())
        embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embedding.", "output_layer.")))
        # routed experts: a token activates moe_router_topk of num_experts (all of them in a dense model)
        experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        skipped = experts - experts * (cfg.moe_router_topk or 1) // (cfg.num_experts or 1)
        counts[name] = {"total": total, "non_embedding": total - embedding, "activated": total - skipped}
    return counts


def checkpoint_keys(cfg):
    from megatron_qwen.models.build import build_model

    return sorted({entry.key for entry in build_model(cfg).sharded_state_dict().values()})


def attention_modules(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_qwen.models.local_modules import SDPAttention

    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**kwargs), DotProductAttention(**kwargs)


def sdpa_vs_megatron(config):
    """Same q/k/v (GQA: fewer key/value heads) through both core attentions, causal mask."""
    ours, megatrons = attention_modules(config)
    s, b, d = 24, 3, config.kv_channels
    query = torch.randn(s, b, config.num_attention_heads, d)
    key = torch.randn(s, b, config.num_query_groups, d)
    value = torch.randn(s, b, config.num_query_groups, d)
    expected = megatrons(query, key, value, None)
    got = ours(query, key, value, None)
    return {"shape_equal": list(got.shape) == list(expected.shape), "max_diff": (got - expected).abs().max().item()}


def packed_attention(config):
    """Three documents packed in THD layout against megatron's attention over each document alone;
    then the same documents with padding between them (``cu_seqlens_q_padded``)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    ours, megatrons = attention_modules(config)
    lengths, cu = [5, 9, 4], torch.tensor([0, 5, 14, 18], dtype=torch.int32)
    heads, groups, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    docs = [(torch.randn(n, heads, d), torch.randn(n, groups, d), torch.randn(n, groups, d)) for n in lengths]
    alone = torch.cat([megatrons(q[:, None], k[:, None], v[:, None], None)[:, 0] for q, k, v in docs])
    packed_q, packed_k, packed_v = (torch.cat([doc[i] for doc in docs]) for i in range(3))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    packed = ours(packed_q, packed_k, packed_v, None, packed_seq_params=params)

    padded_cu = torch.tensor([0, 8, 20, 24], dtype=torch.int32)  # each document followed by padding
    gap_rows = [3, 3, 2]
    with_gaps = [
        torch.cat([part for doc, gap in zip(docs, gap_rows) for part in (doc[i], torch.randn(gap, *doc[i].shape[1:]))])
        for i in range(3)
    ]
    padded_params = dataclasses.replace(params, cu_seqlens_q_padded=padded_cu, cu_seqlens_kv_padded=padded_cu)
    padded = ours(*with_gaps, None, packed_seq_params=padded_params)
    real_rows = torch.cat([torch.arange(start, start + n) for start, n in zip([0, 8, 20], lengths)])
    return {
        "max_diff": (packed - alone).abs().max().item(),
        "padded_max_diff": (padded[real_rows] - alone).abs().max().item(),
    }


def packed_model(model):
    """Whole-model logits: three documents packed (RoPE restarts per document) against each alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_qwen.models.build import gather_logits
    from megatron_qwen.models.presets import PRESETS

    lengths = [6, 10, 3]
    docs = [torch.randint(0, 1000, (1, n)) for n in lengths]
    alone = torch.cat([model(doc, torch.arange(doc.shape[1])[None], None) for doc in docs], dim=1)
    cu = torch.tensor([0, 6, 16, 19], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=10, max_seqlen_kv=10)
    packed = model(torch.cat(docs, dim=1), None, None, packed_seq_params=params)
    alone, packed = (gather_logits(t, PRESETS["tiny"]) for t in (alone, packed))
    return {"max_diff": (packed - alone).abs().max().item(), "logit_scale": alone.abs().max().item()}


def packed_kernel_calls(model):
    """Every attention call of one forward over a row packing three documents, and the SDPA backend torch picks
    for each call's own arguments (the CPU picks a fused kernel only without dropout, as here)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from torch.nn.attention import varlen

    calls = []

    def recorded(function, kind):
        def call(*args, **kwargs):
            if kind == "sdpa":
                choice_args = {key: value for key, value in kwargs.items() if key != "attn_mask"}
                backend = torch._fused_sdp_choice(*args, attn_mask=kwargs.get("attn_mask"), **choice_args)
                calls.append({"kind": kind, "backend": int(backend), "dims": args[0].dim()})
            else:
                calls.append({"kind": kind})
            return function(*args, **kwargs)
        return call

    entry_points = [(F, "scaled_dot_product_attention", "sdpa"), (varlen, "varlen_attn", "varlen")]
    originals = [getattr(module, name) for module, name, _ in entry_points]
    for (module, name, kind), original in zip(entry_points, originals):
        setattr(module, name, recorded(original, kind))
    try:
        cu = torch.tensor([0, 6, 16, 19], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=10, max_seqlen_kv=10)
        model(torch.randint(0, 1000, (1, 19)), None, None, packed_seq_params=params)
    finally:
        for (module, name, _), original in zip(entry_points, originals):
            setattr(module, name, original)
    return {"documents": len(cu) - 1, "calls": calls}


def dropout_behaviour(config):
    """Attention dropout acts in training mode only, and repeats under the same RNG seed."""
    from megatron.core import tensor_parallel

    ours, _ = attention_modules(dataclasses.replace(config, attention_dropout=0.5))
    no_dropout, _ = attention_modules(config)
    q = torch.randn(8, 2, config.num_attention_heads, config.kv_channels)
    k = v = torch.randn(8, 2, config.num_query_groups, config.kv_channels)
    reference = no_dropout(q, k, v, None)
    ours.eval()
    eval_diff = (ours(q, k, v, None) - reference).abs().max().item()
    ours.train()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    first = ours(q, k, v, None)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    second = ours(q, k, v, None)
    return {
        "eval_equals_no_dropout": eval_diff,
        "train_differs": (first - reference).abs().max().item(),
        "train_repeats": (first - second).abs().max().item(),
    }


def recompute_gradients(cfg):
    """With dropout on, activation recomputation must replay the same dropout masks (the RNG
    tracker restores its states), so gradients equal those of a run without recomputation."""
    from megatron.core import tensor_parallel

    from megatron_qwen.models.build import build_model

    tokens = torch.randint(0, 1000, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    settings = {
        "none": {},
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        "selective": dict(recompute_granularity="selective"),
    }
    gradients = {}
    for name, recompute in settings.items():
        torch.manual_seed(5)
        tensor_parallel.model_parallel_cuda_manual_seed(5)
        model = build_model(cfg, attention_dropout=0.2, hidden_dropout=0.2, **recompute)
        with torch.enable_grad():
            model(tokens, positions, None, labels=tokens).mean().backward()
        gradients[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {
        name: (gradients[name] - gradients["none"]).abs().max().item() for name in ("full", "selective")
    } | {"gradient_scale": gradients["none"].abs().max().item()}


def fused_kernels(cfg):
    """The trainer's GPU fusions (megatron's compiled SwiGLU and bias-dropout-add, and RoPE, compiled by
    ``models/rope.py`` here, as there is no Transformer Engine) against the unfused modules: same weights, no
    dropout, padded rows and a packed row of three documents, so loss and gradients must agree to rounding."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.packed_seq_params import PackedSeqParams
    from torch._dynamo.utils import counters

    from megatron_qwen.models import rope
    from megatron_qwen.models.build import build_model
    from megatron_qwen.models.fusions import FUSED_KERNELS

    rope_calls = {"bshd": 0, "thd": 0}

    def counted(kind, function):
        def call(*args, **kwargs):
            rope_calls[kind] += 1
            return function(*args, **kwargs)
        return call

    # filled before the build, so provide_fused_rope() keeps these counting wrappers of its own functions
    rope_utils.fused_apply_rotary_pos_emb = counted("bshd", rope.fused_rope_bshd)
    rope_utils.fused_apply_rotary_pos_emb_thd = counted("thd", rope.fused_rope_thd)

    tokens = torch.randint(0, 1000, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    results = {}
    for name, fusions in (("unfused", {}), ("fused", FUSED_KERNELS)):
        torch.manual_seed(5)
        model = build_model(cfg, **fusions)
        with torch.enable_grad():
            loss = model(tokens, positions, None, labels=tokens).mean()
            loss = loss + model(tokens[:1], None, None, labels=tokens[:1], packed_seq_params=packed).mean()
            loss.backward()
        results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (unfused_loss, unfused_grads), (fused_loss, fused_grads) = results["unfused"], results["fused"]
    return {
        "loss_diff": abs(fused_loss - unfused_loss),
        "grad_max_diff": (fused_grads - unfused_grads).abs().max().item(),
        "gradient_scale": unfused_grads.abs().max().item(),
        "compiled_graphs": counters["stats"]["unique_graphs"],  # the fused functions did run, compiled
        "rope_calls": rope_calls,
    }


def padded_vocab(cfg):
    """A vocabulary of 1000 rows is padded to 1024; the loss equals cross entropy over the 1000 rows."""
    from megatron_qwen.models.build import build_model, gather_logits, padded_vocab_size

    small = dataclasses.replace(cfg, vocab_size=1000)
    model = build_model(small)
    tokens = torch.randint(0, 1000, (2, 12))
    labels = torch.randint(0, 1000, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    raw = model(tokens, positions, None)
    loss = model(tokens, positions, None, labels=labels)
    logits = gather_logits(raw, small)
    expected = F.cross_entropy(logits.reshape(-1, 1000), labels.reshape(-1), reduction="none").view(2, 12)
    return {
        "rows": padded_vocab_size(small, 1),
        "padded_logits_all_neg_inf": bool(torch.isneginf(raw[..., 1000:]).all()),
        "loss_max_diff": (loss - expected).abs().max().item(),
    }


def main(out_path):
    from megatron_qwen.models.build import build_model, transformer_config
    from megatron_qwen.models.presets import PRESETS
    from megatron_qwen.platform import distributed

    distributed.initialize(seed=1234)
    tiny = PRESETS["tiny"]
    config = transformer_config(tiny)
    model = build_model(tiny)
    model.eval()
    with torch.no_grad():
        results = {
            "parameter_counts": parameter_counts(),
            "checkpoint_keys": checkpoint_keys(tiny),
            "qwen3_checkpoint_keys": checkpoint_keys(
                dataclasses.replace(tiny, generation="qwen3", head_dim=32, qkv_bias=False, qk_norm=True)),
            "sdpa_vs_megatron": sdpa_vs_megatron(config),
            "packed_attention": packed_attention(config),
            "packed_model": packed_model(model),
            "packed_kernel_calls": packed_kernel_calls(model),
            "dropout": dropout_behaviour(config),
            "padded_vocab": padded_vocab(tiny),
            "recompute": recompute_gradients(tiny),
            "fused_kernels": fused_kernels(tiny),
        }
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
