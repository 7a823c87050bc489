"""gipo_core.integrations.trl against the real TRL: a tiny causal LM built locally (no download), trained on the
CPU, and one ``_compute_loss`` call compared with TRL's own loss on identical inputs."""

from __future__ import annotations

import inspect
import math
import pathlib

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import gipo_core.torch as gt
from gipo_core.integrations.trl import GIPOTrainer

WORDS = ["<pad>", "<eos>", "a", "b", "c", "d", "e", "f", "g", "h"]
HAS_RATIO_LEVEL = "ratio_level" in inspect.signature(gt.ppo_clip_loss).parameters


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with random weights, saved so that TRL can also build its reference model from it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 4})


def count_a(completions, **kwargs):
    """Rule-based reward: the number of "a" tokens in the completion."""
    return [float(c.split().count("a")) for c in completions]


def make(cls, model_dir, tokenizer, dataset, tmp_path, gipo=None, **config):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=5,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    settings.update(config)
    kwargs = dict(model=model_dir, reward_funcs=count_a, args=GRPOConfig(**settings), train_dataset=dataset)
    if cls is GIPOTrainer:
        kwargs["gipo"] = gipo
    return cls(processing_class=tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------- training
def test_trains_a_tiny_lm_with_gipo(model_dir, tokenizer, dataset, tmp_path):
    trainer = make(
        GIPOTrainer,
        model_dir,
        tokenizer,
        dataset,
        tmp_path,
        gipo=dict(sigma=1.0),
        max_steps=3,
        num_iterations=2,  # the second pass over a batch sees old_per_token_logps != logps
        learning_rate=1e-2,
        logging_steps=1,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    assert all(math.isfinite(h["loss"]) for h in logs)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    for h in logs:
        assert h["gipo/n_valid"] > 0 and 0 < h["gipo/weight_mean"] <= 1
        assert "entropy" in h  # TRL's own metric, kept
        assert not any(k.startswith("clip_ratio/") for k in h)  # TRL's, computed with zero advantages: dropped
    # The second iteration over a generation batch is off-policy: the trust weight is below 1 somewhere.
    assert min(h["gipo/weight_min"] for h in logs) < 1


# ------------------------------------------------------------------------- one loss call against TRL's
def batch(trainer, *, seed=0, empty_row=False, vllm=None, ref=False, num_items_scale=2):
    """Identical inputs for both trainers: off-policy old log-probs so that clipping is active."""
    g = torch.Generator().manual_seed(seed)
    b, p, t = 4, 3, 5
    prompt_ids = torch.randint(2, len(WORDS), (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, 0] = 0
    prompt_ids[1, 0] = 0
    lengths = torch.tensor([5, 3, 0 if empty_row else 1, 4])
    completion_mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    completion_ids = torch.randint(2, len(WORDS), (b, t), generator=g) * completion_mask
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            t,
        )
    noise = (torch.rand(b, t, generator=g) - 0.5) * 0.8
    inputs = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.tensor([1.0, -0.5, 0.7, -1.2]),
        old_per_token_logps=logps + noise,
        num_items_in_batch=completion_mask.sum() * num_items_scale,
    )
    if ref:
        inputs["ref_per_token_logps"] = logps - (torch.rand(b, t, generator=g) - 0.5) * 0.6
    if vllm:
        old = inputs["old_per_token_logps"]
        sampling = old + (torch.rand(b, t, generator=g) - 0.5) * 1.5
        sampling[0, 1] = math.nan  # a token the engine could not score: no correction there
        inputs["sampling_per_token_logps"] = sampling
        # TRL's importance_sampling_ratio, as its vLLM path computes it for the two modes tested
        diff = torch.nan_to_num((old - sampling) * completion_mask, nan=0.0)
        cap = trainer.vllm_importance_sampling_clip_max
        if vllm == "token_truncate":
            inputs["importance_sampling_ratio"] = torch.clamp(torch.exp(diff), max=cap)
        else:  # sequence_mask
            ratio = torch.exp(diff.sum(-1, keepdim=True))
            inputs["importance_sampling_ratio"] = ratio.masked_fill(ratio > cap, 0.0)
            assert 0 < int((ratio > cap).sum()) < b  # the mask drops some sequences, not all
    return inputs


def loss_and_grads(trainer, inputs, *, method):
    trainer.model.zero_grad()
    loss = method(trainer, trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(reference, ours, inputs):
    """TRL's own ``_compute_loss`` and the plug-in's on the same inputs: equal losses and parameter gradients
    (float32 tolerance), and a gradient that is not zero."""
    want, want_grads = loss_and_grads(reference, inputs, method=GRPOTrainer._compute_loss)
    got, got_grads = loss_and_grads(ours, inputs, method=GIPOTrainer._compute_loss)
    torch.testing.assert_close(got, want)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=lambda m: f"{name}: {m}")
    assert any(float(g.abs().max()) > 0 for g in want_grads.values())


# (TRL's config, the plug-in's config where it differs, its `gipo` (an objective name or a dict), batch options)
PPO = "ppo_clip"
CASES = {
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), {}, PPO, {}),
    "bnpo": (dict(loss_type="bnpo"), {}, PPO, {}),
    "grpo-empty-row": (dict(loss_type="grpo"), {}, PPO, dict(empty_row=True)),
    "dr_grpo": (dict(loss_type="dr_grpo"), {}, PPO, {}),
    "dapo-accumulation": (dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4), {}, PPO, {}),
    "grpo-accumulation": (dict(loss_type="grpo", gradient_accumulation_steps=3), {}, PPO, {}),
    "dapo-eval": (dict(loss_type="dapo", gradient_accumulation_steps=2), {}, PPO, dict(eval=True)),
    "dapo-kl": (dict(loss_type="dapo", beta=0.04), {}, PPO, dict(ref=True)),
    "grpo-kl-no-bias-correction": (
        dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
        {},
        PPO,
        dict(ref=True),
    ),
    "dapo-entropy": (dict(loss_type="dapo", entropy_coef=0.01, top_entropy_quantile=0.5), {}, PPO, {}),
    "dapo-opsm": (dict(loss_type="dapo", off_policy_mask_threshold=0.05), {}, PPO, {}),
    "dapo-vllm-token-truncate": (
        dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate"),
        {},
        PPO,
        dict(vllm="token_truncate"),
    ),
    "grpo-vllm-sequence-mask": (
        dict(loss_type="grpo", vllm_importance_sampling_mode="sequence_mask"),
        {},
        PPO,
        dict(vllm="sequence_mask"),
    ),
    "sapo": (dict(loss_type="sapo"), dict(loss_type="grpo"), "sapo", {}),
    "cispo": (
        dict(loss_type="cispo", epsilon_high=1.1),
        dict(loss_type="dapo"),
        dict(objective="cispo", clip_max=1.1),
        {},
    ),
    "gspo": (
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
        {},
        PPO,
        {},
    ),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), {}, PPO, {}),
}
SEQUENCE_LEVEL = {"gspo", "luspo"}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                name in SEQUENCE_LEVEL and not HAS_RATIO_LEVEL,
                reason="gipo-core has no ratio_level yet: GIPOTrainer refuses importance_sampling_level='sequence'",
                raises=NotImplementedError,
                strict=True,
            ),
        )
        for name in CASES
    ],
)
def test_loss_and_gradients_equal_trls_own(case, model_dir, tokenizer, dataset, tmp_path):
    """gipo-core's PPO-clip (SAPO, CISPO) through the plug-in gives TRL's dapo/grpo/... (sapo, cispo) loss and
    gradients on identical inputs, with TRL's KL term, entropy bonus and masks in place."""
    trl_config, own_config, gipo, options = CASES[case]
    gipo = dict(objective=gipo) if isinstance(gipo, str) else gipo
    options = dict(options)
    evaluation = options.pop("eval", False)
    reference = make(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path / "trl", **trl_config)
    ours = make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path / "ours", gipo=gipo, **trl_config | own_config)
    for trainer in (reference, ours):
        trainer.model.train(not evaluation)
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        trainer.use_vllm = "vllm" in options  # the inputs carry what TRL's vLLM path would produce
    inputs = batch(reference, **options)

    assert_same_loss_and_gradients(reference, ours, inputs)

    mode = "eval" if evaluation else "train"
    theirs, mine = reference._metrics[mode], ours._metrics[mode]
    for key in ("entropy", "kl", "policy_loss"):  # TRL's own metrics, the same values
        assert (key in theirs) == (key in mine), key
        if key in theirs:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    assert not any(k.startswith(("clip_ratio/", "cispo_clip_ratio")) for k in mine)
    assert mine["gipo/n_valid"] == [float(inputs["completion_mask"].sum())]


def test_first_step_on_a_generated_batch_equals_trls_dapo(model_dir, tokenizer, dataset, tmp_path):
    """The first training step's batch as TRL generates and scores it (TRL's own dtypes and shapes): PPO-clip
    through the plug-in gives TRL's dapo loss and gradients on it."""
    config = dict(loss_type="dapo", num_iterations=2, gradient_accumulation_steps=2)
    reference = make(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path / "trl", **config)
    ppo = dict(objective="ppo_clip")
    ours = make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path / "ours", gipo=ppo, **config)
    for trainer in (reference, ours):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
    torch.manual_seed(0)
    inputs = reference._prepare_inputs(next(iter(reference.get_train_dataloader())))
    assert "old_per_token_logps" in inputs and inputs["completion_mask"].sum() > 0
    assert inputs["advantages"].abs().sum() > 0  # the rewards differ within a group: a non-trivial step
    assert_same_loss_and_gradients(reference, ours, inputs)


# ----------------------------------------------------------------- every objective and its options
@pytest.mark.parametrize(
    "gipo",
    [
        dict(sigma=0.5, sigma_neg=0.25),
        dict(objective="gipo", kernel="laplace", with_metrics=False),
        dict(objective="no_clip"),
        dict(objective="ppo_clip", clip_low=0.1, clip_high=0.15, dual_clip=2.0),
        dict(objective="sapo", tau_pos=2.0, tau_neg=3.0),
        dict(objective="cispo", clip_max=1.2),
    ],
)
def test_objectives_reach_gipo_core_with_trls_normalisation(gipo, model_dir, tokenizer, dataset, tmp_path):
    trainer = make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path, gipo=gipo, loss_type="dapo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = batch(trainer)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        inputs["completion_ids"].size(1),
    )
    options = {k: v for k, v in gipo.items() if k != "objective"}
    fn = getattr(gt, f"{gipo.get('objective', 'gipo')}_loss")
    direct = fn(
        logps,
        inputs["old_per_token_logps"],
        inputs["advantages"][:, None],
        inputs["completion_mask"].bool(),
        agg="token-mean",
        denominator=inputs["num_items_in_batch"].float(),  # dapo, one process, no accumulation
        **options,
    )
    got = trainer._compute_loss(trainer.model, inputs)
    torch.testing.assert_close(got, direct.loss)
    logged = [k for k in trainer._metrics["train"] if k.startswith("gipo/")]
    assert bool(logged) == gipo.get("with_metrics", True)


def test_ppo_clip_takes_trls_epsilons(model_dir, tokenizer, dataset, tmp_path):
    fixtures = (model_dir, tokenizer, dataset, tmp_path)
    trainer = make(GIPOTrainer, *fixtures, gipo=dict(objective="ppo_clip"), epsilon=0.1, epsilon_high=0.3)
    assert trainer._gipo_options == {"clip_low": 0.1, "clip_high": 0.3}
    trainer = make(GIPOTrainer, *fixtures, gipo=dict(objective="ppo_clip", clip_high=0.5), epsilon=0.1)
    assert trainer._gipo_options == {"clip_low": 0.1, "clip_high": 0.5}


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "gipo, config, error, match",
    [
        ("gipo", {}, TypeError, "`gipo` must be a dict"),
        (dict(objective="ppo"), {}, ValueError, "must be one of 'gipo', 'ppo_clip'"),
        (dict(sigmaa=1.0), {}, TypeError, "unknown key.*'sigmaa'.*valid: 'objective', 'sigma'"),
        (dict(clip_max=2.0), {}, TypeError, "'clip_max' in `gipo` for objective 'gipo'"),
        (dict(agg="token-mean"), {}, ValueError, r"`gipo\['agg'\]` is set from GRPOConfig\(loss_type"),
        (dict(denominator=3.0), {}, ValueError, r"`gipo\['denominator'\]`"),
        (dict(sigma=-1.0), {}, ValueError, "`GIPOTrainer`: `gipo`: .*sigma"),
        ({}, dict(loss_type="vespo"), ValueError, "loss_type` sets the normalisation.*'vespo'"),
        ({}, dict(delta=4.0), ValueError, "`GRPOConfig.delta`"),
    ],
)
def test_bad_configuration_is_named(gipo, config, error, match, model_dir, tokenizer, dataset, tmp_path):
    with pytest.raises(error, match=match):
        make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path, gipo=gipo, **config)


def test_extreme_log_ratios_stay_finite(model_dir, tokenizer, dataset, tmp_path):
    """Stale samples with log-ratio 100 (exp overflows float32): TRL's own dapo loss is inf there; GIPO's loss
    and gradients through the plug-in stay finite, and TRL's inert policy term adds no NaN."""
    trainer = make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path, gipo=dict(sigma=1.0), loss_type="dapo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = batch(trainer)
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] - 100.0 * torch.tensor([0.0, 1.0, 0.0, 1.0])[:, None]
    loss, grads = loss_and_grads(trainer, inputs, method=GIPOTrainer._compute_loss)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert trainer._metrics["train"]["gipo/log_ratio_abs_max"][-1] > 99


def test_rollout_options_need_vllm_importance_sampling(model_dir, tokenizer, dataset, tmp_path):
    """Without vLLM, TRL has no sampling log-probs: a rollout correction in `gipo` is refused, not ignored."""
    has_rollout = "rollout_is" in inspect.signature(gt.gipo_loss).parameters
    error, match = (ValueError, "needs `GRPOConfig\\(use_vllm=True") if has_rollout else (TypeError, "'rollout_is'")
    with pytest.raises(error, match=match):
        make(GIPOTrainer, model_dir, tokenizer, dataset, tmp_path, gipo=dict(rollout_is="token-truncate"))


def test_the_readme_example_trains():
    """The README's TRL example, as written: it trains and logs gipo-core's diagnostics."""
    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    section = readme.read_text().split("\n## TRL\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (TRL)", "exec"), namespace)
    logs = [h for h in namespace["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["gipo/n_valid"] > 0 for h in logs)
