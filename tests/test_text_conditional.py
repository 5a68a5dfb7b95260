"""examples/text_conditional.py: a text-conditional ``UNet2DConditionModel`` on prompt embeddings.

The condition-shape rules on a real diffusers model (the null embedding ``[L, E]`` with ``L``
equal to the number of probes, which used to be read as a batch), a bounded ``max_batch``, and
the example's claim: after a short training the prompt whose image is duplicated has the
largest mean Hessian-weighted score difference (measured through ``conditional_metrics``).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from memwatch.conditional import conditional_metrics, parse_conditions

pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_conditional.py"
# the slow test's setting: 4 prompts, digit 3's prompt = one image × 30 (5 % of the data), 700 steps
# (300 steps flagged the duplicated prompt on 1 of 4 seeds; 700 on 3 of 3, 1.21-1.63x the next prompt;
# 1500 on 3 of 3, 1.4-3.6x)
NUM_PROMPTS, DUP_DIGIT, COPIES, STEPS, PROBES, MARGIN = 4, 3, 30, 700, 16, 1.2


def _load_example():
    spec = importlib.util.spec_from_file_location("memwatch_example_text_conditional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is faster than two
    yield _load_example()
    torch.set_num_threads(threads)


def test_one_prompt_embedding_with_as_many_tokens_as_probes_is_one_condition(example):
    """L = 4 tokens and 4 probes: ``[4, 16]`` is one prompt for all probes, ``[4, 4, 16]`` one per probe."""
    torch.manual_seed(0)
    prompts = example.prompt_embeddings(2)
    module = example.TextDiffusion(torch.stack(list(prompts.values()))).eval()
    score = module.memwatch_score()
    assert score.cond_shape == (example.TOKENS, example.WIDTH)
    x = torch.randn(example.TOKENS, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    emb = prompts[example.prompt_name(1)]
    with torch.no_grad():
        assert score.unconditional(x, 500).shape == x.shape
        torch.testing.assert_close(score.conditional(x, 500, emb), score.conditional(x, 500, emb.expand(4, 4, 16)))
    with pytest.raises(ValueError, match=r"`cond` must be one condition of shape \(4, 16\) .* got shape \(4, 8\)"):
        score.conditional(x, 500, emb[:, :8])
    named = parse_conditions(prompts, null_cond_shape=score.cond_shape)
    assert list(named) == ["a photo of digit 0", "a photo of digit 1"]


def test_conditional_metrics_on_the_unet_with_a_bound_on_rows(example):
    torch.manual_seed(0)
    prompts = example.prompt_embeddings(2)
    module = example.TextDiffusion(torch.stack(list(prompts.values()))).eval()
    seen = []
    unet_forward = module.unet.forward

    def counting(x, *args, **kwargs):
        seen.append(x.shape[0])
        return unet_forward(x, *args, **kwargs)

    module.unet.forward = counting
    score = module.memwatch_score()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    kwargs = dict(steps=2, first_steps=2, jvp_mode="reverse")
    bounded = conditional_metrics(score, prompts[example.prompt_name(0)], noise=noise, max_batch=2, **kwargs)
    assert max(seen) == 2
    seen.clear()
    whole = conditional_metrics(score, prompts[example.prompt_name(0)], noise=noise, **kwargs)
    assert max(seen) == 2 * 3  # the products on all m·n rows at once
    torch.testing.assert_close(bounded.hessian_score_diff_norm, whole.hessian_score_diff_norm, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(bounded.score_diff_norm, whole.score_diff_norm, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_the_duplicated_prompt_has_the_largest_hessian_weighted_score_difference(example):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is faster than two
    try:
        started = time.perf_counter()
        prompts = example.prompt_embeddings(NUM_PROMPTS, seed=0)
        images, ids = example.duplicated_prompt_digits(NUM_PROMPTS, DUP_DIGIT, COPIES)
        module = example.train(images, ids, torch.stack(list(prompts.values())), STEPS, seed=0)
        trained = time.perf_counter() - started
        result, names = example.measure(module, prompts, n=PROBES, steps=10, sigma=None, seed=0)
        print(
            f"text-conditional: trained in {trained:.1f} s, measured in {time.perf_counter() - started - trained:.1f} s"
        )
    finally:
        torch.set_num_threads(threads)
    summary = example.per_prompt(result, names)
    dup = example.prompt_name(DUP_DIGIT)
    assert example.most_memorized(summary) == dup, summary
    others = max(v["hessian_score_diff"] for name, v in summary.items() if name != dup)
    assert summary[dup]["hessian_score_diff"] > MARGIN * others, summary
    assert result.finite.all()
