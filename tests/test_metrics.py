"""The scans' metrics (``cdist.discovery.metrics``): the logit difference and its normalised form in
every scan, each batched scan held to its slow twin, and the twins to a plain loop written here
from TransformerLens hooks alone."""

from __future__ import annotations

import pytest
import torch
from test_patching import close

from cdist import tasks
from cdist.discovery import (
    ablation,
    activation_patching,
    attribution_patching,
    metrics,
    path_patching,
)
from cdist.errors import ConfigError, InputError
from cdist.evaluate import answer_stats
from cdist.models import hook_z
from cdist.types import Head

LOGIT_METRICS = ("logit_diff", "logit_diff_normalised")


@pytest.fixture(scope="module")
def items(tok, model3):
    data = tasks.entity_tracking(3, tokenizer=tok, n_boxes=3, template="compact", seed=4)
    # a rival per item: the token the corrupt prompt raises most, so that the clean-minus-corrupt
    # gap the normalised form divides by is positive on a random model
    rival = []
    for item in data:
        clean, corrupt = (model3(torch.tensor([item[c]]))[0, item["pos_last"]]
                          for c in ("input_ids", "corrupt_input_ids"))
        rise = corrupt - clean
        rise[item["answer_id"]] = -torch.inf
        rival.append(int(rise.argmax()))
    return data.remove_columns(metrics.CONTRAST).add_column(metrics.CONTRAST, rival)


def _ld(logits, item):
    last = logits[0, item["pos_last"]].float()
    return (last[item["answer_id"]] - last[item[metrics.CONTRAST]]).item()


def test_measure_reads_the_probability_or_the_logit_difference():
    logits = torch.tensor([[[0.0, 1.0, 3.0]], [[2.0, 0.5, 0.0]]])
    target = metrics.Target(torch.tensor([2, 1]), torch.tensor([1, 0]))
    prob, correct = metrics.measure(logits, target, "prob", torch.tensor([0, 0]))
    assert torch.equal(prob, answer_stats(logits, target.answer, torch.tensor([0, 0]))[0])
    ld, same = metrics.measure(logits, target, "logit_diff", torch.tensor([0, 0]))
    assert ld.tolist() == [2.0, -1.5] and torch.equal(same, correct)
    assert correct.tolist() == [1.0, 0.0]


def test_a_logit_difference_without_a_rival_or_an_unknown_metric_is_refused(model3, items):
    with pytest.raises(InputError, match="contrast_id"):
        activation_patching.activation_patching_scan(
            model3, items.remove_columns(metrics.CONTRAST), metric="logit_diff")
    with pytest.raises(ConfigError, match="choose from prob, logit_diff"):
        activation_patching.activation_patching_scan(model3, items, metric="kl")


def test_the_normalised_form_refuses_prompts_that_do_not_move_the_answer(model3, items):
    same = items.remove_columns("corrupt_input_ids").add_column("corrupt_input_ids",
                                                                items["input_ids"])
    with pytest.raises(InputError, match="corrupt prompts do not lower the logit difference"):
        path_patching.path_patching_scan(model3, same, metric="logit_diff_normalised")


@pytest.mark.parametrize("metric", LOGIT_METRICS)
def test_activation_patching_by_logit_difference_is_a_plain_loop(model3, items, metric):
    """Each head's mean change of the logit difference when its ``z`` comes from the corrupt run,
    over the mean clean-minus-corrupt gap when normalised, by hand."""
    fast = activation_patching.activation_patching_scan(model3, items, batch_size=2,
                                                        heads_per_pass=3, metric=metric)
    slow = activation_patching.activation_patching_scan_reference(model3, items, metric=metric)
    name = metrics.score_name(metric, "change")
    assert fast.metric == name == slow.metric
    close(fast[name], slow[name])
    close(fast[f"{name}_se"], slow[f"{name}_se"])
    n_layers, n_heads = model3.cfg.n_layers, model3.cfg.n_heads
    change = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    gap = 0.0
    for item in items:
        ids = torch.tensor([item["input_ids"]])
        corrupt_logits, corrupt = model3.run_with_cache(torch.tensor([item["corrupt_input_ids"]]))
        clean = _ld(model3(ids), item)
        gap += clean - _ld(corrupt_logits, item)
        for layer in range(n_layers):
            for head in range(n_heads):
                def patch(z, hook, head=head, corrupt=corrupt):
                    z = z.clone()
                    z[0, :, head] = corrupt[hook.name][0, :, head]
                    return z
                logits = model3.run_with_hooks(ids, fwd_hooks=[(hook_z(layer), patch)])
                change[layer, head] += _ld(logits, item) - clean
    expected = change / len(items)
    if metric == "logit_diff_normalised":
        expected = expected / (gap / len(items))
        close(fast["logit_diff_normalised"], (1 + expected).float())
    close(fast[name], expected.float())
    assert fast[name].abs().max() > 1e-2  # the scan measured something


@pytest.mark.parametrize("receivers, receiver_input, position, metric", [
    ((), "q", "pos_last", "logit_diff"),
    ((Head(2, 1), Head(1, 3)), "q", "pos_last", "logit_diff_normalised"),
    ((Head(2, 2),), "v", "pos_prev_label", "logit_diff"),
])
def test_path_patching_and_its_attribution_by_logit_difference_match_their_twins(
        model3, items, metric, receivers, receiver_input, position):
    kw = dict(receivers=receivers, receiver_input=receiver_input, position=position,
              metric=metric)
    name = metrics.score_name(metric, "change")
    fast = path_patching.path_patching_scan(model3, items, batch_size=2, senders_per_pass=3, **kw)
    slow = path_patching.path_patching_scan_reference(model3, items, **kw)
    close(fast[name], slow[name])
    close(fast["logit_diff_change"], slow["logit_diff_change"])
    assert fast[name].abs().max() > 1e-3
    estimate = attribution_patching.path_attribution_scan(model3, items, batch_size=2, **kw)
    close(estimate[name], attribution_patching.path_attribution_scan_reference(
        model3, items, **kw)[name], tol=1e-4)


def test_attribution_patching_by_logit_difference_matches_its_twin(model3, items):
    metric = "logit_diff_normalised"
    name = metrics.score_name(metric, "change")
    fast = attribution_patching.attribution_patching_scan(model3, items, batch_size=2,
                                                          metric=metric)
    slow = attribution_patching.attribution_patching_scan_reference(model3, items, metric=metric)
    close(fast[name], slow[name], tol=1e-4)


@pytest.mark.parametrize("metric", LOGIT_METRICS)
def test_mean_ablation_by_logit_difference_is_a_plain_loop(model3, items, tok, metric):
    means = ablation.head_means(model3, tasks.entity_tracking(
        8, tokenizer=tok, n_boxes=3, template="compact", seed=9))
    fast = ablation.head_ablation_scan(model3, items, means=means, batch_size=2, heads_per_pass=3,
                                       metric=metric)
    slow = ablation.head_ablation_scan_reference(model3, items, means=means, metric=metric)
    name = metrics.score_name(metric, "drop")
    assert fast.metric == name and fast.higher_is_important
    close(fast[name], slow[name])
    close(fast["accuracy_drop"], slow["accuracy_drop"])
    # by hand: the clean logit difference minus the ablated one, per head
    layer, head = 1, 2
    drop = gap = 0.0
    for item in items:
        ids = torch.tensor([item["input_ids"]])
        clean = _ld(model3(ids), item)

        def mean_ablate(z, hook):
            z = z.clone()
            z[0, :, head] = means[layer, : z.shape[1], head]
            return z
        drop += clean - _ld(model3.run_with_hooks(ids, fwd_hooks=[(hook_z(layer), mean_ablate)]),
                            item)
        gap += clean - _ld(model3(torch.tensor([item["corrupt_input_ids"]])), item)
    expected = drop / len(items) / (gap / len(items) if metric == "logit_diff_normalised" else 1)
    assert fast[name][layer, head].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
