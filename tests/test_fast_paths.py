"""The step's faster paths give the same tensors as the straightforward code they replace.

- M-RoPE position ids (`mrope_position_ids`, whose row scan reads token kinds from a Python list) against the
  tensor-indexing scan it replaced, kept here as the reference: images, Qwen2.5-VL video steps, left and right
  padding, empty rows, and the same errors for malformed inputs.
- The CPU top-p (`apply_top_p`, sorting values only) against the index-sorting path (`_top_p_by_sort`) bit for
  bit, on random logits, logits with many exact ties (integers), banned (-inf) tokens, float64, and top-p values
  near 0 and 1; and the cases where the fast path must step aside (a tie across the cut) still agree.
"""

import pytest
import torch

from emor3.engine import sampler
from emor3.engine.sampler import apply_top_p
from emor3.models.positions import mrope_position_ids

IMG, VID = 90, 91


def mrope_reference(input_ids, attention_mask, image_grid_thw, *, image_token_id, spatial_merge_size=2,
                    video_grid_thw=None, video_token_id=None, video_steps=None):
    """The row scan as it was written first: token kinds read as tensor elements, one at a time."""
    B, P = input_ids.shape
    grids = {1: image_grid_thw.tolist() if image_grid_thw is not None else [],
             2: video_grid_thw.tolist() if video_grid_thw is not None else []}
    steps = video_steps if video_steps is not None else [1.0] * len(grids[2])
    mask_cpu = attention_mask.bool()
    kind_all = (input_ids == image_token_id).long()
    if video_token_id is not None:
        kind_all[input_ids == video_token_id] = 2
    pos = torch.zeros(3, B, P, dtype=torch.long)
    nxt = torch.zeros(B, dtype=torch.long)
    m, used = spatial_merge_size, {1: 0, 2: 0}
    for b in range(B):
        valid = mask_cpu[b].nonzero().squeeze(-1)
        kind = kind_all[b, valid]
        row = torch.zeros(3, len(valid), dtype=torch.long)
        p, i = 0, 0
        while i < len(valid):
            k = int(kind[i])
            if k == 0:
                j = i
                while j < len(valid) and kind[j] == 0:
                    j += 1
                row[:, i:j] = torch.arange(p, p + j - i)
                p += j - i
                i = j
                continue
            g = used[k]
            if g >= len(grids[k]):
                raise ValueError("more runs than grids")
            t, h, w = grids[k][g]
            gh, gw = h // m, w // m
            n = t * gh * gw
            if i + n > len(valid) or not bool((kind[i:i + n] == k).all()):
                raise ValueError("not enough consecutive tokens")
            step = torch.tensor(steps[g] if k == 2 else 1.0, dtype=torch.float32)
            tpos = (torch.arange(t) * step).long()
            tt, hh, ww = torch.meshgrid(tpos, torch.arange(gh), torch.arange(gw), indexing="ij")
            row[:, i:i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p
            p += max(gh, gw)
            i += n
            used[k] += 1
        pos[:, b, valid] = row
        nxt[b] = row.max() + 1 if len(valid) else 0
    return pos, nxt


def _prompt(gen, parts):
    """Token ids of a prompt from parts: an int n (n random text tokens) or ("img"|"vid", tokens)."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out += torch.randint(0, 80, (part,), generator=gen).tolist()
        else:
            out += [IMG if part[0] == "img" else VID] * part[1]
    return out


def _batch(rows, left=True):
    P = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), P, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(P - len(r), P) if left else slice(0, len(r))
        ids[b, sl] = torch.tensor(r, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False])
def test_mrope_positions_equal_the_tensor_scan(left):
    gen = torch.Generator().manual_seed(0)
    # images: 1x(4x6) patches -> 6 merged tokens; 1x(8x4) -> 8; videos: t=2 of (4x4) -> 8 tokens, t=3 of (2x6) -> 9
    rows = [_prompt(gen, [5, ("img", 6), 7]), _prompt(gen, [9]), [],
            _prompt(gen, [3, ("img", 8), 2, ("vid", 8), 4]), _prompt(gen, [("vid", 9), 1, ("img", 6), 6])]
    img_grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 4, 6]])
    vid_grid = torch.tensor([[2, 4, 4], [3, 2, 6]])
    ids, mask = _batch(rows, left)
    kw = dict(image_token_id=IMG, spatial_merge_size=2, video_grid_thw=vid_grid, video_token_id=VID,
              video_steps=[0.5, 2.0])
    # images in row-major order of their tokens: row 0's, row 3's, row 4's
    pos, nxt = mrope_position_ids(ids, mask, img_grid, **kw)
    ref_pos, ref_nxt = mrope_reference(ids, mask, img_grid, **kw)
    assert torch.equal(pos, ref_pos) and torch.equal(nxt, ref_nxt), "the list scan changed the M-RoPE ids"


def test_mrope_positions_same_errors():
    gen = torch.Generator().manual_seed(1)
    ids, mask = _batch([_prompt(gen, [4, ("img", 5), 3])])  # 5 image tokens where the grid needs 6
    for fn in (mrope_position_ids, mrope_reference):
        with pytest.raises(ValueError):
            fn(ids, mask, torch.tensor([[1, 4, 6]]), image_token_id=IMG)
    ids, mask = _batch([_prompt(gen, [4, ("img", 6), 3, ("img", 6)])])  # two image runs, one grid
    for fn in (mrope_position_ids, mrope_reference):
        with pytest.raises(ValueError):
            fn(ids, mask, torch.tensor([[1, 4, 6]]), image_token_id=IMG)


def _logit_cases():
    gen = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(64, 957, generator=gen) * 3
    yield "peaked", torch.randn(64, 957, generator=gen) * 12
    yield "flat", torch.randn(64, 957, generator=gen) * 0.01
    x = torch.randn(64, 957, generator=gen) * 3
    x[:, :7] = float("-inf")  # banned tokens
    yield "banned", x
    yield "ties", torch.randint(-3, 4, (64, 300), generator=gen).float()  # many exactly equal logits
    yield "float64", torch.randn(16, 957, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("top_p", [1e-6, 0.05, 0.5, 0.9, 0.95, 0.999, 1 - 1e-7])
def test_top_p_values_path_equals_the_index_sort(top_p):
    for name, logits in _logit_cases():
        want = sampler._top_p_by_sort(logits, top_p)
        got = apply_top_p(logits, top_p)
        assert torch.equal(got, want), f"{name}, top_p {top_p}: the CPU top-p kept a different set"


def test_top_p_values_path_runs_and_steps_aside_on_a_tie_at_the_cut():
    logits = torch.randn(32, 957, generator=torch.Generator().manual_seed(3)) * 3
    assert sampler._top_p_by_values(logits, 0.95) is not None, "the fast path should take ordinary logits"
    # two equal most likely tokens holding most of the mass: at top_p 0.3 the first is kept and the second cut,
    # and which of the two torch.sort puts first decides the answer
    tie = torch.full((1, 10), -10.0)
    tie[0, 3] = tie[0, 6] = 5.0
    assert sampler._top_p_by_values(tie, 0.3) is None, "a tie across the cut must go to the index sort"
    assert torch.equal(apply_top_p(tie, 0.3), sampler._top_p_by_sort(tie, 0.3))


@pytest.mark.parametrize("layout", ["grouped", "shuffled", "uneven"])
def test_prompt_rows_backward_equals_index_select_backward(layout):
    """The prompt-to-rows gather of shared-prefix scoring: the same forward and the same gradient bits as
    index_select's autograd (zeros.index_add_), for the GRPO layout (running sums) and any other (fallback)."""
    from emor3.models.qwen_vl import _PromptRows

    B, G = 4, 8
    index = {"grouped": torch.arange(B).repeat_interleave(G), "shuffled": torch.randperm(B * G) % B,
             "uneven": torch.tensor([0, 0, 1, 2, 2, 2, 3])}[layout]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 5, 3, generator=gen).transpose(2, 3)  # strided, as the projected keys are
    grad = torch.randn(index.shape[0], 2, 3, 5, generator=gen) * 1e3
    grad[0, 0, 0, :2] = -0.0  # a negative zero must come back as +0.0, as index_add_ into zeros gives
    grads = []
    for fn in (lambda t: t.index_select(0, index), lambda t: _PromptRows.apply(t, index)):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]), "forward differs from index_select"
    assert torch.equal(grads[0][1], grads[1][1]), f"{layout}: gradient bits differ from index_select's backward"
