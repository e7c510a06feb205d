"""The torch paged-attention reference against dense SDPA on the contiguous K/V it was paged from."""
from __future__ import annotations

import pytest
import torch

from astrai_serve.kernels import get_attention_impl, paged_attention
from astrai_serve.kernels.cascade import plan_cascade
from astrai_serve.kernels.cases import dense_attention, make_case

# (ctx_lens, q_lens): pure decode, pure prefill, mixed decode + prefill chunks on a cached prefix.
BATCHES = {
    "decode": ([1, 7, 33, 16], [1, 1, 1, 1]),
    "prefill": ([5, 40], [5, 40]),
    "mixed": ([1, 50, 17, 32, 9], [1, 13, 1, 32, 4]),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_reference_matches_dense_gqa(batch: str, n_heads: int, n_kv: int, page_size: int) -> None:
    ctx_lens, q_lens = BATCHES[batch]
    case = make_case(ctx_lens, q_lens, n_heads, n_kv, k_dim=16, v_dim=16, page_size=page_size,
                     seed=n_heads * 100 + page_size)
    out = paged_attention(*case.args())
    assert out.shape == (sum(q_lens), n_heads, 16)
    torch.testing.assert_close(out, dense_attention(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("page_size", [1, 16])
def test_reference_matches_dense_value_in_key(batch: str, page_size: int) -> None:
    """MLA absorbed form: one kv head, key = [latent, rope], value = latent."""
    ctx_lens, q_lens = BATCHES[batch]
    case = make_case(ctx_lens, q_lens, n_heads=4, n_kv=1, k_dim=24, v_dim=16, page_size=page_size,
                     value_in_key=True, seed=7)
    assert case.v_cache is None
    out = paged_attention(*case.args())
    assert out.shape == (sum(q_lens), 4, 16)
    torch.testing.assert_close(out, dense_attention(case), atol=1e-5, rtol=1e-5)


def test_reference_keeps_dtype_and_computes_in_fp32() -> None:
    case = make_case([40, 3], [2, 3], 4, 2, 16, 16, page_size=16, dtype=torch.bfloat16, seed=3)
    out = paged_attention(*case.args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_attention(case), atol=1e-2, rtol=1e-2)


def test_reference_ignores_pages_outside_the_context() -> None:
    """Garbage in unused slots of the last page and in foreign pages must not change the output."""
    case = make_case([5, 20], [1, 3], 4, 2, 16, 16, page_size=16, seed=11)
    before = paged_attention(*case.args())
    used = {int(p) for s, c in enumerate([5, 20]) for p in case.page_table[s, :(c + 15) // 16]}
    for p in range(case.k_cache.shape[0]):
        if p not in used:
            case.k_cache[p].fill_(1e4)
    case.k_cache[int(case.page_table[0, 0]), 5:].fill_(float("nan"))
    case.v_cache[int(case.page_table[0, 0]), 5:].fill_(float("nan"))
    torch.testing.assert_close(paged_attention(*case.args()), before)


def test_bad_arguments_are_named() -> None:
    case = make_case([4], [1], 4, 2, 16, 16, page_size=16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(case.q[:, :3], *case.args()[1:])
    with pytest.raises(ValueError, match="v_dim=32"):
        paged_attention(case.q, case.k_cache, None, *case.args()[3:7], 32)
    with pytest.raises(ValueError, match="2 queries but a context of only 1"):
        bad = make_case([1, 3], [1, 1], 4, 2, 16, 16, page_size=16)
        paged_attention(bad.q, bad.k_cache, bad.v_cache, bad.page_table,
                        torch.tensor([0, 2, 2], dtype=torch.int32), bad.context_lens, bad.scale, 16)


def test_get_attention_impl_by_name() -> None:
    assert get_attention_impl("torch") is paged_attention
    with pytest.raises(ValueError, match="'flash'"):
        get_attention_impl("flash")


def test_reference_checks_the_cascade_promise():
    case = make_case([60, 70, 40], [1, 1, 1], 4, 2, 16, 16, 16, shared_prefix=32)
    plan, saved = plan_cascade(case.page_table.numpy(), case.context_lens.numpy(), 16, 8)
    assert plan.tolist() == [32, 32, 32, 0, 3, 32] and saved == 64      # one chunk of all 3
    ok = paged_attention(*case.args(), cascade=torch.from_numpy(plan))
    torch.testing.assert_close(ok, paged_attention(*case.args()))
    too_long = plan.copy()
    too_long[[0, 1, 2, 5]] = 48
    with pytest.raises(ValueError, match="below their context lengths"):
        paged_attention(*case.args(), cascade=torch.from_numpy(too_long))
    two = make_case([60, 70, 40], [1, 1, 1], 4, 2, 16, 16, 16, shared_prefix=32, prefix_groups=[0, 0, 1])
    with pytest.raises(ValueError, match="do not share their first 2 pages"):
        paged_attention(*two.args(), cascade=torch.from_numpy(plan))
    half_page = plan.copy()
    half_page[[0, 1, 2, 5]] = 24
    with pytest.raises(ValueError, match="whole pages of 16 tokens"):
        paged_attention(*case.args(), cascade=torch.from_numpy(half_page))
    with pytest.raises(ValueError, match="want S \\+ 3 x chunks"):
        paged_attention(*case.args(), cascade=torch.zeros(4, dtype=torch.int64))


def test_cascade_planner_groups_neighbours_and_cuts_chunks():
    # Groups 0 (3 sequences), a loner, group 2 (5 sequences) and group 3 (2 sequences, one whole
    # page below their context) with chunks of at most 2: a group's odd one out shares nothing.
    case = make_case([40, 50, 45, 33, 60, 70, 80, 90, 35, 17, 17], [1] * 11, 4, 2, 16, 16, 16, shared_prefix=16,
                     prefix_groups=[0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3])
    plan, saved = plan_cascade(case.page_table.numpy(), case.context_lens.numpy(), 16, 2)
    s = 11
    c = (len(plan) - s) // 3
    assert plan[:s].tolist() == [16, 16, 0, 0, 16, 16, 16, 16, 0, 16, 16]
    assert list(zip(plan[s:s + c], plan[s + c:s + 2 * c], plan[s + 2 * c:])) == [
        (0, 2, 16), (4, 2, 16), (6, 2, 16), (9, 2, 16)]
    assert saved == 4 * 16
    paged_attention(*case.args(), cascade=torch.from_numpy(plan))       # keeps the promise
    fixed, _ = plan_cascade(case.page_table.numpy(), case.context_lens.numpy(), 16, 2, capacity=6)
    assert len(fixed) == s + 18 and fixed[s + 6 + 4:s + 12].tolist() == [0, 0]   # unused slots: count 0
