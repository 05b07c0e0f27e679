"""Fine-tuning's held-out set does not depend on the parallel layout: every layout evaluates the same examples
(``data.val_batches`` counts training global batches of examples) in full micro-batches padded with rows that
take no loss, as many on every rank (as pretraining's ``ValidationSet``)."""

from __future__ import annotations

import pytest
import torch

from llamalab.finetune.data import IGNORE_INDEX, Example, InstructionValidation

SEQ_LEN, PAD, GLOBAL_ROWS = 12, 0, 8  # GLOBAL_ROWS: the training global batch (global_tokens / seq_len)
# (world_size, micro-batch) of one data-parallel group each
LAYOUTS = [(1, 1), (1, 3), (1, 8), (2, 1), (2, 2), (2, 3), (2, 4), (4, 1), (4, 2), (4, 3)]


def examples(n: int) -> list[Example]:
    """``n`` distinct examples of 3 to 12 targets, the first token's target ignored (a prompt)."""
    out = []
    for i in range(n):
        ids = [1] + [10 + i] + [100 + (i * 7 + k) % 400 for k in range(1 + i % 11)]
        out.append(Example(ids, [False, False] + [True] * (len(ids) - 2)))
    return out


def rank_rows(held, val_batches, world_size, micro, rank):
    """(real rows as (inputs, targets) tuples, number of batches, batch shapes) that ``rank`` evaluates."""
    val = InstructionValidation(held, batch_size=micro, seq_len=SEQ_LEN, pad_id=PAD, max_batches=val_batches,
                                rank=rank, world_size=world_size, batch_rows=GLOBAL_ROWS)
    rows, shapes = [], set()
    for inputs, targets in val.batches():
        shapes.add((tuple(inputs.shape), tuple(targets.shape)))
        real = (targets != IGNORE_INDEX).any(1)
        assert (inputs[~real] == PAD).all() and (targets[~real] == IGNORE_INDEX).all()  # padding takes no loss
        rows += [(tuple(i), tuple(t)) for i, t in zip(inputs[real].tolist(), targets[real].tolist(), strict=True)]
    return rows, len(val), shapes


@pytest.mark.parametrize("n_held", [1, 5, 7, 13, 29])
@pytest.mark.parametrize("val_batches", [1, 2, 3, None])
def test_every_layout_evaluates_the_same_examples(n_held, val_batches):
    """The union of the ranks' rows is the one-process set, row for row and in order; every rank yields as many
    batches, each of exactly ``micro_batch`` rows (the pipeline splits them)."""
    held = examples(n_held)
    reference, _, _ = rank_rows(held, val_batches, 1, GLOBAL_ROWS, 0)
    want = n_held if val_batches is None else min(n_held, val_batches * GLOBAL_ROWS)
    assert len(reference) == want and len(set(reference)) == want  # the first `want` examples, in file order
    first = InstructionValidation(held[:want], batch_size=want, seq_len=SEQ_LEN, pad_id=PAD)
    inputs, targets = next(first.batches())
    assert reference == [(tuple(i), tuple(t)) for i, t in zip(inputs.tolist(), targets.tolist(), strict=True)]
    for world_size, micro in LAYOUTS:
        shares = [rank_rows(held, val_batches, world_size, micro, r) for r in range(world_size)]
        assert len({n for _, n, _ in shares}) == 1, (world_size, micro)  # every rank runs as many batches
        assert set().union(*(s for _, _, s in shares)) == {((micro, SEQ_LEN), (micro, SEQ_LEN))}
        assert [row for rows, _, _ in shares for row in rows] == reference, (world_size, micro)


def test_padded_batches_give_the_one_process_loss():
    """Summed losses and target counts over every rank's batches, padded ones included, give one process's mean
    (the trainer's ``evaluate`` adds exactly these over ranks, skipping batches with no target)."""
    torch.manual_seed(0)
    table = torch.randn(512, 512)  # a fixed "model": logits of a token are a row of this table
    held = examples(13)

    def mean_loss(world_size, micro):
        total = count = 0
        for rank in range(world_size):
            val = InstructionValidation(held, batch_size=micro, seq_len=SEQ_LEN, pad_id=PAD, max_batches=None,
                                        rank=rank, world_size=world_size, batch_rows=GLOBAL_ROWS)
            for inputs, targets in val.batches():
                c = int((targets != IGNORE_INDEX).sum())
                if c:
                    loss = torch.nn.functional.cross_entropy(table[inputs].flatten(0, 1), targets.flatten(),
                                                             reduction="sum")
                    total, count = total + loss.item(), count + c
        return total / count, count

    one, tokens = mean_loss(1, 4)
    assert tokens == sum(len(e.ids) - 2 for e in held)
    for world_size, micro in [(2, 2), (2, 3), (4, 1), (4, 4)]:
        loss, n = mean_loss(world_size, micro)
        assert n == tokens and loss == pytest.approx(one, rel=1e-6), (world_size, micro)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        InstructionValidation(examples(3), batch_size=0, seq_len=SEQ_LEN, pad_id=PAD)
    with pytest.raises(ValueError, match="rank 2"):
        InstructionValidation(examples(3), batch_size=1, seq_len=SEQ_LEN, pad_id=PAD, rank=2, world_size=2)
