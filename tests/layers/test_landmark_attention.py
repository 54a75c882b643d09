"""Landmark attention's grouped softmax and token layout: the dense form == a float64 loop written from the paper's
formula, the weight matrix's invariants, insertion and removal, and packed documents isolated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.layers import landmark_attention as la


def loop_weights(s: np.ndarray, mem_freq: int, seg: np.ndarray | None = None) -> np.ndarray:
    """w [T, T] for scores s [T, T] of one head over one expanded sequence: the paper's grouped softmax, per query,
    in float64 Python loops (no masks, no padding tricks)."""
    length, block = s.shape[0], mem_freq + 1
    seg = np.zeros(length, int) if seg is None else seg
    w = np.zeros_like(s, dtype=np.float64)
    for i in range(length):
        b = i // block
        local = [j for j in range(b * block, i + 1) if j % block != mem_freq and seg[j] == seg[i]]
        gates = [c for c in range(b) if seg[c * block + mem_freq] == seg[i]]
        z = sum(np.exp(s[i, j]) for j in local) + sum(np.exp(s[i, c * block + mem_freq]) for c in gates)
        for j in local:
            w[i, j] = np.exp(s[i, j]) / z
        for c in gates:
            members = [j for j in range(c * block, c * block + mem_freq) if seg[j] == seg[i]]
            inner = sum(np.exp(s[i, j]) for j in members)
            for j in members:
                w[i, j] = np.exp(s[i, c * block + mem_freq]) / z * np.exp(s[i, j]) / inner
    return w


def _qkv(length, heads=4, kv_heads=2, head_dim=8, batch=2, seed=0, dtype=jnp.float64):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    return q, k, v


@pytest.mark.parametrize("length, mem_freq", [(23, 3), (16, 4), (9, 1)], ids=["partial-block", "whole", "freq1"])
def test_dense_weights_equal_the_papers_formula_in_float64(x64, length, mem_freq):
    q, k, _ = _qkv(length)
    scale = 8**-0.5
    slots = jnp.broadcast_to(jnp.arange(length), (2, length))
    w = np.asarray(la.weights(q, k, slots, mem_freq=mem_freq, scale=scale))  # [B, K, G, T, T]
    assert w.dtype == np.float64
    for b in range(2):
        for h in range(4):
            s = np.einsum("td,sd->ts", np.asarray(q[b, :, h]), np.asarray(k[b, :, h // 2])) * scale
            np.testing.assert_allclose(w[b, h // 2, h % 2], loop_weights(s, mem_freq), atol=1e-14, rtol=0)


def test_rows_sum_to_one_landmarks_carry_no_mass_and_no_query_reads_its_own_landmark(x64):
    length, mem_freq = 27, 4
    q, k, _ = _qkv(length, seed=1)
    slots = jnp.broadcast_to(jnp.arange(length), (2, length))
    w = np.asarray(la.weights(q, k, slots, mem_freq=mem_freq, scale=0.3))
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-14)
    landmark = np.asarray(la.is_landmark_slot(jnp.arange(length), mem_freq))
    assert landmark.sum() == length // (mem_freq + 1)
    assert np.all(w[..., landmark] == 0.0)  # as values, landmarks get exactly nothing
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    assert np.all(w[..., j > i] == 0.0)  # causal
    assert (w[..., j <= i] > 0).mean() > 0.5  # most earlier regular keys are read
    # the probability mass of earlier block c is e^{gate}/Z: remove the landmark key's score and every row changes
    k2 = k.at[:, mem_freq].add(3.0)  # the first landmark's key
    w2 = np.asarray(la.weights(q, k2, slots, mem_freq=mem_freq, scale=0.3))
    assert np.all(w2[..., : mem_freq + 1, :] == w[..., : mem_freq + 1, :])  # block 0's own queries never gate on it
    assert np.abs(w2[..., mem_freq + 1 :, :mem_freq] - w[..., mem_freq + 1 :, :mem_freq]).min() > 0


def test_insert_then_remove_is_the_identity_and_positions_count_landmarks():
    mem_freq, length = 3, 11
    x = jnp.arange(2 * length, dtype=jnp.float32).reshape(2, length, 1) + 1
    positions = jnp.array([list(range(length)), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
    segments = jnp.array([[1] * length, [1] * 5 + [2] * 6])
    lm = jnp.array([-1.0])
    y, pos, seg = la.insert(x, lm, positions, segments, mem_freq)
    assert y.shape == (2, length + length // mem_freq, 1)
    np.testing.assert_array_equal(la.remove(y, length, mem_freq), x)
    landmark = np.asarray(la.is_landmark_slot(jnp.arange(y.shape[1]), mem_freq))
    np.testing.assert_array_equal(np.flatnonzero(landmark), [3, 7, 11])
    assert np.all(np.asarray(y)[:, landmark, 0] == -1.0)
    np.testing.assert_array_equal(pos[0], np.arange(14))
    # row 2: document 2 starts at token 5 = slot 6; the landmark at slot 7 follows token 5 (document 2)
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(seg[1], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])


def test_packed_documents_never_read_each_other_even_inside_a_shared_block(x64):
    """A boundary inside a block (slot 6 of block 1 = slots 4..7, mem_freq 3): the dense form == the loop oracle with
    segments, and the later document's outputs do not depend on anything of the earlier one."""
    length, mem_freq = 17, 3
    q, k, v = _qkv(length, batch=1, seed=2)
    seg = jnp.array([[1] * 6 + [2] * 11])
    slots = jnp.arange(length)[None]
    w = np.asarray(la.weights(q, k, slots, mem_freq=mem_freq, scale=0.5, q_segments=seg, k_segments=seg))
    for h in range(4):
        s = np.einsum("td,sd->ts", np.asarray(q[0, :, h]), np.asarray(k[0, :, h // 2])) * 0.5
        np.testing.assert_allclose(w[0, h // 2, h % 2], loop_weights(s, mem_freq, np.asarray(seg[0])), atol=1e-14)
    out = la.reference(q, k, v, seg, mem_freq=mem_freq, scale=0.5)
    noise = jax.random.normal(jax.random.key(9), (3, 1, 6, 1, 1))
    q2, k2, v2 = q.at[:, :6].add(noise[0]), k.at[:, :6].add(noise[1]), v.at[:, :6].add(noise[2])
    out2 = la.reference(q2, k2, v2, seg, mem_freq=mem_freq, scale=0.5)
    np.testing.assert_array_equal(out2[:, 6:], out[:, 6:])
    assert float(jnp.abs(out2[:, :6] - out[:, :6]).min()) > 0


def test_top_k_retrieval_is_the_grouped_softmax_over_the_chosen_blocks_moved_before_the_own_block(x64):
    """One query at slot 22 (block 5 of blocks of 4 slots) over a cache of 6 blocks, k = 2, two query heads on one
    KV head: per head, pick the two blocks whose landmark keys score highest one block ahead (numpy), lay them out
    in order at blocks 3 and 4 followed by the own block, rotate the keys there, and run the dense grouped softmax
    on that short sequence: the retrieval output is that."""
    from lcjax.layers.rope import apply_rope

    mem_freq, block, theta = 3, 4, 10000.0
    rope = lambda t, p: apply_rope(t, p, theta)
    keys = jax.random.split(jax.random.key(4), 3)
    q_raw = jax.random.normal(keys[0], (1, 1, 2, 8), jnp.float64)
    k_raw = jax.random.normal(keys[1], (1, 24, 1, 8), jnp.float64)
    v = jax.random.normal(keys[2], (1, 24, 1, 8), jnp.float64)
    slot = jnp.array([[22]])
    q = rope(q_raw, slot)
    retrieve = jax.jit(
        lambda q, q_raw, k_raw, v, slot, top_k, mode: la.retrieval_attention(
            q, q_raw, k_raw, v, slot, mem_freq=mem_freq, scale=0.4, top_k=top_k, mode=mode, rope=rope
        ),
        static_argnums=(5, 6),
    )
    got = retrieve(q, q_raw, k_raw, v, slot, 2, "per_token_and_head")
    # one query: both modes choose alike
    np.testing.assert_array_equal(retrieve(q, q_raw, k_raw, v, slot, 2, "max_over_tokens"), got)
    for h in range(2):
        ahead = np.asarray(rope(q_raw[:, :, h : h + 1], jnp.array([[block]])))[0, 0, 0]
        scores = [ahead @ np.asarray(k_raw[0, c * block + mem_freq, 0]) for c in range(5)]
        chosen = sorted(np.argsort(scores)[-2:])
        rows = np.concatenate([np.arange(c * block, (c + 1) * block) for c in chosen] + [np.arange(20, 23)])
        kv = jnp.asarray(k_raw[:, rows]), jnp.asarray(v[:, rows])
        k_virtual = rope(kv[0], jnp.arange(12, 23)[None])
        w = la.weights(q[:, :, h : h + 1], k_virtual, jnp.array([[10]]), mem_freq=mem_freq, scale=0.4)
        want = la.attend(w, kv[1])[0, 0, 0]
        np.testing.assert_allclose(got[0, 0, h], want, atol=1e-12, err_msg=f"head {h}")
    # with k >= every earlier block (clamped to the 5 there are) it is the training form at the query's slot
    everything = retrieve(q, q_raw, k_raw, v, slot, 9, "per_token_and_head")
    k_all = rope(k_raw[:, :23], jnp.arange(23)[None])
    w = la.weights(q, k_all, slot, mem_freq=mem_freq, scale=0.4)
    np.testing.assert_allclose(everything, la.attend(w, v[:, :23]), atol=1e-12)
