"""The serving engine's planner: what one step does, as data, decided without a model.

A step (Orca's iteration-level scheduling, Yu et al. 2022; vLLM's v1 scheduler) does, in order:
1. retirement: finished and cancelled sequences leave their slots; the last running sequence moves into each
   freed slot, so the running rows stay packed in slots 0..n-1 and a decode step works on one view of the cache;
2. admission: waiting sequences, in queue order, take the free slots, each request (client) up to a fair share of
   the batch while others run or wait: on a CPU every row makes a decode step slower, so one request of many
   choices would otherwise slow every other client's tokens;
3. prefill: at most `prefill_tokens` prompt tokens over every sequence still being prefilled, the shortest
   remaining prompts first, so a long prompt is prefilled in chunks between decode steps while a chat turn is not
   kept waiting (chunked prefill, Agrawal et al. 2023, "SARATHI");
4. decode: every sequence whose prompt is done by the end of this step's prefill feeds its last token, all in
   one batch of `rows` cache rows (padded up to a faster row count, `step_rows`), except those whose reader has
   fallen behind (paused: they keep their slot and resume once their reader has caught up).

`plan_step` is a pure function of what it is shown (`SlotState`s), so tests check admission, the prefill budget and
retirement without a model; the engine executes the plan (palmkit/infer/engine.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotState:
    """What the planner needs to know of one sequence, running or waiting."""

    prompt_left: int  # prompt tokens not yet in the cache
    done: bool = False  # finished or cancelled: it leaves its slot
    generates: bool = True  # False for a prompt that is only scored (no token is generated)
    group: int = 0  # the request it belongs to: each request holds at most a fair share of the batch
    paused: bool = False  # its reader has fallen behind: it keeps its slot and does not decode


@dataclass(frozen=True)
class StepPlan:
    """One engine step. Slots are numbered after retirement (`keep`) and admission."""

    keep: tuple[int, ...]  # keep[i]: the slot before this step of the sequence now in slot i (running ones only)
    moves: tuple[tuple[int, int], ...]  # (from, to): cache rows to copy, in this order, to pack the running rows
    admit: tuple[int, ...]  # indexes of the waiting sequences admitted, into slots len(keep), len(keep) + 1, ...
    prefill: tuple[tuple[int, int], ...]  # (slot, prompt tokens): chunks prefilled this step, in this order
    decode: tuple[int, ...]  # slots whose sequences decode this step (ascending)
    rows: int  # cache rows the decode step feeds: 0 when nothing decodes, else >= every decode slot + 1


def retire(running: Sequence[SlotState]) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(keep, moves): the running sequences that stay, packed, and the cache-row copies that pack them.

    The last running sequence moves into each freed slot (one copy of one row, not a shift of every row after it).
    """
    keep, moves = list(range(len(running))), []
    i = 0
    while i < len(keep):
        while keep and running[keep[-1]].done:  # a finished last row is dropped, never copied
            keep.pop()
        if i < len(keep) and running[keep[i]].done:
            moves.append((len(keep) - 1, i))
            keep[i] = keep.pop()
        i += 1
    return tuple(keep), tuple(moves)


def plan_step(running: Sequence[SlotState], waiting: Sequence[SlotState], max_batch: int, prefill_tokens: int,
              step_rows: Sequence[int] | None = None) -> StepPlan:
    """Plan the next step for the sequences in slots 0..len(running)-1 and those waiting, first in line first.

    step_rows[n]: the rows a decode step feeds when n slots are taken (default n).
    """
    keep, moves = retire(running)
    kept = [running[i] for i in keep]
    admit = admission(kept, waiting, max_batch)
    slots = kept + [waiting[i] for i in admit]
    budget, chunks = prefill_tokens, {}
    # the shortest remaining prompts first; a stable sort keeps slot order among equals
    for slot in sorted((i for i, s in enumerate(slots) if s.prompt_left > 0 and not s.done),
                       key=lambda i: slots[i].prompt_left):
        if budget <= 0:
            break
        chunks[slot] = min(slots[slot].prompt_left, budget)
        budget -= chunks[slot]
    decode = tuple(i for i, s in enumerate(slots)
                   if not s.done and s.generates and not s.paused and s.prompt_left - chunks.get(i, 0) == 0)
    rows = 0
    if decode:
        rows = step_rows[len(slots)] if step_rows is not None else len(slots)
        rows = max(rows, decode[-1] + 1)
    return StepPlan(keep, moves, admit, tuple(chunks.items()), decode, rows)


def admission(kept: Sequence[SlotState], waiting: Sequence[SlotState], max_batch: int) -> tuple[int, ...]:
    """Indexes of the waiting sequences that take the free slots: in queue order, skipping those of a request that
    already holds its share, max_batch // (requests running or waiting), at least 1.

    Sequences of a request past its share (admitted when fewer requests were present) keep running: a step never
    takes a slot back. A cancelled sequence costs nothing and is admitted whatever its request holds (it leaves at
    the next step).
    """
    free = max_batch - len(kept)
    if free <= 0:
        return ()
    share = max(1, max_batch // max(1, len({s.group for s in (*kept, *waiting) if not s.done})))
    held = Counter(s.group for s in kept if not s.done)
    admit = []
    for i, s in enumerate(waiting):
        if len(admit) == free:
            break
        if s.done or held[s.group] < share:
            admit.append(i)
            held[s.group] += not s.done
    return tuple(admit)
