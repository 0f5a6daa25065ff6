"""The critic shares the frozen weights of the model it starts from: a reward model (its values
start at the RM's score) or the policy's base (values start at 0)."""

from __future__ import annotations

import peft
import pytest
import torch

from alignment.rl.checkpoint import load_trainable_state, trainable_state
from alignment.rl.critic import critic_from_causal_lm, critic_from_reward_model, shared_copy, tie_identical_weights


@pytest.fixture
def tiny_rm(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from foundation.models import resolve

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(resolve(tiny_model).path, num_labels=1).eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm


def lora() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


IDS = torch.tensor([[10, 20, 30, 40, 50], [0, 0, 60, 70, 80]])  # second row left-padded (pad id 0)
MASK = (IDS != 0).long()
POS = (MASK.cumsum(-1) - 1).clamp(min=0)


def test_shared_copy_shares_parameters_not_modules(tiny_rm):
    copy_ = shared_copy(tiny_rm.model)
    assert copy_ is not tiny_rm.model and copy_.layers[0] is not tiny_rm.model.layers[0]
    assert copy_.layers[0].self_attn.q_proj.weight is tiny_rm.model.layers[0].self_attn.q_proj.weight
    assert {id(p) for p in copy_.parameters()} == {id(p) for p in tiny_rm.model.parameters()}


def test_critic_from_reward_model_starts_at_the_rm_score_and_shares_its_weights(tiny_rm):
    critic = critic_from_reward_model(tiny_rm, lora=lora())
    with torch.no_grad():
        rm_scores = tiny_rm(input_ids=IDS, attention_mask=MASK).logits[:, 0]
        values = critic(IDS, MASK, POS)
    assert values.shape == (2, 5)
    assert torch.allclose(values[:, -1], rm_scores, atol=1e-5)  # V(whole sequence) = RM score
    # the frozen weights are the RM's own tensors: the critic adds only LoRA + a head
    base_layer = critic.backbone.layers[0].self_attn.q_proj.base_layer
    assert base_layer.weight is tiny_rm.model.layers[0].self_attn.q_proj.weight
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert not any(p.requires_grad for p in tiny_rm.parameters())
    assert type(tiny_rm.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # no adapter leaked into the RM

    # training the critic leaves the reward model's scores untouched
    opt = torch.optim.SGD([p for p in critic.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = ((critic(IDS, MASK, POS) - 3.0) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert torch.equal(tiny_rm(input_ids=IDS, attention_mask=MASK).logits[:, 0], rm_scores)
        assert not torch.allclose(critic(IDS, MASK, POS)[:, -1], rm_scores, atol=1e-3)


def test_full_critic_gets_its_own_weights(tiny_rm):
    critic = critic_from_reward_model(tiny_rm, lora=None)
    assert critic.backbone.layers[0].self_attn.q_proj.weight is not tiny_rm.model.layers[0].self_attn.q_proj.weight
    assert all(p.requires_grad for p in critic.parameters())


def test_critic_from_policy_base_starts_at_zero(tiny_model):
    from foundation.models import load_causal_lm

    base = load_causal_lm(tiny_model, device="cpu")
    critic = critic_from_causal_lm(base, lora=lora())
    with torch.no_grad():
        assert torch.equal(critic(IDS, MASK, POS), torch.zeros(2, 5))
    assert critic.backbone.embed_tokens.weight is base.model.embed_tokens.weight


def test_trainable_state_round_trip(tiny_rm):
    a = critic_from_reward_model(tiny_rm, lora=lora())
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    state = trainable_state(a)
    b = critic_from_reward_model(tiny_rm, lora=lora())
    load_trainable_state(b, state)
    with torch.no_grad():
        assert torch.equal(a(IDS, MASK, POS), b(IDS, MASK, POS))
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(b, {k: v for k, v in list(state.items())[1:]})


def test_tie_identical_weights_keeps_one_copy_of_equal_frozen_tensors(tiny_model, tiny_rm):
    """An RM over the same base (here: a fresh head on tiny-llama, one layer changed) shares every
    tensor that is still equal to the base's; changed ones keep their own copy; scores do not move."""
    from foundation.models import load_causal_lm

    base = load_causal_lm(tiny_model, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        tiny_rm.model.layers[1].mlp.up_proj.weight.add_(0.1)  # as if LoRA-merged there
        before = tiny_rm(input_ids=IDS, attention_mask=MASK).logits
    freed = tie_identical_weights(tiny_rm.base_model, base.base_model)
    assert tiny_rm.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert tiny_rm.model.layers[0].mlp.up_proj.weight is base.model.layers[0].mlp.up_proj.weight
    assert tiny_rm.model.layers[1].mlp.up_proj.weight is not base.model.layers[1].mlp.up_proj.weight
    changed = tiny_rm.model.layers[1].mlp.up_proj.weight
    total = sum(p.numel() * 4 for p in base.base_model.parameters())
    assert freed == total - changed.numel() * 4
    with torch.no_grad():
        assert torch.equal(tiny_rm(input_ids=IDS, attention_mask=MASK).logits, before)


@pytest.mark.parametrize("on", ["critic", "policy"])
def test_adapter_layers_put_lora_only_in_the_chosen_layers(tiny_rm, tiny_model, on):
    """adapter.layers on a bare backbone (the critic: modules named "layers.0....") and on a causal LM."""
    from foundation.adapters import AdapterConfig, peft_config
    from foundation.models import load_causal_lm

    cfg = peft_config(AdapterConfig(method="lora", r=4, alpha=8, layers=[1]))
    if on == "critic":
        model = critic_from_reward_model(tiny_rm, lora=cfg)
    else:
        model = peft.get_peft_model(load_causal_lm(tiny_model, device="cpu"), cfg)
    adapted = sorted({n.split(".layers.")[-1].split(".")[0] if ".layers." in n else n.split("layers.")[1].split(".")[0]
                      for n, _ in model.named_parameters() if "lora_A" in n})
    assert adapted == ["1"]


def test_a_bf16_critic_trains_fp32_adapters_and_deepspeed_gets_one_dtype(tiny_model):
    """Over a bf16 backbone the critic's LoRA weights are fp32, like the policy's (peft's autocast), so policy and
    critic give a ZeRO optimiser one dtype; with full fine-tuning the fp32 value head joins the bf16 majority."""
    from foundation.models import load_causal_lm
    from alignment.rl.actor_critic import one_trainable_dtype

    base = load_causal_lm(tiny_model, device="cpu", dtype="bfloat16")
    critic = critic_from_causal_lm(base, lora=lora(), share=False)
    trainable = {n: p.dtype for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}  # adapters and head
    assert all(p.dtype == torch.bfloat16 for n, p in critic.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        assert critic(IDS, MASK, POS).dtype == torch.float32
    assert one_trainable_dtype(critic) == torch.float32  # nothing to cast

    full = critic_from_causal_lm(base, lora=None, share=False)
    assert {p.dtype for p in full.parameters() if p.requires_grad} == {torch.bfloat16, torch.float32}
    assert one_trainable_dtype(full) == torch.bfloat16
    assert {p.dtype for p in full.parameters() if p.requires_grad} == {torch.bfloat16}
    assert full.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(full(IDS, MASK, POS), torch.zeros(2, 5))  # the zero head stays zero in bf16
