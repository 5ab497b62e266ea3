"""The engine's planner, without a model: retirement keeps the running rows packed, admission fills free slots in
queue order up to each request's share of the batch, the prefill budget goes to the shortest prompts first, and only
finished prompts whose reader keeps up decode."""

import random

from palmkit.infer.scheduler import SlotState, admission, plan_step, retire

DECODING = SlotState(prompt_left=0)
DONE = SlotState(prompt_left=0, done=True)


def test_retirement_moves_the_last_running_row_into_each_freed_slot():
    # slots 0..5; 1 and 4 finished: 5 moves into 1, 4 is dropped without a copy (it is the last once 5 has moved)
    keep, moves = retire([DECODING, DONE, DECODING, DECODING, DONE, DECODING])
    assert keep == (0, 5, 2, 3) and moves == ((5, 1),)
    # a finished sequence moved into a freed slot is itself retired: the next one from the end takes its place
    keep, moves = retire([DONE, DECODING, DECODING, DONE])
    assert keep == (2, 1) and moves == ((2, 0),)
    assert retire([DONE, DONE]) == ((), ())


def test_admission_fills_the_free_slots_in_queue_order():
    waiting = [SlotState(5), SlotState(3), SlotState(9)]
    plan = plan_step([DECODING, DONE, DECODING], waiting, max_batch=3, prefill_tokens=100)
    assert plan.keep == (0, 2) and plan.admit == (0,)  # one slot freed, one sequence admitted: the first in line
    assert plan.prefill == ((2, 5),)
    assert plan.decode == (0, 1, 2) and plan.rows == 3  # its prompt is done by the end of the step: it decodes
    assert plan_step([DECODING] * 3, waiting, max_batch=3, prefill_tokens=100).admit == ()  # no free slot


def test_the_prefill_budget_goes_to_the_shortest_prompts_first_in_chunks():
    running = [SlotState(300), DECODING, SlotState(20), SlotState(50)]
    plan = plan_step(running, [SlotState(10)], max_batch=8, prefill_tokens=64)
    # shortest first: the admitted 10 (slot 4), then 20, then 34 of the 50; the 300-token prompt waits
    assert plan.prefill == ((4, 10), (2, 20), (3, 34))
    # the running sequence and the prompts finished this step decode; the chunked ones do not yet
    assert plan.decode == (1, 2, 4)
    again = plan_step([SlotState(300), DECODING, DECODING, SlotState(16), DECODING], [], 8, prefill_tokens=64)
    assert again.prefill == ((3, 16), (0, 48))


def test_a_scored_prompt_never_decodes_and_padded_rows_cover_every_decoding_slot():
    scored = SlotState(4, generates=False)
    plan = plan_step([scored, DECODING], [], max_batch=4, prefill_tokens=8, step_rows=[0, 1, 4, 4, 4])
    assert plan.prefill == ((0, 4),) and plan.decode == (1,)
    assert plan.rows == 4  # two slots taken step with the faster 4-row count
    idle = plan_step([SlotState(40)], [], max_batch=4, prefill_tokens=8)
    assert idle.decode == () and idle.rows == 0 and idle.prefill == ((0, 8),)


def test_cancelled_sequences_are_neither_prefilled_nor_decoded():
    cancelled = SlotState(6, done=True)
    plan = plan_step([DECODING], [cancelled, SlotState(2)], max_batch=4, prefill_tokens=8)
    assert plan.admit == (0, 1) and plan.prefill == ((2, 2),) and plan.decode == (0, 2)


def test_copying_the_moved_rows_in_order_leaves_every_kept_sequence_in_its_new_slot():
    rng = random.Random(0)
    for _ in range(500):
        running = [rng.choice([DECODING, DONE]) for _ in range(rng.randrange(12))]
        keep, moves = retire(running)
        rows = list(range(len(running)))  # rows[r]: whose keys and values cache row r holds
        for src, dst in moves:
            rows[dst] = rows[src]
        assert rows[: len(keep)] == list(keep)
        assert sorted(keep) == [i for i, s in enumerate(running) if not s.done]
        assert len(moves) <= sum(s.done for s in running)


def test_a_request_of_many_choices_takes_no_more_than_its_share_of_the_batch():
    many = [SlotState(4, group=9)] * 32  # one request of 32 choices, first in line
    singles = [SlotState(4, group=g) for g in range(6)]  # six clients of one choice each, behind it
    # 7 requests share 16 slots: 2 each; the many-choice request takes 2, every single client gets in
    assert admission([], [*many, *singles], max_batch=16) == (0, 1, *range(32, 38))
    # alone it takes the whole batch: a share only holds back a request while others are present
    assert admission([], many, max_batch=16) == tuple(range(16))
    # a request already past its share (admitted when it was alone) keeps its slots; none more join it
    running = [SlotState(0, group=9)] * 10
    assert admission(running, [*many[:5], *singles], max_batch=16) == tuple(range(5, 11))
    # a cancelled sequence is let through whatever its request holds: it leaves at the next step
    assert admission(running, [SlotState(4, done=True, group=9)], max_batch=16) == (0,)
    assert admission([SlotState(0)] * 4, singles, max_batch=4) == ()  # no free slot


def test_a_sequence_whose_reader_is_behind_keeps_its_slot_and_does_not_decode():
    slow = SlotState(0, group=1, paused=True)
    plan = plan_step([DECODING, slow, DECODING], [SlotState(3, group=2)], max_batch=4, prefill_tokens=8)
    assert plan.keep == (0, 1, 2) and plan.admit == (0,)
    assert plan.decode == (0, 2, 3) and plan.rows == 4
    idle = plan_step([slow], [], max_batch=4, prefill_tokens=8)
    assert idle.decode == () and idle.rows == 0 and idle.keep == (0,) and idle.prefill == ()
