static_assert(D == DV, "attention_bwd_wgmma needs Dqk == Dv");
mlx_flash::attention_bwd_wgmma<T, MT, mlx_flash::Features<SOFTCAP, ALIBI, MASK_KIND, WINDOW, BLOCK_MASK, false, VARLEN, KEY_RANGE>, D, HEADS_FIRST, DV_EARLY, DQ_V4>(
    q, k, v, mask, alibi, bmask, cu_q, cu_k, ip, fp, dout, lse, delta, dq_acc, dk, dv, kstart, klen);
